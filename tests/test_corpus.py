"""The real-fix corpus (tests/corpus/): Debian 12's CVE patches to libpng, lua and c-ares, one DLL per step.

Asserted for every fix: the safety property (a fix expected NEW_BASELINE never
gets HOTPATCH); for every fix that gets HOTPATCH: the package builds, the
emulator agrees where the fix has emulator calls, and it goes into a running
multi-threaded host and back out with the probes' outputs switching both ways.
An expected-HOTPATCH fix that gets NEW_BASELINE is a miss, listed with its
reasons in docs/CORPUS.md (`make corpus`); the test asserts it has reasons, not the
verdict, so that a change of the verdict logic elsewhere does not turn CI red.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.corpus.build import BuiltLibrary, build_corpus, default_out
from tests.corpus.measure import Probes, build_and_verify, judge, live_switch, probe_values
from tests.corpus.model import Fix, load_corpus

pytestmark = [pytest.mark.corpus, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
FIXES = [fix for lib in load_corpus() for fix in lib.fixes]
DOC = ROOT / "docs" / "CORPUS.md"


@pytest.fixture(scope="session")
def corpus() -> dict[str, BuiltLibrary]:
    return {b.library.name: b for b in build_corpus()}


@pytest.fixture(scope="session")
def step_values(corpus: dict[str, BuiltLibrary], wine_prefix: Path) -> dict[Path, Probes]:
    out = default_out().resolve()
    return {step: probe_values(out, wine_prefix, built, step) for built in corpus.values() for step in built.steps}


@functools.cache
def _verdict(base: Path, patched: Path) -> tuple[str, tuple[str, ...]]:
    return judge(base, patched)


def _pair(corpus: dict[str, BuiltLibrary], fix: Fix) -> tuple[Path, Path]:
    built = corpus[fix.library]
    (ordered,) = [f for f in built.library.fixes if f.name == fix.name]
    return built.pair(ordered)


def test_corpus_has_fifteen_fixes_with_reasoning() -> None:
    assert len(FIXES) >= 15
    assert {f.library for f in FIXES} == {"libpng", "lua", "cares"}
    for fix in FIXES:
        assert fix.cve.startswith("CVE-") and fix.patches and fix.source, fix.id
        assert len(fix.why) > 40, f"{fix.id}: the expected verdict needs its reasoning"


@pytest.mark.parametrize("fix", FIXES, ids=lambda f: f.id)
def test_no_unsafe_hotpatch(fix: Fix, corpus: dict[str, BuiltLibrary]) -> None:
    verdict, reasons = _verdict(*_pair(corpus, fix))
    if fix.expected == "NEW_BASELINE" and fix.detectable:
        assert verdict == "NEW_BASELINE", f"{fix.id} needs a new baseline ({fix.why}) but got HOTPATCH"
    elif fix.expected == "NEW_BASELINE":
        # The reason leaves no trace in the binaries (an ownership rule changes): a HOTPATCH here is the
        # product's known blind spot, and the table must list it as unsafe rather than let it pass silently.
        if verdict == "HOTPATCH":
            unsafe = DOC.read_text().partition("## Unsafe")[2]
            assert f"**{fix.id}**" in unsafe, f"{fix.id} gets an unsafe HOTPATCH that docs/CORPUS.md does not list"
    else:
        assert verdict in ("HOTPATCH", "NEW_BASELINE") and (verdict == "HOTPATCH" or reasons)


@pytest.fixture(scope="session")
def built(corpus: dict[str, BuiltLibrary], tmp_path_factory: pytest.TempPathFactory,
          ) -> Callable[[Fix], tuple[Path | None, str, str]]:
    """Each fix's package, built and verified once per session: the live test and the emulator test share it."""
    where = tmp_path_factory.mktemp("packages")
    done: dict[str, tuple[Path | None, str, str]] = {}

    def get(fix: Fix) -> tuple[Path | None, str, str]:
        if fix.id not in done:
            done[fix.id] = build_and_verify(fix, *_pair(corpus, fix), where / fix.library)
        return done[fix.id]
    return get


def _documented_refusal(fix: Fix, build: str) -> None:
    """Known product bug: diff says HOTPATCH, the builder refuses (a reference kind it cannot carry).
    Never silent: docs/CORPUS.md must list the same refusal."""
    row = next((line for line in DOC.read_text().splitlines() if line.startswith(f"| {fix.id} |")), "")
    assert build.startswith("failed (exit 3)") and build.split(":", 1)[1].strip() in row, (build, row)


def test_every_probe_gives_one_value_on_every_step(step_values: dict[Path, Probes]) -> None:
    """The live runs wait for values to switch: a probe whose value varies from call to call (the unfixed
    libpng steps' reads of freed memory over the process heap) would make them wait in vain or guess.
    libpng's classic-API probes run over an arena of their own (tests/corpus/libpng/probe.c) for that."""
    varying = {f"{step.parent.name}: {probe}" for step, values in step_values.items()
               for probe, value in values.items() if value is None}
    assert not varying, sorted(varying)


@pytest.mark.parametrize("fix", [f for f in FIXES if f.expected == "HOTPATCH"], ids=lambda f: f.id)
def test_hotpatch_fix_builds_verifies_and_switches_live(
    fix: Fix, corpus: dict[str, BuiltLibrary], wine_prefix: Path, step_values: dict[Path, Probes],
    built: Callable[[Fix], tuple[Path | None, str, str]],
) -> None:
    base, patched = _pair(corpus, fix)
    verdict, reasons = _verdict(base, patched)
    if verdict != "HOTPATCH":
        # A miss (a reboot the product should have avoided): never silent, each blocking item is named.
        # docs/CORPUS.md (make corpus) lists the misses; the verdict itself is not asserted here.
        assert verdict == "NEW_BASELINE" and reasons, f"{fix.id}: {verdict} without reasons"
        return
    before, after = step_values[base], step_values[patched]
    package, build, verify = built(fix)
    if package is None:
        _documented_refusal(fix, build)
        return
    assert build == "ok", build
    # "not run": the fix's file says why no emulator call reaches it; "cannot ... has no model": the emulator
    # lacks an import the calls need (lua's luaL_newstate seeds from _time64); both are in docs/CORPUS.md.
    assert verify.startswith(("equal", "not run")) or (verify.startswith("cannot") and "has no model" in verify), verify
    # One host, one apply, one rollback: a host that dies (by itself or by the patch) fails the test with its
    # exit code and last output, and so does a rollback refused because the pid now names another process.
    live, back = live_switch(default_out().resolve(), wine_prefix, corpus[fix.library], base, package, before, after)
    assert live.startswith(("switched (", "applied (no probe output changes)")) and "host " not in live, live
    assert back in ("switched back", "rolled back"), back


@pytest.mark.parametrize("fix", [f for f in FIXES if f.library == "libpng" and f.verify], ids=lambda f: f.id)
def test_libpng_fix_passes_verify_in_the_emulator(
    fix: Fix, corpus: dict[str, BuiltLibrary], built: Callable[[Fix], tuple[Path | None, str, str]],
) -> None:
    """The probes, called through the probe DLL mapped beside the step, compute the same with the package
    as on the fixed step (the emulator is deterministic, so this is asserted exactly, beside the live run)."""
    verdict, reasons = _verdict(*_pair(corpus, fix))
    if verdict != "HOTPATCH":
        assert verdict == "NEW_BASELINE" and reasons, f"{fix.id}: {verdict} without reasons"
        return
    package, build, verify = built(fix)
    if package is None:
        _documented_refusal(fix, build)
        return
    assert verify.startswith("equal"), verify
