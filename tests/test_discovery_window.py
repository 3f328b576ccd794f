"""Bounding functions without .pdata from a first window of their code gives what the whole decode gives."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hotpatch import functions
from hotpatch.analysis import AnalysisContext, backend, decode
from hotpatch.image import Image
from tests.realbins import real_binary


def _items(image: Image) -> list[functions.Item]:
    """Every discovered start, ranged up to the next start or its section's end (as discovery's first look)."""
    starts = sorted(f.rva for f in functions.discover(image))
    items = []
    for index, rva in enumerate(starts):
        section = image.code_section(rva)
        assert section is not None
        limit = min(starts[index + 1], section.end_rva) if index + 1 < len(starts) else section.end_rva
        items.append((rva, ((rva, max(limit, rva + 1)),)))
    return items


def _assert_windowed_reach_is_whole_reach(image: Image, window: int, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(functions, "_REACH_WINDOW", window)
    ctx, core = AnalysisContext.from_image(image), backend()
    items = _items(image)
    horizons = [0] * len(items)
    whole = [functions._reachable(image.memory, item, analysis, 0)
             for item, analysis in zip(items, decode(ctx, items, core))]
    full: dict[functions.Item, object] = {}
    assert functions._reach(ctx, core, image.memory, items, horizons, full) == whole  # type: ignore[arg-type]
    return sum(1 for item, reached in zip(items, whole) if reached != item)


@pytest.mark.parametrize("window", [32, 64, 2048])
def test_windowed_reach_equals_whole_decode_on_fixtures(built_fixtures: Path, window: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cut = 0
    for name in ("new_callee/patched-stripped.dll", "switch_table/baseline.dll", "cpp_exception/baseline.dll"):
        image = Image.load_fast(built_fixtures / name)
        # without .pdata every function is bounded by reachability, jump tables included
        cut += _assert_windowed_reach_is_whole_reach(dataclasses.replace(image, runtime_functions=()), window,
                                                     monkeypatch)
    assert cut > 10  # the comparison met functions that end before the next start


@pytest.mark.realbins
def test_windowed_reach_equals_whole_decode_on_a_real_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    image = Image.load_fast(real_binary("orjson", "3.10.7", "orjson/orjson.cp311-win_amd64.pyd"))
    assert _assert_windowed_reach_is_whole_reach(dataclasses.replace(image, runtime_functions=()), 256,
                                                 monkeypatch) > 100
