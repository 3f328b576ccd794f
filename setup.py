"""Build of the compiled parts: the Cython analysis modules (the decoder against capstone's headers) and diff kernels.

The core calls capstone through function pointers taken from the library the
``capstone`` Python package loads, so only its headers are needed here; the
structure layouts are why capstone's version is pinned in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def capstone_include() -> str:
    import capstone

    path = os.path.join(os.path.dirname(capstone.__file__), "include")
    if not os.path.isfile(os.path.join(path, "capstone", "capstone.h")):
        raise SystemExit(f"capstone headers not found in {path}; install capstone from its wheel")
    return path


# the analysis core (fingerprints, and the backend the rest imports), the x86-64 decoder over capstone,
# packed references, discovery's round kernels; each .pyx cimports the .pxd files next to it
ANALYSIS = "hotpatch/analysis"
core = Extension("hotpatch.analysis._core", [f"{ANALYSIS}/_core.pyx"], extra_compile_args=["-O2"])
decoder = Extension(
    "hotpatch.analysis._decode",
    [f"{ANALYSIS}/_decode.pyx", "native/x86_fastlen.c"],
    include_dirs=[capstone_include(), "native"],
    extra_compile_args=["-O2", "-Wno-unused-function"],
)
reflist = Extension("hotpatch.analysis._reflist", [f"{ANALYSIS}/_reflist.pyx"], extra_compile_args=["-O2"])
# (the sweep check calls capstone's C API as the decoder does)
discovery = Extension("hotpatch.analysis._discovery", [f"{ANALYSIS}/_discovery.pyx"], include_dirs=[capstone_include()],
                      extra_compile_args=["-O2"])
diff_core = Extension("hotpatch.diff._diffcore", ["hotpatch/diff/_diffcore.pyx"], extra_compile_args=["-O2"])
# .pdata read in one pass (hotpatch.pe.directories' loop is its twin)
pdata = Extension("hotpatch.pe._pdata", ["hotpatch/pe/_pdata.pyx"], extra_compile_args=["-O2"])
# the verdict's ownership scan over capstone's C API (C++: its sets are std::vector and std::unordered_map)
ownership = Extension("hotpatch.verdict._ownership", ["hotpatch/verdict/_ownership.pyx"], language="c++",
                      include_dirs=[capstone_include()], extra_compile_args=["-O2"])
# the layout check's text of the runs the token alignment left unpaired (C++: its tokens in std::unordered_map)
layout = Extension("hotpatch.verdict._layout", ["hotpatch/verdict/_layout.pyx"], language="c++",
                   include_dirs=[capstone_include()], extra_compile_args=["-O2"])


class build_py_with_agent(build_py):
    """Also build hotpatch-agent.exe into hotpatch/bin/ (native/agent/build.py), when mingw-w64 is there."""

    def run(self) -> None:
        super().run()
        spec = importlib.util.spec_from_file_location("agent_build", os.path.join(HERE, "native", "agent", "build.py"))
        agent = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(agent)
        editable = getattr(self, "editable_mode", False)
        package = os.path.join(HERE, "hotpatch") if editable else os.path.join(self.build_lib, "hotpatch")
        try:
            print(f"built {agent.build_agent(os.path.join(package, 'bin'), record=editable)}")
        except agent.AgentBuildError as exc:
            print(
                f"WARNING: hotpatch-agent.exe not built, live patching will need HOTPATCH_AGENT: {exc}", file=sys.stderr
            )


setup(
    ext_modules=cythonize([core, decoder, reflist, discovery, diff_core, ownership, layout, pdata],
                          compiler_directives={"language_level": 3}, quiet=True),
    cmdclass={"build_py": build_py_with_agent},
)
