"""An earlier commit of hotpatch, built once, to measure against in the same run.

A ratio against a figure from another day and machine says little (the duckdb diff that took 26 s
where issue 12 was filed takes 12 s here); the same command run by the issue's own code beside ours
says how far we have come. ``reference_site(commit)`` exports the commit from this checkout's git
history (``git archive``), installs it with pip into a folder of its own under the cache
(``$HOTPATCH_CACHE/reference/<commit>``, built once) and returns that folder, to put first on
``PYTHONPATH`` of a child process (run outside this checkout, or its own hotpatch comes first).

    python -m tests.support.reference_build [COMMIT]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tests.support.realbins import cache_dir

__all__ = ["ISSUE_12_COMMIT", "reference_site"]

# main when issue 12 (speed as users feel it) was filed
ISSUE_12_COMMIT = "99923d1bb70bcbfa10509d4b471e8a7456805c03"
_REPOSITORY = Path(__file__).resolve().parents[2]


def reference_site(commit: str) -> Path:
    """The folder holding ``commit``'s hotpatch package, compiled; built on first use."""
    site = cache_dir() / "reference" / commit
    marker = site / ".complete"
    if marker.exists():
        return site
    shutil.rmtree(site, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="hotpatch-reference-") as scratch:
        archive = Path(scratch) / "source.tar"
        subprocess.run(["git", "-C", str(_REPOSITORY), "archive", "--format=tar", "-o", str(archive), commit],
                       check=True)
        source = Path(scratch) / "source"
        with tarfile.open(archive) as tar:
            tar.extractall(source, filter="data")
        # pip builds it as a user would install it (its own build requirements, Cython included)
        built = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                                str(site), str(source)], capture_output=True, text=True)
        if built.returncode != 0:
            raise RuntimeError(f"building {commit[:12]} failed:\n{built.stderr[-4000:]}")
    marker.touch()
    return site


if __name__ == "__main__":
    print(reference_site(sys.argv[1] if len(sys.argv) > 1 else ISSUE_12_COMMIT))
