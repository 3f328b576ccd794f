"""Commit pause of live patches: 1, 10 and 100 patch sites on a host with 16 threads, under Wine.

The floor is measured in the same run: suspending and resuming every thread
of the same process with nothing written (the agent's FLOOR request). The
pause is the agent's own QueryPerformanceCounter measurement from the first
suspend to the last resume; wall time is reported but never gated on.
Sites are forced to rel32 jumps (which need the threads stopped); the
padding strategy is measured too: it commits with no thread suspended.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch.apply.agent import AgentClient
from hotpatch.apply.engine import Engine
from hotpatch.apply.journal import Journal
from hotpatch.diff.compare import diff
from hotpatch.package.builder import build_package
from hotpatch.package.format import package_id_of
from hotpatch.package.model import Package, Strategy
from tests.support.hosts import Host

THREADS = 16
ROUNDS = 9


@pytest.fixture(scope="module")
def many(built_fixtures: Path) -> tuple[Path, Package]:
    baseline = built_fixtures / "many_functions" / "baseline.dll"
    package = build_package(diff(baseline, built_fixtures / "many_functions" / "patched.dll"))
    assert len(package.sites) == 100
    return baseline, package


@pytest.fixture(scope="module")
def live(many, agent_exe, wine_prefix) -> Iterator[tuple[Host, AgentClient]]:  # type: ignore[no-untyped-def]
    host = Host(wine_prefix, many[0], ["f000:2", "f050:2", "f099:2"], threads=THREADS)
    client = AgentClient.start(agent_exe, prefix=wine_prefix)
    try:
        yield host, client
    finally:
        client.close()
        host.stop()


def _subset(package: Package, count: int, strategy: Strategy) -> Package:
    sites = []
    for site in package.sites[:count]:
        if strategy is Strategy.REL32_JMP:
            site = dataclasses.replace(site, strategy=Strategy.REL32_JMP, fallbacks=(), padding_rva=None,
                                       padding_expected=b"")
        sites.append(site)
    return dataclasses.replace(package, sites=tuple(sites), signature=None, signer_public_key=None)


def _pauses(live, package: Package, tmp_path: Path, rounds: int = ROUNDS) -> tuple[list[float], list[bool]]:  # type: ignore[no-untyped-def]
    host, client = live
    pauses, suspended = [], []
    with client.open(host.pid) as backend:
        engine = Engine(backend, Journal(tmp_path), allow_unsigned=True, trusted_keys=())  # unsigned on purpose
        for _ in range(rounds):
            with engine.transaction() as tx:
                result = tx.apply(package)
            pauses.append(result.commit.pause_us)
            suspended.append(result.commit.suspended)
            with engine.transaction() as tx:
                tx.rollback(package_id_of(package))
    return pauses, suspended


def _floor(live) -> float:  # type: ignore[no-untyped-def]
    host, client = live
    with client.open(host.pid) as backend:
        return statistics.median(backend.suspend_resume_floor().pause_us for _ in range(ROUNDS))


@pytest.mark.parametrize("count", [1, 10, 100])
def test_commit_pause_against_the_floor(benchmark, live, many, tmp_path: Path, count: int) -> None:  # type: ignore[no-untyped-def]
    package = _subset(many[1], count, Strategy.REL32_JMP)
    floor_before = _floor(live)
    pauses, suspended = benchmark.pedantic(_pauses, args=(live, package, tmp_path), rounds=1, iterations=1)
    floor = statistics.median([floor_before, _floor(live)])
    assert all(suspended)
    median = statistics.median(pauses)
    benchmark.extra_info.update(sites=count, threads=THREADS, pause_median_us=median, floor_median_us=floor,
                                ratio_to_floor=round(median / floor, 2))
    print(f"\n{count} sites, {THREADS} threads: commit pause median {median:.0f} us, floor {floor:.0f} us, "
          f"ratio {median / floor:.2f}")


def test_padding_strategy_needs_no_suspension(benchmark, live, many, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    padded = tuple(s for s in many[1].sites if s.strategy is Strategy.SHORT_JMP_PADDING)
    assert len(padded) >= 10, "most of the hundred functions have padding in front of them"
    package = dataclasses.replace(many[1], sites=padded)
    pauses, suspended = benchmark.pedantic(_pauses, args=(live, package, tmp_path, 5), rounds=1, iterations=1)
    assert not any(suspended)
    benchmark.extra_info.update(sites=len(padded), pause_median_us=statistics.median(pauses))
    print(f"\n{len(padded)} sites, padding strategy: threads suspended in 0 of {len(suspended)} commits")
