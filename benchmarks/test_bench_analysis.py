"""Analysis core throughput: the compiled core against its pure-Python reference, same run.

Every function of cryptography 43.0.0's _rust.pyd (about 21,000 functions,
1.3 M instructions) is decoded and fingerprinted by both implementations; the
ratio, not the wall time, is the result (this machine is shared and noisy).
"""

from __future__ import annotations

import time
from array import array
from pathlib import Path

import pytest

from hotpatch import Image, discover
from hotpatch.analysis import _core as core
from hotpatch.analysis import _reference as reference
from hotpatch.analysis.api import AnalysisContext, decode, fingerprint_all


@pytest.fixture(scope="module")
def rust_layout(rust_pyd: Path) -> tuple[AnalysisContext, list, array]:
    table = discover(Image.load(rust_pyd))
    items = [(f.rva, f.ranges) for f in table]
    starts = array("I", sorted(f.rva for f in table))
    return table.context, items, starts


def _analyse(layout: tuple[AnalysisContext, list, array], impl: object) -> int:
    ctx, items, starts = layout
    analyses = fingerprint_all(ctx, decode(ctx, items, impl), starts, impl)
    return sum(a.instruction_count for a in analyses)


def test_analysis_core_against_reference(benchmark, rust_layout) -> None:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    instructions = _analyse(rust_layout, reference)
    reference_seconds = time.perf_counter() - started

    compiled = benchmark.pedantic(_analyse, args=(rust_layout, core), rounds=5, iterations=1)
    assert compiled == instructions
    core_seconds = benchmark.stats.stats.min
    ratio = reference_seconds / core_seconds
    benchmark.extra_info.update(
        functions=len(rust_layout[1]),
        instructions=instructions,
        core_instructions_per_second=round(instructions / core_seconds),
        reference_instructions_per_second=round(instructions / reference_seconds),
        speedup=round(ratio, 1),
    )
    print(f"\n_rust.pyd: {len(rust_layout[1])} functions, {instructions} instructions; "
          f"core {instructions / core_seconds / 1e6:.2f} M insn/s, "
          f"reference {instructions / reference_seconds / 1e6:.3f} M insn/s, speedup {ratio:.1f}x")
