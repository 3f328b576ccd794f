"""The simulated executor: a plan's own waves, enough window left for apply + soak, vanished hosts read back."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hotpatch.cli import main
from hotpatch.rollout.executor_sim import SimConfig, make_fleet, simulate, simulate_plan
from hotpatch.rollout.plan import WaveSpec, load_plan
from hotpatch.rollout.planner import assign_waves
from hotpatch.rollout.state import RolloutStore
from hotpatch.rollout.windows import Host, parse_window

START = datetime(2026, 3, 2, tzinfo=UTC).timestamp()
DAY = 86400.0

#: 24 hosts in 4 groups; two tagged canaries; waves that are not the simulation's defaults
PLAN = """
name = "sim"
[package]
path = "fix.hpk"
allow_unsigned = true
[inventory]
hosts = [{hosts}]
[defaults]
window = "daily 01:00-05:00"
module = "app.dll"
[[waves]]
name = "canaries"
tags = ["canary"]
[[waves]]
name = "three"
count = 3
[[waves]]
name = "half"
percent = 50
[[waves]]
name = "rest"
rest = true
[limits]
max_in_flight_per_group = 2
apply_time = "3m"
[health]
soak = "20m"
"""
ZONES = ("Europe/Paris", "Asia/Tokyo", "America/New_York", "Australia/Sydney")


def write_plan(tmp_path: Path) -> Path:
    hosts = []
    for i in range(24):
        tags = '["canary"]' if i in (5, 17) else "[]"
        hosts.append(f'{{name = "h{i:02d}", time_zone = "{ZONES[i % 4]}", group = "g{i % 4}", tags = {tags}}}')
    path = tmp_path / "plan.toml"
    path.write_text(PLAN.replace("{hosts}", ", ".join(hosts)))
    return path


def spans(history: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Per host, (started, ended) of each apply: from `applying` to the next state."""
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    began: dict[str, float] = {}
    for event in history:
        host = event["host"]
        if host in began:
            out[host].append((began.pop(host), event["time"]))
        if event["new"] == "applying":
            began[host] = event["time"]
    return out


def test_simulation_plays_the_plans_own_waves_in_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = load_plan(write_plan(tmp_path))
    store = RolloutStore(":memory:")
    figures = simulate_plan(plan, SimConfig(jitter=0.0), start=START, horizon=30 * DAY, store=store)
    assert figures["status"] == "completed" and figures["states"] == {"applied": 24}
    assert figures["waves"] == [2, 3, 12, 7]  # tags, a count, 50 % of 24, the rest: the plan's, not 1/10 %/rest
    assert figures["max_unavailable_in_a_group"] == 2  # the plan's limit
    waves = assign_waves(plan.waves, plan.hosts)
    assert {h.name for h in waves[0]} == {"h05", "h17"}
    applies = spans(store.history("sim-1"))
    for earlier, later in zip(waves, waves[1:]):
        assert max(applies[h.name][-1][1] for h in earlier) <= min(applies[h.name][0][0] for h in later)
    # each apply took the plan's apply time and soak (no jitter), not the simulation's defaults
    assert {round(end - begin) for runs in applies.values() for begin, end in runs} == {23 * 60}

    # the command plays the same plan
    assert main(["rollout", "simulate", "--plan", str(write_plan(tmp_path)), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["waves"] == [2, 3, 12, 7] and printed["status"] == "completed"
    # over a made-up fleet, a plan whose waves name tags that no made-up host has is refused in one line
    assert main(["rollout", "simulate", "--plan", str(write_plan(tmp_path)), "--hosts", "100"]) == 2
    assert capsys.readouterr().err == "hotpatch: error: waves[0]: empty wave ('canaries' gets no host)\n"
    assert main(["rollout", "simulate", "--plan", str(write_plan(tmp_path)), "--soak", "60"]) == 2
    assert capsys.readouterr().err == "hotpatch: error: --soak: the plan sets it; leave it out with --plan\n"


@pytest.mark.parametrize("jitter", [0.0, 0.2])
def test_a_host_starts_only_with_enough_window_left_for_its_apply_and_soak(jitter: float) -> None:
    # two groups of 45 hosts in one zone, 3 at a time: a 4-hour night fits 14 rounds of 17 minutes, not 15
    window = parse_window("daily 01:00-05:00")
    hosts = [Host(name=f"h{i:02d}", time_zone=ZONES[i % 2], group=f"g{i % 2}", window=window, module="app.dll")
             for i in range(90)]
    waves = (WaveSpec("canary", count=1), WaveSpec("rest", rest=True))
    config = SimConfig(jitter=jitter)
    store = RolloutStore(":memory:")
    figures = simulate(hosts, waves, config, start=START, horizon=30 * DAY, max_in_flight=3, store=store)
    assert figures["status"] == "completed"
    by_name = {h.name: h for h in hosts}
    starts = [(name, begin) for name, runs in spans(store.history("sim-1")).items() for begin, _ in runs]
    assert len(starts) == 90
    for name, begin in starts:
        opens, closes = by_name[name].next_open(begin)
        assert opens == begin and closes - begin >= config.task_time, name
    if jitter == 0.0:
        assert figures["overran_window"] == 0
    # without the check, hosts start in the last minutes of their window and run past its end
    careless = simulate(hosts, waves, SimConfig(jitter=jitter, check_window_left=False), start=START,
                        horizon=30 * DAY, max_in_flight=3)
    assert careless["overran_window"] > figures["overran_window"]


def test_hosts_that_vanish_mid_apply_are_read_back_before_any_retry_and_never_patched_twice() -> None:
    hosts = make_fleet(400, groups=8)
    waves = (WaveSpec("canary", count=1), WaveSpec("ten", percent=10), WaveSpec("rest", rest=True))
    store = RolloutStore(":memory:")
    figures = simulate(hosts, waves, SimConfig(vanish_share=0.15, seed=5), start=START, horizon=30 * DAY,
                       max_in_flight=3, store=store)
    assert figures["status"] == "completed" and figures["states"] == {"applied": 400}
    assert figures["vanished"] > 20 and figures["patched_twice"] == 0 and figures["failures"] == 0
    assert figures["blast_radius"] == 400
    after_read_back: dict[str, int] = defaultdict(int)
    for host in {e["host"] for e in store.history("sim-5") if e["new"] == "unknown"}:
        states = [e["new"] for e in store.history("sim-5", host)]
        lost = states.index("unknown")
        # lost mid-apply, then read back from memory before anything else is sent
        assert states[lost - 1: lost + 2] == ["applying", "unknown", "checking"], states
        after_read_back[states[lost + 2]] += 1
        assert states[-1] == "applied"
    assert sum(after_read_back.values()) == figures["vanished"]
    # cut short before any commit: pending again; in some or all processes: the apply goes on from there
    assert after_read_back["pending"] > 0 and after_read_back["applying"] > 0
    assert set(after_read_back) == {"pending", "applying"}
