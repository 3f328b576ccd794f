"""The fixture product's train followed live under Wine, on a multi-threaded host.

host.exe loads the product's core.dll and util.dll, then app.dll, and four
threads call app's exports (which call into the other two) in a loop. The
train's packages go in as the train says: the January baseline, hotpatch 1,
hotpatch 2 stacked over it, a restart onto April's planned baseline, a restart
onto May's unplanned one, June's hotpatch, a restart onto July's. At every
step the host computes exactly the release's values; while a release's
packages go in, module by module, only values of a mix of the two releases'
modules are ever seen. Packages of another baseline are refused with the
restart they need.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from hotpatch.apply.agent import AgentClient
from hotpatch.apply.engine import Engine
from hotpatch.apply.journal import Journal
from hotpatch.cache import AnalysisCache
from hotpatch.diff.compare import diff
from hotpatch.errors import IdentityMismatchError, OtherBaselineError, StepFailedError
from hotpatch.package.builder import build_package
from hotpatch.package.format import dumps, load, loads
from hotpatch.package.signing import load_private_key, write_keypair
from hotpatch.process.winehost import windows_path
from hotpatch.train import TrainResult, load_manifest, run_train
from tests.fixtures.build_product import CALLS, MODULES, RELEASES, Release, build_product, expected, release_dir
from tests.support.hosts import Host

pytestmark = pytest.mark.slow
THREADS = 4


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    folder = tmp_path_factory.mktemp("keys")
    public = write_keypair(folder / "key.pem", folder / "key.pub")
    return folder / "key.pem", bytes.fromhex(public)


@pytest.fixture(scope="module")
def train(built_fixtures: Path, keys: tuple[Path, bytes], tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    manifest = load_manifest(build_product(built_fixtures))
    return run_train(manifest, tmp_path_factory.mktemp("train"), sign_key=keys[0], calendar=None,
                     cache=AnalysisCache(tmp_path_factory.mktemp("cache") / "analysis"))


class Product:
    """host.exe running one release of the product; ``seen`` collects every value it computed."""

    def __init__(self, prefix: Path, fixtures: Path, release: Release) -> None:
        folder = release_dir(fixtures, release)
        extra = tuple(a for m in MODULES[:2] for a in ("--load", windows_path(folder / m)))
        self.host = Host(prefix, folder / "app.dll", list(CALLS), threads=THREADS, extra=extra)
        self.release = release

    def wait(self, values: dict[str, int], start: int) -> None:
        for name, value in values.items():
            self.host.wait_for_only(value, start, name, timeout=60)

    def seen(self) -> dict[str, set[int]]:
        return {c.split(":")[0]: {v for vs in self.host.observed(0, c.split(":")[0]) for v in vs} for c in CALLS}

    def stop(self) -> None:
        code, stderr = self.host.stop()
        assert code == 0, f"host.exe exited with {code}: {stderr}"


def mixes(old: Release, new: Release) -> dict[str, set[int]]:
    """Every value a call may return while the modules go from ``old`` to ``new`` one at a time."""
    out: dict[str, set[int]] = {c.split(":")[0]: set() for c in CALLS}
    for choice in itertools.product(*((old.levels[m], new.levels[m]) for m in MODULES)):
        values = expected(replace(old, levels=dict(zip(MODULES, choice))))
        for name, value in values.items():
            out[name].add(value)
    return out


def apply_release(engine: Engine, train: TrainResult, name: str) -> dict[str, object]:
    """Apply every package of the release, module by module; module -> ApplyResult."""
    (outcome,) = [r for r in train.releases if r.name == name]
    results = {}
    for module in outcome.modules:
        if module.package:
            package = load(train.out_dir / module.package["path"])
            with engine.transaction() as tx:
                results[module.module] = tx.apply(package)
    return results


def apply_release_cli(train: TrainResult, name: str, pid: int, public: bytes,
                      capsys: pytest.CaptureFixture[str]) -> dict[str, dict]:
    """The same through `hotpatch apply --pid PID --trust KEY --json`; module -> its result document."""
    from hotpatch.cli.commands import main

    results = {}
    for module in _outcome(train, name).modules:
        if module.package:
            code = main(["apply", str(train.out_dir / module.package["path"]), "--pid", str(pid),
                         "--trust", public.hex(), "--json"])
            out, err = capsys.readouterr()
            assert code == 0, err
            (results[module.module],) = orjson.loads(out)["results"]
    return results


def test_the_product_follows_its_train_live(train: TrainResult, agent: AgentClient, wine_prefix: Path,
                                            built_fixtures: Path, keys: tuple[Path, bytes], agent_exe: Path,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # hotpatch 2 goes in through the command line, on the journal the engine of hotpatch 1 wrote
    monkeypatch.setenv("HOTPATCH_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("HOTPATCH_WINEPREFIX", str(wine_prefix))
    monkeypatch.setenv("HOTPATCH_AGENT", str(agent_exe))
    kinds = {r.name: r.kind for r in train.releases}
    assert [kinds[r.name] for r in RELEASES] == [r.kind for r in RELEASES]
    releases = {r.name: r for r in RELEASES}
    journal = Journal(tmp_path / "state")
    running: Product | None = None
    allowed: dict[str, set[int]] = {}
    try:
        for previous, release in zip((None, *RELEASES), RELEASES):
            kind = kinds[release.name]
            if kind != "hotpatch":  # a baseline: restart the product on it
                if running is not None:
                    running.stop()
                    assert all(running.seen()[n] <= allowed[n] for n in allowed), (running.seen(), allowed)
                running = Product(wine_prefix, built_fixtures, release)
                allowed = {n: {v} for n, v in expected(release).items()}
                running.wait(expected(release), 0)
                continue
            assert running is not None and previous is not None
            mark = running.host.mark()
            with agent.open(running.host.pid) as backend:
                engine = Engine(backend, journal, trusted_keys=[keys[1]])
                if release.name == "2026.03":
                    documents = apply_release_cli(train, release.name, running.host.pid, keys[1], capsys)
                else:
                    results = apply_release(engine, train, release.name)
                    assert results and all(r.status == "applied" and r.code_hash is not None
                                           and r.code_hash.state == "verified" for r in results.values())
                for name, values in mixes(previous, release).items():
                    allowed[name] |= values
                running.wait(expected(release), mark)
                # what the process runs now is exactly the release's packages, read back from its memory
                live = {p.module.lower(): p for p in engine.status().packages if p.phase == "applied"}
                assert {m: p.package_id for m, p in live.items()} == {
                    m.module: m.package["package_id"] for m in _outcome(train, release.name).modules if m.package}
                assert {p.state for p in live.values()} == {"ours"}
                if release.name == "2026.03":
                    # hotpatch 2 stacked over hotpatch 1: core's package replaced the older one in one commit
                    core = documents["core.dll"]
                    assert core["status"] == "applied" and core["sequence"] == 2
                    assert core["replaced"] == _package_id(train, "2026.02", "core.dll")
                    assert core["commit"] is not None
                    assert documents["util.dll"]["replaced"] is None
                if release.name == "2026.06":
                    _refuses_other_baselines(engine, train, built_fixtures, releases, running, keys[0])
        assert running is not None
        # a process on the July baseline takes no package of an older cycle
        with agent.open(running.host.pid) as backend:
            engine = Engine(backend, journal, trusted_keys=[keys[1]])
            package = load(train.out_dir / _outcome(train, "2026.06").modules[0].package["path"])
            with pytest.raises(StepFailedError) as info, engine.transaction() as tx:
                tx.apply(package)
            assert isinstance(info.value.cause, IdentityMismatchError)
            assert "restart onto that baseline is needed" in str(info.value) and "product/2026.05" in str(info.value)
        running.wait(expected(releases["2026.07"]), running.host.mark())
    finally:
        if running is not None:
            running.stop()
    assert all(running.seen()[n] <= allowed[n] for n in allowed), (running.seen(), allowed)


def _refuses_other_baselines(engine: Engine, train: TrainResult, fixtures: Path, releases: dict[str, Release],
                             running: Product, key_path: Path) -> None:
    """On the May baseline with June's hotpatch in: a package of the April cycle (util.dll is the
    same file in April and May, so only the baseline id tells) is refused, the process unchanged."""
    april, june = releases["2026.04"], releases["2026.06"]
    stale = build_package(diff(release_dir(fixtures, april) / "util.dll", release_dir(fixtures, june) / "util.dll"),
                          sequence=2, baseline_id="product/2026.04")
    stale = loads(dumps(stale, load_private_key(key_path)))
    mark = running.host.mark()
    with pytest.raises(StepFailedError) as info, engine.transaction() as tx:
        tx.apply(stale)
    assert isinstance(info.value.cause, OtherBaselineError) and info.value.undone
    assert "a restart onto baseline product/2026.04 is needed" in str(info.value)
    running.wait(expected(june), mark)


def _outcome(train: TrainResult, name: str):
    (outcome,) = [r for r in train.releases if r.name == name]
    return outcome


def _package_id(train: TrainResult, release: str, module: str) -> str:
    (found,) = [m.package["package_id"] for m in _outcome(train, release).modules if m.module == module]
    return found
