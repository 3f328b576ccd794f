"""PE mutation runs through the CLI, deeper than the test suite's (harness: tests/support/pe_fuzz.py).

    python tests/fuzz_pe.py --cases 3000 [--seed N] [--subprocess-sample 12]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tests` and `hotpatch` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.pe_fuzz import ROOT, load_seeds, make_mutants, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--fixtures", type=Path, default=ROOT / "build" / "fixtures")
    parser.add_argument("--no-real", action="store_true", help="fixture seeds only (no wheel download)")
    parser.add_argument("--subprocess-sample", type=int, default=12)
    parser.add_argument("--memory-limit-mb", type=int, default=4096, help="RLIMIT_AS for this run")
    parser.add_argument("--work", type=Path, help="where mutants (and failing ones) are written")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_AS, (args.memory_limit_mb << 20, args.memory_limit_mb << 20))
    seeds = load_seeds(args.fixtures, real=not args.no_real)
    mutants = make_mutants(seeds, args.cases, args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="fuzz_pe."))
    work.mkdir(parents=True, exist_ok=True)
    report = run(mutants, args.cases, work, args.subprocess_sample, args.memory_limit_mb)
    report.fields_total = sum(len(s.fields) + len(s.regions) for s in seeds)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(f"seed {args.seed}: {report.cases} mutants of {len(seeds)} seeds in {report.seconds:.1f} s, "
              f"{dict(report.outcomes)}, slowest {report.slowest:.2f} s, peak RSS {report.peak_rss_mb:.0f} MB, "
              f"{report.subprocess_cases} as subprocesses, {len(report.mutated)} kinds of mutation")
        for failure in report.failures[:20]:
            print("FAIL", failure)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
