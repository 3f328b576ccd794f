"""Deeper mutation runs of the agent's request parser than the test suite's (harness: tests/support/wire_fuzz.py).

    python tests/fuzz_agent.py --cases 200000 [--seed N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tests` and `hotpatch` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hotpatch.apply.protocol import Status
from tests.support.native import build_wire_check
from tests.support.wire_fuzz import make_cases, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args(argv)
    binary = build_wire_check()
    result = run(make_cases(args.cases, args.seed), binary)
    names = {int(s): s.name for s in Status}
    summary = ", ".join(f"{names.get(k, k)} {v}" for k, v in sorted(result.statuses.items()))
    print(f"seed {args.seed}: {result.cases} cases in {result.seconds:.1f} s: {summary}")
    for failure in result.failures[:20]:
        print("FAIL", failure)
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
