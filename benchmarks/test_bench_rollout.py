"""Rollout figures: the simulation at fleet scale, and the real LocalCluster's overhead per target.

- 10,000 simulated hosts in 12 time zones and 50 availability groups, windows
  01:00-05:00 local, canary / 10 % / rest, 5 in flight per group, over a
  30-day horizon: CPU seconds (the budget is one minute), time to full patch,
  the most hosts of one group unavailable at once, tasks that ran past their
  window (hosts start only with apply + soak of window left; the same run
  without that check for comparison); the same fleet with a bad package
  (fails health on 30 % and on 100 % of hosts): blast radius; and with 1 % of
  hosts vanishing mid-apply (read back, none patched twice).
- A rollout over a LocalCluster of 3 workers (3 hosts, one Wine host process
  each, one at a time) against the bare host apply of the same package (the
  code ``hotpatch apply`` runs, agent start included): overhead per target.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from distributed import Client

from hotpatch.apply.agent import AgentClient
from hotpatch.apply.engine import Engine
from hotpatch.apply.health import HealthSpec
from hotpatch.apply.journal import Journal
from hotpatch.package.format import save
from hotpatch.rollout.executor_dask import local_cluster
from hotpatch.rollout.executor_sim import SimConfig, make_fleet, simulate
from hotpatch.rollout.hostwork import HostRequest, host_task
from hotpatch.rollout.orchestrator import Options, start
from hotpatch.rollout.plan import FailurePolicy, WaveSpec
from tests.support.hosts import Host
from tests.support.live import CALLS
from tests.support.packages import simple

pytestmark = [pytest.mark.slow]

WAVES = (WaveSpec("canary", count=1), WaveSpec("ten percent", percent=10), WaveSpec("rest", rest=True))
START = datetime(2026, 3, 2, tzinfo=UTC).timestamp()


def _sim(config: SimConfig, failure: FailurePolicy | None = None) -> dict:
    return simulate(make_fleet(10_000), WAVES, config, start=START, horizon=30 * 86400, max_in_flight=5,
                    failure=failure)


def test_simulation_of_10000_hosts_over_30_days(benchmark) -> None:  # type: ignore[no-untyped-def]
    clean = benchmark.pedantic(_sim, args=(SimConfig(),), rounds=1, iterations=1)
    assert clean["status"] == "completed" and clean["cpu_s"] < 60
    bad30 = _sim(SimConfig(bad_share=0.3, seed=3))
    bad100 = _sim(SimConfig(bad_share=1.0, seed=3))
    vanish = _sim(SimConfig(vanish_share=0.01, seed=4), FailurePolicy("host", 1000))
    careless = _sim(SimConfig(check_window_left=False))
    assert vanish["patched_twice"] == 0 and vanish["status"] == "completed"
    print(f"\nclean: {clean['cpu_s']:.2f} s CPU, full patch after {clean['time_to_full_patch_h']:.1f} h, "
          f"max {clean['max_unavailable_in_a_group']} host(s) of a group unavailable, "
          f"{clean['overran_window']} task(s) past their window's end")
    print(f"without the window-left check: full patch after {careless['time_to_full_patch_h']:.1f} h, "
          f"{careless['overran_window']} task(s) past their window's end")
    print(f"bad on 30 %: {bad30['status']}, blast radius {bad30['blast_radius']}; "
          f"bad on 100 %: {bad100['status']}, blast radius {bad100['blast_radius']}")
    print(f"1 % vanishing: {vanish['status']}, {vanish['vanished']} vanished and read back, {vanish['states']}, "
          f"patched twice {vanish['patched_twice']}, full patch after {vanish['time_to_full_patch_h']:.1f} h, "
          f"{vanish['cpu_s']:.2f} s CPU")
    benchmark.extra_info.update(clean=clean, bad30=bad30, bad100=bad100, vanish=vanish, careless=careless)


def test_localcluster_overhead_per_target_over_a_bare_apply(  # type: ignore[no-untyped-def]
    benchmark, tmp_path: Path, built_fixtures: Path, wine_prefix: Path, agent_exe: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOTPATCH_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("HOTPATCH_WINEPREFIX", str(wine_prefix))
    monkeypatch.setenv("HOTPATCH_AGENT", str(agent_exe))
    dll = built_fixtures.resolve() / "body_change" / "baseline.dll"
    package = tmp_path / "scale.hpk"
    save(simple(dll), package)
    hosts = {f"host-{i}": Host(wine_prefix, dll, CALLS, threads=2) for i in range(3)}
    try:
        bare = []
        for host in hosts.values():
            request = HostRequest(package.read_bytes(), (), True, None, (host.pid,), HealthSpec(soak=0), True)
            began = time.perf_counter()
            assert host_task("apply", request)["outcome"] == "applied"
            bare.append(time.perf_counter() - began)
            _roll_back(agent_exe, wine_prefix, host.pid, tmp_path / "state")
        lines = ", ".join(f'{{name = "{n}", group = "one", pids = [{h.pid}]}}' for n, h in hosts.items())
        plan = tmp_path / "plan.toml"
        plan.write_text(f'name = "bench"\n[package]\npath = "{package}"\nallow_unsigned = true\n'
                        f"[inventory]\nhosts = [{lines}]\n[[waves]]\nname = \"all\"\nrest = true\n"
                        '[health]\nsoak = "0s"\n')
        began = time.perf_counter()
        with local_cluster(list(hosts), processes=False) as cluster, Client(cluster) as client:
            cluster_s = time.perf_counter() - began

            def rollout() -> float:
                began = time.perf_counter()
                assert start(plan, Options(db=tmp_path / "db.sqlite", client=client)) == ("bench", "completed")
                return time.perf_counter() - began

            total = benchmark.pedantic(rollout, rounds=1, iterations=1)
        per_target = total / len(hosts)
        overhead = per_target - sum(bare) / len(bare)
        print(f"\nbare host apply {sum(bare) / len(bare) * 1000:.0f} ms per target; rollout {per_target * 1000:.0f} ms "
              f"per target (3 hosts one after the other); overhead {overhead * 1000:+.0f} ms per target; "
              f"cluster start {cluster_s:.1f} s")
        benchmark.extra_info.update(bare_s=bare, rollout_s=total, per_target_overhead_s=overhead, cluster_s=cluster_s)
    finally:
        for host in hosts.values():
            host.stop()


def _roll_back(agent_exe: Path, prefix: Path, pid: int, state: Path) -> None:
    with AgentClient.start(agent_exe, prefix=prefix) as client, client.open(pid) as backend:
        with Engine(backend, Journal(state)).transaction() as tx:
            tx.rollback()
