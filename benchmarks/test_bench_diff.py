"""End-to-end diff of cryptography 43.0.0 -> 43.0.1 _rust.pyd: compiled cores against the reference.

Same run, same machine: load, discover and analyse both images, then diff. The
compiled path runs hotpatch.analysis._core and hotpatch.diff._diffcore; the reference path
their pure-Python twins _reference and _diffreference (the diff takes the
kernels that go with the analysis that made its tables).
Also the diff stage alone on 1/4, 1/2 and all of the functions, to show how
its cost grows with the number of functions.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hotpatch import Image, discover
from hotpatch.analysis import _core as core
from hotpatch.analysis import _reference as reference
from hotpatch.analysis.functions import FunctionTable
from hotpatch.diff.compare import diff
from tests.support.realbins import real_binary


@pytest.fixture(scope="module")
def rust_pair(rust_pyd: Path) -> tuple[Path, Path]:
    return rust_pyd, real_binary("cryptography", "43.0.1", "cryptography/hazmat/bindings/_rust.pyd")


def _end_to_end(pair: tuple[Path, Path], impl: object) -> dict[str, int]:
    tables = [discover(Image.load(path), impl=impl) for path in pair]
    return diff(tables[0], tables[1]).summary()


def test_diff_end_to_end_core_against_reference(benchmark, rust_pair) -> None:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    expected = _end_to_end(rust_pair, reference)
    reference_seconds = time.perf_counter() - started
    summary = benchmark.pedantic(_end_to_end, args=(rust_pair, core), rounds=2, iterations=1)
    assert summary == expected
    ratio = reference_seconds / benchmark.stats.stats.min
    benchmark.extra_info.update(reference_seconds=round(reference_seconds, 2), speedup=round(ratio, 2), **summary)
    print(f"\n_rust.pyd 43.0.0 -> 43.0.1 {summary}: compiled {benchmark.stats.stats.min:.2f} s, "
          f"reference {reference_seconds:.2f} s, speedup {ratio:.1f}x")


def _prefix(table: FunctionTable, share: float) -> FunctionTable:
    count = int(len(table) * share)
    return FunctionTable(table.image, table.functions[:count], table.analyses[:count], table.context,
                         table.backend)


@pytest.mark.parametrize("share", [0.25, 0.5, 1.0])
def test_diff_stage_scaling(benchmark, rust_pair, share: float) -> None:  # type: ignore[no-untyped-def]
    tables = [_prefix(discover(Image.load(path)), share) for path in rust_pair]
    benchmark.pedantic(diff, args=(tables[0], tables[1]), rounds=2, iterations=1)
    functions = len(tables[0]) + len(tables[1])
    benchmark.extra_info.update(functions=functions,
                                microseconds_per_function=round(benchmark.stats.stats.min / functions * 1e6, 1))
    print(f"\nshare {share}: {functions} functions, diff {benchmark.stats.stats.min:.2f} s, "
          f"{benchmark.stats.stats.min / functions * 1e6:.0f} us per function")
