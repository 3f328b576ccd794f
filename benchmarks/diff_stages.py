"""CPU and memory of ``hotpatch diff`` stage by stage, in one process.

    python benchmarks/diff_stages.py BASELINE PATCHED [--profile OUT.prof] [--tracemalloc]

Stages run in the order ``hotpatch.diff.compare.diff`` runs them: load (``Image.load_fast``
of both, as the diff reads paths), discovery (``discover``: the Python around the core), analysis (the
compiled core's decode and fingerprints, timed inside discovery and taken out
of it), matching (token streams and ``match_functions``), compare (classifying
matched pairs), data diff (``diff_data`` and uncovered bytes), verdict and
JSON (``to_json`` and the encoder). For each: CPU seconds (user + sys of the
process, so threads count), wall seconds, the process's peak RSS during the
stage (Linux's ``VmHWM``, reset before each stage through ``clear_refs``) and
its RSS after. ``--profile`` also writes a cProfile of the whole run; ``--tracemalloc`` adds
what Python allocated (traced MB after the stage and the stage's traced peak; much slower).
JSON is encoded as ``hotpatch diff --json`` does it (the function entries streamed in chunks).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hotpatch.analysis import api as analysis  # noqa: E402
from hotpatch.analysis import functions  # noqa: E402
from hotpatch.collector import gc_paused  # noqa: E402
from hotpatch.diff.datadiff import diff_data  # noqa: E402
from hotpatch.diff.matching import match_functions  # noqa: E402
from hotpatch.diff.pairing import Pairing  # noqa: E402
from hotpatch.diff.result import DiffResult  # noqa: E402
from hotpatch.diff.streams import InstructionStreams  # noqa: E402
from hotpatch.diff.uncovered import uncovered_changes  # noqa: E402
from hotpatch.jsonio import dumps_streamed  # noqa: E402
from hotpatch.pe.image import Image  # noqa: E402
from hotpatch.verdict.rules import decide, diff_document  # noqa: E402


def _status(field: str) -> float:
    """A ``/proc/self/status`` memory field in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


class Stages:
    def __init__(self) -> None:
        self.rows: dict[str, list[float]] = {}
        self.core_cpu = 0.0
        self.core_wall = 0.0

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        _reset_peak()
        cpu, wall, core_cpu, core_wall = time.process_time(), time.perf_counter(), self.core_cpu, self.core_wall
        yield
        row = [time.process_time() - cpu, time.perf_counter() - wall, _status("VmHWM"), _status("VmRSS")]
        if tracemalloc.is_tracing():
            traced, peak = tracemalloc.get_traced_memory()
            row += [traced / 1e6, peak / 1e6]
            tracemalloc.reset_peak()
        if name == "discovery":  # the core's share is its own row
            inner_cpu, inner_wall = self.core_cpu - core_cpu, self.core_wall - core_wall
            self.rows["analysis (core)"] = [inner_cpu, inner_wall, row[2], row[3]]
            row[0] -= inner_cpu
            row[1] -= inner_wall
        self.rows[name] = row

    def timed(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            cpu, wall = time.process_time(), time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.core_cpu += time.process_time() - cpu
                self.core_wall += time.perf_counter() - wall
        return wrapper


def run(baseline: str, patched: str) -> tuple[Stages, int]:
    stages = Stages()
    functions.decode = stages.timed(analysis.decode)  # type: ignore[attr-defined]
    functions.fingerprint_all = stages.timed(analysis.fingerprint_all)  # type: ignore[attr-defined]
    with gc_paused():
        with stages.stage("load"):
            image_a, image_b = Image.load_fast(baseline), Image.load_fast(patched)
        with stages.stage("discovery"):
            discover_pair = getattr(functions, "discover_pair", None)
            if discover_pair is not None:
                table_a, table_b = discover_pair(image_a, image_b)
            else:
                table_a, table_b = functions.discover(image_a), functions.discover(image_b)
        with stages.stage("matching"):
            streams = InstructionStreams(table_a, table_b)
            matches = match_functions(table_a, table_b, streams)
            function_map = {a: m.patched_rva for a, m in matches.items()}
        with stages.stage("compare"):
            pairing = Pairing(table_a, table_b, function_map, streams)
            found = pairing.classify(matches)
        with stages.stage("data diff"):
            data, data_map = diff_data(table_a, table_b, found, function_map, pairing)
            data += uncovered_changes(table_a, table_b, function_map)
        with stages.stage("verdict"):
            result = DiffResult(table_a, table_b, tuple(found), tuple(data), function_map, data_map, streams)
            verdict = decide(result)
        with stages.stage("JSON"):
            document = diff_document(result, verdict, functions=False)
            size = sum(map(len, dumps_streamed(document, "functions", result.function_entries())))
    return stages, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline")
    parser.add_argument("patched")
    parser.add_argument("--profile", help="write a cProfile of the run here")
    parser.add_argument("--tracemalloc", action="store_true", help="also trace Python's allocations per stage")
    args = parser.parse_args()
    if args.tracemalloc:
        tracemalloc.start()
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    stages, size = run(args.baseline, args.patched)
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
    total_cpu = sum(row[0] for row in stages.rows.values())
    traced = " traced MB after | traced peak MB |" if args.tracemalloc else ""
    print("| stage | CPU s | wall s | peak RSS MB | RSS after MB |" + traced)
    print("|---|---|---|---|---|" + ("---|---|" if traced else ""))
    order = ("load", "analysis (core)", "discovery", "matching", "compare", "data diff", "verdict", "JSON")
    for name in order:
        cpu, wall, peak, rss, *python = stages.rows[name]
        extra = "".join(f" {value:.0f} |" for value in python)
        print(f"| {name} | {cpu:.2f} | {wall:.2f} | {peak:.0f} | {rss:.0f} |" + extra)
    print(f"| total | {total_cpu:.2f} | | {_status('VmHWM'):.0f} (last stage) | |")
    print(f"JSON document: {size / 1e6:.1f} MB; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
