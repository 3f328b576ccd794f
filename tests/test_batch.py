"""Batch runs: manifests, the local pool, resuming, crashes and timeouts, a Dask LocalCluster, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from hotpatch.batch import CacheSpec, Job, load_manifest, read_results, release_jobs, run_batch
from hotpatch.cli.commands import main
from hotpatch.errors import BatchError
from tests.fixtures.cases import Case

CASES = ("body_change", "new_callee", "struct_field_insert", "short_function", "new_string", "changed_init_global")


def _jobs(built: Path, kind: str = "diff", names: tuple[str, ...] = CASES) -> list[Job]:
    return [Job.from_json({"kind": kind, "baseline": str(built / n / "baseline.dll"),
                           "patched": str(built / n / "patched.dll"), "name": n}) for n in names]


def _expected(cases: list[Case]) -> dict[str, str]:
    return {c.name: c.verdict for c in cases if c.name in CASES}


# ── manifests ──


def test_toml_manifest_resolves_paths_against_itself_and_applies_defaults(tmp_path: Path,
                                                                            built_fixtures: Path) -> None:
    for release, case in (("r1", "baseline"), ("r2", "patched")):
        (tmp_path / release / "lib").mkdir(parents=True)
        (tmp_path / release / "lib" / "body.dll").write_bytes((built_fixtures / "body_change" / f"{case}.dll")
                                                               .read_bytes())
    (tmp_path / "jobs.toml").write_text(
        '[defaults]\nkind = "build"\ntimeout = 30\n\n'
        '[[job]]\nname = "one"\nbaseline = "r1/lib/body.dll"\npatched = "r2/lib/body.dll"\n\n'
        '[[job]]\nbaseline = "r1/lib/body.dll"\npatched = "r2/lib/body.dll"\nkind = "diff"\n\n'
        '[[folders]]\nreleases = ["r1", "r2"]\nkinds = ["diff", "verify"]\n')
    jobs = load_manifest(tmp_path / "jobs.toml")
    # the folder pair repeats the explicit diff job: kept once
    assert [(j.kind, j.timeout) for j in jobs] == [("build", 30), ("diff", 30), ("verify", 30)]
    assert jobs[0].baseline == str((tmp_path / "r1" / "lib" / "body.dll").resolve())
    assert len({j.job_id for j in jobs}) == 3


def test_json_lines_manifest_and_its_errors(tmp_path: Path) -> None:
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text('{"baseline": "a.dll", "patched": "b.dll"}\n\n{"baseline": "c.dll", "patched": "d.dll", '
                        '"kind": "verify", "inputs": "calls.json"}\n')
    jobs = load_manifest(manifest)
    assert [j.kind for j in jobs] == ["diff", "verify"]
    assert jobs[1].inputs == str(tmp_path / "calls.json")
    for text, message in (('{"baseline": "a"}', "needs 'patched'"), ("[1]", "JSON object"), ("{", "not JSON"),
                          ('{"baseline": "a", "patched": "b", "kind": "apply"}', "not one of"),
                          ('{"baseline": "a", "patched": "b", "colour": 1}', "unknown job keys"),
                          ('{"baseline": "a", "patched": "b", "timeout": -1}', "positive")):
        manifest.write_text(text + "\n")
        with pytest.raises(BatchError, match=message):
            load_manifest(manifest)


def test_release_folders_pair_modules_by_name_without_wheel_hash_mangling(tmp_path: Path) -> None:
    for release, digest in (("v1", "0" * 32), ("v2", "f" * 32)):
        (tmp_path / release / "pkg").mkdir(parents=True)
        (tmp_path / release / "pkg" / "core.pyd").write_bytes(b"MZ")
        (tmp_path / release / f"libblas-{digest}.dll").write_bytes(b"MZ")
    (tmp_path / "v2" / "pkg" / "new_only.pyd").write_bytes(b"MZ")
    jobs = release_jobs([tmp_path / "v1", tmp_path / "v2"], ["diff"])
    assert sorted(Path(j.baseline).name for j in jobs) == ["core.pyd", f"libblas-{'0' * 32}.dll"]
    assert all("v1->v2" in j.label for j in jobs)


def test_largest_first_and_later_chain_steps_after_every_first_step(tmp_path: Path) -> None:
    from hotpatch.batch.runner import _order

    for name, size in (("a1", 10), ("a2", 10), ("a3", 10), ("b1", 500), ("b2", 500), ("c1", 50), ("c2", 50)):
        (tmp_path / name).write_bytes(b"x" * size)
    chain = [Job.from_json({"baseline": str(tmp_path / f"{m}{i}"), "patched": str(tmp_path / f"{m}{i + 1}")})
             for m, i in (("a", 2), ("a", 1), ("b", 1), ("c", 1))]
    assert [Path(j.baseline).name for j in _order(chain)] == ["b1", "c1", "a1", "a2"]


# ── running ──


@pytest.mark.slow
def test_local_batch_records_verdicts_and_resumes_without_rerunning(tmp_path: Path, built_fixtures: Path,
                                                                     cases: list[Case]) -> None:
    jobs = _jobs(built_fixtures, "build")
    result = run_batch(jobs, tmp_path, workers=2, keep_packages=True, progress=False)
    assert result.ran == len(jobs) and result.skipped == 0
    records = {r["name"]: r for r in read_results(result.results_path)}
    assert {name: r["verdict"] for name, r in records.items()} == _expected(cases)
    for record in records.values():
        assert record["status"] == "done" and record["timings"]["total"] > 0
        assert record["sizes"]["baseline"] == os.path.getsize(record["baseline"])
        if record["verdict"] == "HOTPATCH":
            assert Path(record["package"]["path"]).stat().st_size == record["sizes"]["package"]
        else:
            assert record["reasons"] and "package" not in record
    summary = json.loads(result.summary_path.read_text())
    hot = sum(v == "HOTPATCH" for v in _expected(cases).values())
    assert summary["verdicts"]["HOTPATCH"] == hot
    assert summary["hotpatchable_share"] == round(hot / len(jobs), 4)
    assert summary["reasons"]["function_too_short"] == {"jobs": 1, "reasons": 1}
    assert len(summary["slowest"]) == 5

    # a rerun skips everything; losing one record (and a line cut short by a kill) reruns just that job
    again = run_batch(jobs, tmp_path, workers=2, progress=False)
    assert (again.ran, again.skipped) == (0, len(jobs))
    lines = result.results_path.read_bytes().splitlines(keepends=True)
    result.results_path.write_bytes(b"".join(lines[:-1]) + lines[-1][:40])
    third = run_batch(jobs, tmp_path, workers=1, progress=False)
    assert (third.ran, third.skipped) == (1, len(jobs) - 1)
    assert len(read_results(result.results_path)) == len(jobs)


@pytest.mark.slow
def test_a_crashing_or_hanging_job_is_recorded_failed_and_the_batch_goes_on(tmp_path: Path,
                                                                           built_fixtures: Path) -> None:
    crash = tmp_path / "crash"
    crash.mkdir()
    fatal = crash / "fatal.dll"
    fatal.write_bytes((built_fixtures / "body_change" / "baseline.dll").read_bytes())
    fifo = tmp_path / "never_written.dll"
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: the job hangs for real
    jobs = [Job.from_json({"baseline": str(fatal), "patched": str(built_fixtures / "body_change" / "patched.dll"),
                           "name": "crash"}),
            Job.from_json({"baseline": str(fifo), "patched": str(fifo), "name": "hang", "timeout": 3}),
            Job.from_json({"baseline": "/nonexistent.dll", "patched": "/nonexistent.dll", "name": "missing"}),
            *_jobs(built_fixtures, "diff", ("body_change", "new_string"))]
    result = run_batch(jobs, tmp_path / "out", workers=1, cache=CacheSpec("tests.support.batch_plugins:CrashingCache",
                                                                          "fatal.dll"), progress=False)
    records = {r["name"]: r for r in result.records}
    assert records["crash"]["status"] == "failed"
    assert records["crash"]["error"].startswith("job process died (signal SIGABRT)")
    assert records["hang"]["status"] == "failed" and records["hang"]["error"].startswith("timed out after 3 s")
    assert records["missing"]["status"] == "failed" and "No such file" in records["missing"]["error"]
    assert records["body_change"]["verdict"] == records["new_string"]["verdict"] == "HOTPATCH"
    assert result.summary["by_status"] == {"failed": 3, "done": 2}
    # failed jobs count as finished unless asked to retry them
    assert run_batch(jobs, tmp_path / "out", workers=1, progress=False).ran == 0
    retried = run_batch(jobs[2:3], tmp_path / "out", workers=1, retry_failed=True, progress=False)
    assert retried.ran == 1


@pytest.mark.slow
def test_a_job_process_analyses_an_image_shared_by_two_jobs_once(tmp_path: Path, built_fixtures: Path) -> None:
    middle = built_fixtures / "body_change" / "patched.dll"
    jobs = [Job.from_json({"baseline": str(built_fixtures / "body_change" / "baseline.dll"),
                           "patched": str(middle)}),
            Job.from_json({"baseline": str(middle), "patched": str(built_fixtures / "body_change" / "baseline.dll")})]
    run_batch(jobs, tmp_path / "out", workers=1, cache=CacheSpec("tests.support.batch_plugins:CountingCache",
                                                                  str(tmp_path)), progress=False)
    (log,) = tmp_path.glob("analysed-*.txt")
    assert sorted(log.read_text().split()) == sorted({j.baseline for j in jobs})


@pytest.mark.slow
@pytest.mark.cluster
def test_batch_on_a_dask_local_cluster_gives_the_local_verdicts(tmp_path: Path, built_fixtures: Path,
                                                                cases: list[Case]) -> None:
    jobs = _jobs(built_fixtures, "build")
    result = run_batch(jobs, tmp_path, workers=2, local_cluster=True, progress=False)
    assert result.summary["engine"] == "dask-local:2 workers"
    records = read_results(result.results_path)
    assert {r["name"]: r["verdict"] for r in records} == _expected(cases)
    assert all(r["dask_worker"].startswith("tcp://") for r in records)


# ── the command ──


def _hotpatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hotpatch.cli", *args], capture_output=True, text=True, timeout=300)


def test_batch_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "jobs.toml"
    bad.write_text("[[job]]\nbaseline = 1\n")
    for args in ([str(bad)], [str(tmp_path / "missing.toml")], ["--releases", str(tmp_path / "nope"), str(tmp_path)],
                 [str(bad), "--workers", "0"]):
        capsys.readouterr()
        assert main(["batch", *args, "-o", str(tmp_path / "out")]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("hotpatch: error: "), err
    assert not (tmp_path / "out" / "results.jsonl").exists()


@pytest.mark.slow
def test_batch_cli_over_release_folders_exits_0_and_prints_json(tmp_path: Path, built_fixtures: Path) -> None:
    for release, side in (("v1", "baseline"), ("v2", "patched")):
        (tmp_path / release).mkdir()
        for case in ("body_change", "new_callee"):
            (tmp_path / release / f"{case}.dll").write_bytes((built_fixtures / case / f"{side}.dll").read_bytes())
    done = _hotpatch("batch", "--releases", str(tmp_path / "v1"), str(tmp_path / "v2"), "--kind", "diff",
                     "--kind", "build", "-o", str(tmp_path / "out"), "--workers", "2", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["jobs"] == 4 and summary["by_kind"] == {"diff": 2, "build": 2}
    lines = (tmp_path / "out" / "results.jsonl").read_bytes().splitlines()
    assert len(lines) == 4 and all(orjson.loads(line)["status"] == "done" for line in lines)


# ── real pairs ──


@pytest.mark.realbins
@pytest.mark.slow
@pytest.mark.cluster
def test_real_numpy_release_locally_then_on_a_local_cluster_from_the_analysis_cache(tmp_path: Path) -> None:
    from hotpatch.batch.jobs import DISK_CACHE
    from tests.support.realbins import ensure_wheel

    jobs = release_jobs([ensure_wheel("numpy", "2.1.0"), ensure_wheel("numpy", "2.1.1")])
    assert len(jobs) == 21
    cache = CacheSpec(DISK_CACHE.factory, str(tmp_path / "analysis"))
    local = run_batch(jobs, tmp_path / "local", workers=2, cache=cache, progress=False)
    # docs/DIFF_RESULTS.md: every module of the numpy patch release is a hotpatch, most with one changed function
    assert local.summary["verdicts"] == {"HOTPATCH": 21} and local.summary["by_status"] == {"done": 21}
    changed = {r["name"].split()[0]: r["summary"]["changed"] for r in local.records}
    assert changed["_multiarray_umath.cp311-win_amd64.pyd"] == 3 and changed["_simd.cp311-win_amd64.pyd"] == 0
    # byte-identical modules (OpenBLAS) are analysed once even in a cold cache
    assert sum(local.summary["cache"].values()) == 42 and local.summary["cache"]["analyses"] < 42
    cluster = run_batch(jobs, tmp_path / "cluster", workers=2, local_cluster=True, cache=cache, progress=False)
    assert cluster.summary["cache"] == {"hits": 42, "analyses": 0}
    assert ({r["id"]: (r["verdict"], r["summary"]) for r in cluster.records}
            == {r["id"]: (r["verdict"], r["summary"]) for r in local.records})


@pytest.mark.slow
def test_progress_shows_done_total_rate_and_time_left(tmp_path: Path, built_fixtures: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run_batch(_jobs(built_fixtures, "diff", ("body_change", "new_string", "new_callee")), tmp_path, workers=1,
              cache=None, progress=True)
    err = capsys.readouterr().err
    assert "batch" in err and "3/3" in err and "jobs/min" in err and "left" in err
