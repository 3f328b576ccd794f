"""Compare ``hotpatch functions`` with SMDA 5.0.1 (a capstone-based recursive disassembler).

Run on request, never in CI: ``python benchmarks/peers/smda_compare.py [IMAGE ...]``.
SMDA is installed into its own virtualenv under build/peers/ (it pins its own capstone and
LIEF); each tool runs as a separate process on the same file and its user+sys CPU is read
from ``RUSAGE_CHILDREN``. Printed per image: function starts found by each, how many both
found, a sample of starts only one of them found (to judge by hand who is right), and the
CPU ratio SMDA / hotpatch (the issue's target: at least 10x on every image).
Default images: cryptography 43.0.0 ``_rust.pyd`` and two small .pyd files from the cached
wheels (orjson, Rust-built; pyzmq's ``_zmq``, Cython-built).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.realbins import real_binary  # noqa: E402

SMDA_VERSION = "5.0.1"
VENV = ROOT / "build" / "peers" / "smda-venv"

# runs inside SMDA's virtualenv: function starts as RVAs, one JSON list
_SMDA_DRIVER = """
import json, sys
from smda.Disassembler import Disassembler
report = Disassembler().disassembleFile(sys.argv[1])
print(json.dumps(sorted(f.offset - report.base_addr for f in report.getFunctions())))
"""


def smda_python() -> Path:
    python = VENV / "bin" / "python"
    if not (VENV / ".installed").exists():
        venv.create(VENV, with_pip=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"smda=={SMDA_VERSION}"], check=True)
        (VENV / ".installed").touch()
    return python


def timed(argv: list[str]) -> tuple[float, bytes]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done.stdout


def compare(image: Path, smda: Path) -> None:
    ours_cpu, ours_out = timed([sys.executable, "-m", "hotpatch.cli", "functions", str(image), "--json"])
    theirs_cpu, theirs_out = timed([str(smda), "-c", _SMDA_DRIVER, str(image)])
    ours = {row["rva"] for row in json.loads(ours_out)["functions"]}
    theirs = set(json.loads(theirs_out))
    both = ours & theirs
    print(f"{image.name}: hotpatch {len(ours)} starts, {ours_cpu:.2f} s CPU; SMDA {len(theirs)} starts, "
          f"{theirs_cpu:.2f} s CPU; both {len(both)} ({len(both) / max(len(theirs), 1):.1%} of SMDA's, "
          f"{len(both) / max(len(ours), 1):.1%} of hotpatch's); "
          f"SMDA/hotpatch CPU {theirs_cpu / ours_cpu:.1f}x (target 10x)")
    print(f"  only hotpatch (sample): {[hex(r) for r in sorted(ours - theirs)[:8]]}")
    print(f"  only SMDA (sample):     {[hex(r) for r in sorted(theirs - ours)[:8]]}")


def default_images() -> list[Path]:
    return [
        real_binary("cryptography", "43.0.0", "cryptography/hazmat/bindings/_rust.pyd"),
        real_binary("orjson", "3.10.7", "orjson/orjson.cp311-win_amd64.pyd"),
        real_binary("pyzmq", "26.0.2", "zmq/backend/cython/_zmq.cp311-win_amd64.pyd"),
    ]


def main(argv: list[str]) -> None:
    smda = smda_python()
    for image in [Path(a) for a in argv] or default_images():
        compare(image, smda)


if __name__ == "__main__":
    main(sys.argv[1:])
