"""A release train of six _rust.pyd releases (cryptography 42.0.6 -> 43.0.3): cold cache, warm cache, no cache.

Every release changes _rust.pyd (7-8 MB of MSVC/Rust code), so each one is a
diff against the current baseline. With the cache a train of N diffs costs
N + 1 analyses; without it 2N. Reported, in the same run: seconds per release
and the cold train against its N + 1 analyses and N diffs done alone (should be about 1),
cold against warm, and no cache against cold. Times are this process's CPU
seconds (the machine is shared: wall time measures the neighbours); the
benchmark's own timing is wall time. Not gated on time.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hotpatch.cache import AnalysisCache
from hotpatch.diff.compare import diff
from hotpatch.train import load_manifest, run_train
from tests.support.realbins import real_binary

VERSIONS = (("42.0.6", "2024-04-28"), ("42.0.7", "2024-05-06"), ("42.0.8", "2024-06-04"),
            ("43.0.0", "2024-07-20"), ("43.0.1", "2024-09-03"), ("43.0.3", "2024-10-18"))
MODULE = "cryptography/hazmat/bindings/_rust.pyd"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = ['[train]', 'name = "rust"', "[policy]", "cadence_months = 12", ""]
    for version, date in VERSIONS:
        path = real_binary("cryptography", version, MODULE).resolve().as_posix()
        lines += ["[[release]]", f'name = "{version}"', f"date = {date}", "[release.modules]", f'"{MODULE}" = "{path}"']
    folder = tmp_path_factory.mktemp("bench-train")
    (folder / "rust.toml").write_text("\n".join(lines) + "\n")
    return folder / "rust.toml"


def _train(manifest: Path, out: Path, cache: AnalysisCache) -> tuple[float, dict[str, int]]:
    started = time.process_time()
    result = run_train(load_manifest(manifest), out, cache=cache, calendar=None)
    return time.process_time() - started, result.cache


def test_train_cold_warm_and_uncached(benchmark, manifest: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    diffs = len(VERSIONS) - 1
    # the unit: each version analysed once (N + 1 analyses) and each release diffed once against the one
    # before it (every release of this series is an unplanned baseline), held in memory, no train around it
    analysis_seconds = diff_seconds = 0.0
    previous = None
    for version, _ in VERSIONS:
        started = time.process_time()
        table = AnalysisCache(enabled=False).table(real_binary("cryptography", version, MODULE))
        analysis_seconds += time.process_time() - started
        if previous is not None:
            started = time.process_time()
            diff(previous, table)
            diff_seconds += time.process_time() - started
        previous = table
    del previous, table

    runs: dict[str, tuple[float, dict[str, int]]] = {}

    def cold() -> None:
        runs["cold"] = _train(manifest, tmp_path / "cold", AnalysisCache(tmp_path / "cache"))

    benchmark.pedantic(cold, rounds=1, iterations=1)
    runs["warm"] = _train(manifest, tmp_path / "warm", AnalysisCache(tmp_path / "cache"))
    runs["none"] = _train(manifest, tmp_path / "none", AnalysisCache(enabled=False))
    (cold_s, cold_stats), (warm_s, warm_stats), (none_s, none_stats) = runs["cold"], runs["warm"], runs["none"]
    assert cold_stats["analyses"] == diffs + 1 and warm_stats["analyses"] == 0 and warm_stats["hits"] == 2 * diffs
    assert none_stats["analyses"] == 2 * diffs
    unit = analysis_seconds + diff_seconds
    figures = {
        "analyses_cpu_s": round(analysis_seconds, 2), "diffs_cpu_s": round(diff_seconds, 2),
        "cold_cpu_s": round(cold_s, 2), "warm_cpu_s": round(warm_s, 2), "no_cache_cpu_s": round(none_s, 2),
        "cold_per_release_cpu_s": round(cold_s / diffs, 2), "cold_over_analyses_plus_diffs": round(cold_s / unit, 2),
        "cold_over_warm": round(cold_s / warm_s, 2), "no_cache_over_cold": round(none_s / cold_s, 2),
        "analyses_cold": cold_stats["analyses"], "analyses_no_cache": none_stats["analyses"],
    }
    benchmark.extra_info.update(figures)
    print("\n" + ", ".join(f"{k} {v}" for k, v in figures.items()))
