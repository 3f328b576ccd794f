"""The numpy 2.1.0 -> 2.1.3 train over every native module of the real win_amd64 wheels."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotpatch.cache import AnalysisCache
from hotpatch.train import load_manifest, run_train
from tests.support.realtrains import SERIES, write_manifest

pytestmark = [pytest.mark.realbins, pytest.mark.slow]


def test_numpy_train_runs_over_every_module_and_costs_one_analysis_per_version(tmp_path: Path) -> None:
    manifest = load_manifest(write_manifest("numpy", tmp_path))
    modules = set(manifest.releases[0].modules)
    assert "numpy.libs/libscipy_openblas64_.dll" in modules and "numpy/_core/_multiarray_umath.cp311-win_amd64.pyd" \
        in modules and len(modules) == 20
    result = run_train(manifest, tmp_path / "out", cache=AnalysisCache(tmp_path / "cache"))
    assert [r.name for r in result.releases] == [v for v, _ in SERIES["numpy"]]
    assert result.releases[0].kind == "planned_baseline"
    for release in result.releases[1:]:
        status = {m.module: m for m in release.modules}
        # the same OpenBLAS build ships in all four wheels: never analysed, never patched
        assert status["numpy.libs/libscipy_openblas64_.dll"].status == "unchanged"
        assert status["numpy/_core/_simd.cp311-win_amd64.pyd"].verdict == "NO_CODE_CHANGE"
        # every patch release rebuilt the extension modules; a release is a hotpatch only if all of them are
        blocking = {r["module"] for r in release.reasons}
        assert (release.kind == "hotpatch") == (not blocking)
        assert all(status[m].reasons for m in blocking)
    changed = sum(m.status == "changed" for m in result.releases[1].modules)
    # each version of each changed module analysed once: the baseline's and each release's; the baseline's
    # analysis of a later cycle comes from the cache
    versions = changed * len(result.releases)
    assert result.cache["analyses"] == versions
    assert result.cache["analyses"] + result.cache["hits"] == 2 * changed * (len(result.releases) - 1)
    assert result.figures["restarts"] + result.figures["restarts_avoided"] == len(result.releases)
    # 2.1.2 alone needs a restart: _multiarray_umath's thread-local data template changed (docs/TRAIN.md)
    assert [r.kind for r in result.releases] == ["planned_baseline", "hotpatch", "unplanned_baseline", "hotpatch"]
    assert [r["kind"] for r in result.releases[2].reasons] == ["tls_change"]

    again = run_train(manifest, tmp_path / "out", cache=AnalysisCache(tmp_path / "cache"))
    assert all(r.resumed for r in again.releases) and again.cache["analyses"] == 0
