"""The analysis cache: a cached analysis diffs exactly as a fresh one; bad entries are rebuilt."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hotpatch.cache import AnalysisCache
from hotpatch.diff.compare import diff
from hotpatch.errors import CacheError
from hotpatch.package.builder import build_package
from hotpatch.package.format import dumps
from tests.fixtures.cases import Case


@pytest.fixture
def pair(cases: list[Case]) -> tuple[Path, Path]:
    (case,) = [c for c in cases if c.name == "switch_table"]
    return case.baseline, case.patched


def _entries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.hpa"))


def test_cached_analysis_diffs_and_builds_exactly_as_a_fresh_one(pair: tuple[Path, Path], tmp_path: Path) -> None:
    fresh = diff(*pair)
    cold = AnalysisCache(tmp_path / "c")
    first = diff(cold.table(pair[0]), cold.table(pair[1]))
    assert (cold.stats.analyses, cold.stats.hits, cold.stats.stored) == (2, 0, 2)
    warm = AnalysisCache(tmp_path / "c")
    cached = diff(warm.table(pair[0]), warm.table(pair[1]))
    assert (warm.stats.analyses, warm.stats.hits) == (0, 2)
    assert cached.to_json() == fresh.to_json() == first.to_json()
    assert cached.baseline.functions == fresh.baseline.functions
    assert dumps(build_package(cached, created=1)) == dumps(build_package(fresh, created=1))
    assert os.stat(tmp_path / "c").st_mode & 0o777 == 0o700


def test_a_corrupt_or_misplaced_entry_is_ignored_and_rebuilt(pair: tuple[Path, Path], tmp_path: Path) -> None:
    cache = AnalysisCache(tmp_path)
    expected = diff(cache.table(pair[0]), cache.table(pair[1])).to_json()
    base_entry, patched_entry = _entries(tmp_path)
    data = bytearray(base_entry.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit of payload: the content hash no longer matches
    base_entry.write_bytes(bytes(data))
    patched_entry.write_bytes(base_entry.read_bytes()[:40])  # truncated
    again = AnalysisCache(tmp_path)
    assert diff(again.table(pair[0]), again.table(pair[1])).to_json() == expected
    assert (again.stats.rejected, again.stats.analyses, again.stats.hits) == (2, 2, 0)
    # an intact entry filed under another image's key is not that image's analysis
    first, second = _entries(tmp_path)
    second.write_bytes(first.read_bytes())
    third = AnalysisCache(tmp_path)
    assert diff(third.table(pair[0]), third.table(pair[1])).to_json() == expected
    assert third.stats.rejected == 1 and third.stats.hits == 1


def test_the_size_bound_evicts_the_least_recently_used(pair: tuple[Path, Path], tmp_path: Path) -> None:
    cache = AnalysisCache(tmp_path)
    cache.table(pair[0])
    one = cache.size()
    bounded = AnalysisCache(tmp_path, max_bytes=one + one // 2)
    bounded.table(pair[1])
    assert bounded.stats.evicted == 1 and len(_entries(tmp_path)) == 1
    assert bounded.size() <= bounded.max_bytes
    bounded.table(pair[1])
    assert bounded.stats.hits == 1


def test_a_cache_directory_others_can_open_is_refused(pair: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(CacheError, match="0700"):
        AnalysisCache(shared).table(pair[0])
    assert AnalysisCache(shared, enabled=False).table(pair[0]).functions  # --no-cache never touches it
    assert not _entries(shared)
