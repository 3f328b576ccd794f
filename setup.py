"""Build of the compiled parts: the Cython analysis core (against capstone's headers).

The core calls capstone through function pointers taken from the library the
``capstone`` Python package loads, so only its headers are needed here; the
structure layouts are why capstone's version is pinned in pyproject.toml.
"""

from __future__ import annotations

import os

from Cython.Build import cythonize
from setuptools import Extension, setup


def capstone_include() -> str:
    import capstone

    path = os.path.join(os.path.dirname(capstone.__file__), "include")
    if not os.path.isfile(os.path.join(path, "capstone", "capstone.h")):
        raise SystemExit(f"capstone headers not found in {path}; install capstone from its wheel")
    return path


core = Extension(
    "hotpatch._core",
    ["hotpatch/_core.pyx", "native/x86_fastlen.c"],
    include_dirs=[capstone_include(), "native"],
    extra_compile_args=["-O2", "-Wno-unused-function"],
)

setup(ext_modules=cythonize([core], compiler_directives={"language_level": 3}, quiet=True))
