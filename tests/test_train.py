"""Release trains over the fixture product (tests/fixtures/build_product.py): kinds, cumulative
packages, figures, resume, signing, bad manifests, and the policy's schedule."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from hotpatch.cache import AnalysisCache
from hotpatch.cli.commands import main
from hotpatch.package.format import load, loads, package_id_of, signature_state_of
from hotpatch.package.signing import write_keypair
from hotpatch.train import load_manifest, run_train
from hotpatch.train.manifest import Override, Policy
from hotpatch.train.plan import Schedule, add_months, kind_of
from hotpatch.verify.check import verify
from tests.fixtures.build_product import MODULES, RELEASES, build_product, release_dir


@pytest.fixture(scope="session")
def product(built_fixtures: Path) -> Path:
    """The product's manifest (every release built)."""
    return build_product(built_fixtures)


@pytest.fixture(scope="module")
def train_run(product: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("train")
    cache = AnalysisCache(tmp_path_factory.mktemp("cache") / "analysis")
    return run_train(load_manifest(product), out, cache=cache), out


def _copy_manifest(product: Path, tmp_path: Path, text: str | None = None) -> Path:
    """The product manifest beside the releases (paths are relative to it), optionally rewritten."""
    path = product.parent / f"test-{tmp_path.name}.toml"
    path.write_text(text if text is not None else product.read_text())
    return path


# ── the whole train ───────────────────────────────────────────────────────────


@pytest.mark.slow
def test_product_train_gives_each_release_its_kind_and_cumulative_packages(train_run, product: Path) -> None:
    result, out = train_run
    assert [(r.name, r.kind) for r in result.releases] == [(r.name, r.kind) for r in RELEASES]
    by_name = {r.name: r for r in result.releases}
    # hotpatch 2 is cumulative: core carries fixes 1 and 2, against the January baseline, sequence 2
    march = {m.module: m for m in by_name["2026.03"].modules}
    assert march["core.dll"].package["sequence"] == 2 and march["util.dll"].package["sequence"] == 2
    assert {m.package["baseline_id"] for m in march.values() if m.package} == {"product/2026.01"}
    assert march["core.dll"].summary["changed"] == 2 and march["app.dll"].status == "unchanged"
    assert by_name["2026.02"].modules[1].summary["changed"] == 1
    # the writable global's new initial value makes May an unplanned baseline, and only core says why
    may = by_name["2026.05"]
    assert {(r["module"], r["kind"]) for r in may.reasons} == {("core.dll", "changed_writable_data")}
    assert not list((out / "packages").glob("2026.05/*"))
    june = {m.module: m for m in by_name["2026.06"].modules}
    assert june["app.dll"].package["baseline_id"] == "product/2026.05" and june["app.dll"].package["sequence"] == 1
    assert june["core.dll"].status == "unchanged" and june["core.dll"].package is None
    for release in result.releases:
        for module in release.modules:
            if module.package:
                data = (out / module.package["path"]).read_bytes()
                assert hashlib.sha256(data).hexdigest() == module.package["sha256"]
                assert package_id_of(loads(data)) == module.package["package_id"]


@pytest.mark.slow
def test_cumulative_package_on_the_baseline_computes_what_the_release_computes(train_run, built_fixtures: Path) -> None:
    result, out = train_run
    releases = {release.name: release for release in RELEASES}
    checked = set()
    # every package of every module: util.dll's preferred base (0x181000000) is not a usual default, and the
    # emulator rewrites the header's ImageBase as Windows does; app.dll's calls go into core.dll and util.dll,
    # which verify maps beside it from the baseline release (its siblings on disk)
    for release in result.releases:
        for module in release.modules:
            if not module.package:
                continue
            package = load(out / module.package["path"])
            baseline = releases[module.package["baseline_id"].split("/")[1]]
            report = verify(package, release_dir(built_fixtures, baseline) / module.module,
                            release_dir(built_fixtures, releases[release.name]) / module.module)
            assert report.agrees, (release.name, module.module, report.difference)
            assert report.calls
            checked.add(module.module)
    assert checked == set(MODULES)


@pytest.mark.slow
def test_train_figures_count_restarts_waits_and_growth(train_run) -> None:
    result, out = train_run
    figures = result.figures
    assert (figures["restarts"], figures["restarts_planned"], figures["restarts_unplanned"]) == (4, 3, 1)
    assert figures["restarts_every_release"] == 7 and figures["restarts_avoided"] == 3
    waits = {w["release"]: (w["days_without_hotpatch"], w["restart"]) for w in figures["fix_waits"]}
    # February's fix would have waited for April's planned baseline; June's for July's
    assert waits["2026.02"] == ((dt.date(2026, 4, 14) - dt.date(2026, 2, 10)).days, "2026.04")
    assert waits["2026.03"] == (35, "2026.04") and waits["2026.06"] == (35, "2026.07")
    assert waits["2026.05"] == (0, "2026.05")
    assert figures["fix_wait_days_total"] == 63 + 35 + 35
    first_cycle = figures["cycles"][0]
    assert first_cycle["hotpatches"] == ["2026.02", "2026.03"]
    assert first_cycle["package_bytes"][1] > first_cycle["package_bytes"][0]  # cumulative packages grow
    # each distinct module version is analysed once: 9 versions diffed, the baselines reused 3 times
    assert result.cache == {"hits": 3, "analyses": 9, "stored": 9, "rejected": 0, "evicted": 0}
    assert orjson.loads((out / "train.json").read_bytes()) == orjson.loads(orjson.dumps(result.to_json()))
    svg = (out / "calendar.svg").read_text()
    assert svg.startswith("<?xml") and "unplanned" in svg and "2026.05" in svg


@pytest.mark.slow
def test_interrupted_train_resumes_from_the_releases_it_finished(product: Path, train_run, tmp_path: Path) -> None:
    straight, straight_out = train_run
    out = tmp_path / "out"
    cache = AnalysisCache(tmp_path / "cache")

    class Stop(Exception):
        pass

    def stop_after_march(outcome) -> None:
        if outcome.name == "2026.03":
            raise Stop

    with pytest.raises(Stop):
        run_train(load_manifest(product), out, cache=cache, interrupt=stop_after_march)
    assert sorted(p.name for p in (out / "releases").iterdir()) == ["000-2026.01.json", "001-2026.02.json",
                                                                   "002-2026.03.json"]
    assert not (out / "train.json").exists()
    # a half-written leftover and a truncated JSON are not outputs: the resumed run ignores them
    (out / "releases" / ".003-2026.04.json.x.part").write_text("{")
    (out / "releases" / "003-2026.04.json").write_text('{"schema": "hotpatch.train.rel')
    events: list[tuple[str, ...]] = []

    class Recorder:
        def release(self, index, release, modules, resumed) -> None:  # type: ignore[no-untyped-def]
            events.append((release.name, str(modules), "resumed" if resumed else "run"))

        def module(self, release, module) -> None:  # type: ignore[no-untyped-def]
            events.append((release.name, module))

    resumed = run_train(load_manifest(product), out, cache=AnalysisCache(tmp_path / "cache"), progress=Recorder())
    assert [r.resumed for r in resumed.releases] == [True, True, True, False, False, False, False]
    # progress per release (with its count of changed modules) and per module diffed
    assert events[:4] == [("2026.01", "0", "resumed"), ("2026.02", "1", "resumed"), ("2026.03", "2", "resumed"),
                          ("2026.04", "3", "run")]
    assert ("2026.05", "core.dll") in events and ("2026.06", "app.dll") in events
    assert ("2026.04", "core.dll") not in events  # a planned baseline diffs nothing
    # what the interrupted run analysed is in the cache: May's core, June's util, app in both versions are not
    assert resumed.cache["analyses"] == 4
    assert [r.to_json() for r in resumed.releases] == [r.to_json() for r in straight.releases]
    for path in (straight_out / "packages").rglob("*.hpk"):
        assert (out / path.relative_to(straight_out)).read_bytes() == path.read_bytes()

    # a package that went missing makes its release run again, and only that one
    (out / "packages" / "2026.02" / "core.dll.hpk").unlink()
    again = run_train(load_manifest(product), out, cache=AnalysisCache(tmp_path / "cache"))
    assert [r.name for r in again.releases if not r.resumed] == ["2026.02"]
    assert (out / "packages" / "2026.02" / "core.dll.hpk").exists()


@pytest.mark.slow
def test_signed_train_and_no_cache_from_the_command_line(product: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    public = bytes.fromhex(write_keypair(tmp_path / "key.pem", tmp_path / "key.pub"))
    code = main(["train", str(product), "-o", str(tmp_path / "out"), "--sign-key", str(tmp_path / "key.pem"),
                 "--no-cache", "--cache-dir", str(tmp_path / "unused"), "--calendar", "cal.png", "--json"])
    assert code == 0
    document = orjson.loads(capsys.readouterr().out)
    assert document["schema"] == "hotpatch.train/1"
    # without the cache every diff analyses both sides: 6 diffs, 12 analyses
    assert document["cache"]["analyses"] == 12 and document["cache"]["hits"] == 0
    assert not (tmp_path / "unused").exists()
    packages = sorted((tmp_path / "out" / "packages").rglob("*.hpk"))
    assert len(packages) == 5
    for path in packages:
        package = load(path, trusted_keys=[public], require_signature=True)
        assert signature_state_of(package) == "valid"
    assert (tmp_path / "out" / "cal.png").read_bytes()[:4] == b"\x89PNG"


# ── bad input ─────────────────────────────────────────────────────────────────


def _bad(product: Path, tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> str:
    manifest = _copy_manifest(product, tmp_path, text)
    try:
        code = main(["train", str(manifest), "-o", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")])
    finally:
        manifest.unlink()
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists(), "nothing is written"
    return err


def test_manifest_with_an_unknown_key_is_refused(product: Path, tmp_path: Path, capsys) -> None:
    text = product.read_text().replace('name = "2026.03"', 'name = "2026.03"\nurgent = true')
    err = _bad(product, tmp_path, text, capsys)
    assert "release '2026.03'" in err and "'urgent'" in err
    err = _bad(product, tmp_path, product.read_text().replace("cadence_months", "cadence"), capsys)
    assert "[policy]" in err and "'cadence'" in err


def test_manifest_with_a_missing_or_non_pe_file_is_refused(product: Path, tmp_path: Path, capsys) -> None:
    text = product.read_text().replace("product-2026.04/util.dll", "product-2026.04/nowhere.dll")
    err = _bad(product, tmp_path, text, capsys)
    assert "release '2026.04'" in err and "module 'util.dll'" in err and "'path'" in err and "nowhere" in err
    text = product.read_text().replace("product-2026.02/app.dll", "product-2026.02/app.dll.cmd")
    err = _bad(product, tmp_path, text, capsys)
    assert "release '2026.02'" in err and "module 'app.dll'" in err and "MZ" in err


def test_releases_out_of_date_order_are_refused(product: Path, tmp_path: Path, capsys) -> None:
    err = _bad(product, tmp_path, product.read_text().replace("2026-06-09", "2026-05-01"), capsys)
    assert "release '2026.06'" in err and "'date'" in err and "2026.05" in err


def test_a_module_that_disappears_is_refused(product: Path, tmp_path: Path, capsys) -> None:
    text = product.read_text().replace('"util.dll" = "product-2026.05/util.dll"\n', "")
    err = _bad(product, tmp_path, text, capsys)
    assert "release '2026.05'" in err and "module 'util.dll'" in err and "missing" in err


def test_bad_policy_and_key_are_refused_before_anything_is_written(product: Path, tmp_path: Path, capsys) -> None:
    text = product.read_text().replace("cadence_months = 3", 'cadence_months = 3\n[[policy.override]]\n'
                                       'release = "2027.01"\nkind = "hotpatch"')
    err = _bad(product, tmp_path, text, capsys)
    assert "override" in err and "'release'" in err and "2027.01" in err
    (tmp_path / "bad.pem").write_text("not a key")
    code = main(["train", str(product), "-o", str(tmp_path / "out"), "--sign-key", str(tmp_path / "bad.pem"),
                 "--cache-dir", str(tmp_path / "c")])
    assert code == 2 and not (tmp_path / "out").exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared").chmod(0o755)
    code = main(["train", str(product), "-o", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "shared")])
    err = capsys.readouterr().err
    assert code == 2 and "0700" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# ── the policy ────────────────────────────────────────────────────────────────


def test_planned_baselines_follow_the_calendar_or_roll_from_the_last_baseline() -> None:
    assert add_months(dt.date(2026, 1, 31), 1) == dt.date(2026, 2, 28)
    assert add_months(dt.date(2026, 11, 13), 3) == dt.date(2027, 2, 13)
    first = dt.date(2026, 1, 13)
    calendar = Schedule(Policy("a", 3, "calendar"), first)
    rolling = Schedule(Policy("a", 3, "rolling"), first)
    # after an unplanned baseline in May the calendar keeps July; rolling moves to August
    assert calendar.next_planned(dt.date(2026, 5, 12)) == dt.date(2026, 7, 13)
    assert rolling.next_planned(dt.date(2026, 5, 12)) == dt.date(2026, 8, 12)
    assert calendar.due(dt.date(2026, 4, 13), first) and not calendar.due(dt.date(2026, 4, 12), first)


def test_overrides_force_or_skip_a_planned_baseline() -> None:
    from hotpatch.train.manifest import Release

    release = Release("r", dt.date(2026, 4, 20), {})
    skip = Policy("a", overrides={"r": Override("r", "hotpatch", "freeze")})
    force = Policy("a", overrides={"r": Override("r", "planned_baseline")})
    plain = Policy("a")
    assert kind_of(release, started=True, due=True, policy=plain, blocked=None) == "planned_baseline"
    assert kind_of(release, started=True, due=True, policy=skip, blocked=None) is None
    assert kind_of(release, started=True, due=True, policy=skip, blocked=False) == "hotpatch"
    assert kind_of(release, started=True, due=True, policy=skip, blocked=True) == "unplanned_baseline"
    assert kind_of(release, started=True, due=False, policy=force, blocked=None) == "planned_baseline"
    assert kind_of(release, started=False, due=False, policy=plain, blocked=None) == "before_program"


@pytest.mark.slow
def test_releases_before_the_first_baseline_are_not_serviced(product: Path, tmp_path: Path) -> None:
    text = product.read_text().replace('first_baseline = "2026.01"', 'first_baseline = "2026.02"')
    manifest = _copy_manifest(product, tmp_path, text)
    try:
        result = run_train(load_manifest(manifest), tmp_path / "out", cache=AnalysisCache(tmp_path / "c"),
                           calendar=None)
    finally:
        manifest.unlink()
    kinds = [r.kind for r in result.releases]
    assert kinds[:3] == ["before_program", "planned_baseline", "hotpatch"]
    assert result.figures["releases"] == 6 and not (tmp_path / "out" / "calendar.svg").exists()
    shutil.rmtree(tmp_path / "out")


def test_real_trains_script_runs_as_a_script_from_anywhere(tmp_path: Path) -> None:
    """`make train-calendars` runs tests/support/realtrains.py as a script: its imports must resolve."""
    script = Path(__file__).resolve().parent / "support" / "realtrains.py"
    done = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--series" in done.stdout
