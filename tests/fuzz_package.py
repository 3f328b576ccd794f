"""Deeper mutation runs of the two .hpk readers than the test suite's (harness: tests/support/hpk_fuzz.py).

    python tests/fuzz_package.py --cases 200000 [--seed N] [--build-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tests` and `hotpatch` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.hpk_fuzz import run
from tests.support.native import HPK_BUILD, build_check


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--build-dir", type=Path, default=HPK_BUILD)
    args = parser.parse_args()
    binary = build_check(args.build_dir, sanitize=True)
    try:
        report = run(args.cases, args.seed, binary)
    except AssertionError as exc:
        print(exc, file=sys.stderr)
        return 1
    names = {0: "accepted", 1: "truncated", 2: "magic", 3: "version", 4: "hash", 5: "limit", 6: "layout",
             7: "field", 8: "encoding", "signature": "signature"}
    print(f"{report.cases} cases in {report.seconds:.1f} s (Python reader {report.python_seconds:.1f} s, "
          f"C reader with ASan+UBSan {report.c_seconds:.1f} s): the readers agree on every case")
    print("verdicts: " + ", ".join(f"{names[k]} {v}" for k, v in sorted(report.outcomes.items(), key=str)))
    print("operators: " + ", ".join(f"{k} {v}" for k, v in sorted(report.operators.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
