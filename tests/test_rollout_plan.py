"""Rollout plans, windows, the planner, the SQLite state machine and the simulated executor (no processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hotpatch.cli import main
from hotpatch.errors import PlanError, RolloutError, RolloutLockedError
from hotpatch.rollout.executor_sim import SimConfig, make_fleet, simulate
from hotpatch.rollout.plan import FailurePolicy, WaveSpec, load_plan
from hotpatch.rollout.planner import Planner, assign_waves
from hotpatch.rollout.runner import Completion, Runner
from hotpatch.rollout.state import RolloutStore
from hotpatch.rollout.windows import Host, parse_window, zone

GOOD = """
name = "fix"
[package]
path = "fix.hpk"
allow_unsigned = true
[inventory]
hosts = [
  {name = "a", time_zone = "Europe/Paris", group = "web", module = "app.dll"},
  {name = "b", time_zone = "Asia/Tokyo", group = "web", module = "app.dll"},
  {name = "c", time_zone = "America/New_York", group = "db", pids = [42]},
]
[defaults]
window = "daily 01:00-05:00"
[[waves]]
name = "canary"
count = 1
[[waves]]
name = "rest"
rest = true
[health]
checks = ["alive", "sites", "cmd:true"]
soak = "5m"
[failure]
rollback = "wave"
"""


def plan_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plan.toml"
    path.write_text(text)
    return path


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


# --------------------------------------------------------------------------
# Plans: every bad field is one line naming it
# --------------------------------------------------------------------------


def test_good_plan_parses_with_defaults_applied(tmp_path: Path) -> None:
    plan = load_plan(plan_file(tmp_path, GOOD))
    assert [h.name for h in plan.hosts] == ["a", "b", "c"]
    assert plan.hosts[2].pids == (42,) and plan.hosts[0].window.text == "daily 01:00-05:00"
    assert plan.health.soak == 300 and plan.failure == FailurePolicy("wave", 0)
    assert [len(w) for w in assign_waves(plan.waves, plan.hosts)] == [1, 2]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (('time_zone = "Asia/Tokyo"', 'time_zone = "Mars/Base"'), "inventory.hosts[1].time_zone: unknown time zone"),
        (('window = "daily 01:00-05:00"', 'window = "sometimes"'), "defaults.window: cannot parse window"),
        (('window = "daily 01:00-05:00"', 'window = "Mon-Fry 01:00-05:00"'), "defaults.window: not a day"),
        (('window = "daily 01:00-05:00"', 'window = "daily 25:00-05:00"'), "defaults.window: not a time of day"),
        (("count = 1", "count = 0"), "waves[0].count: empty wave"),
        (("count = 1", 'hosts = ["zz"]'), "waves[0].hosts: unknown host 'zz'"),
        (("count = 1", "count = 1\npercent = 5"), "waves[0]: a wave takes exactly one"),
        (('rollback = "wave"', 'rollback = "sometimes"'), "failure.rollback: 'sometimes' is not one of"),
        (('soak = "5m"', 'soak = "forever"'), "health.soak: soak: not a duration"),
        (('"cmd:true"', '"telepathy"'), "health.checks[2]: unknown health check"),
        (('path = "fix.hpk"', 'path = ""'), "package.path: missing"),
        (('pids = [42]', 'pids = [-1]'), "inventory.hosts[2].pids: expected a list of positive"),
        (('pids = [42]', 'colour = "red"'), "inventory.hosts[2].colour: unknown field"),
        (('soak = "5m"', 'soak = "5h"'), "inventory.hosts[0].window: 'daily 01:00-05:00' of host 'a' is shorter"),
        (("[failure]", '[limits]\napply_time = "soon"\n[failure]'), "limits.apply_time: apply_time: not a duration"),
        (("[failure]", '[tls]\ncert = "none.pem"\n[failure]'), "tls.ca_file: missing"),
    ],
)
def test_bad_field_is_named(tmp_path: Path, change: tuple[str, str], field: str) -> None:
    text = GOOD.replace(*change)
    with pytest.raises(PlanError) as info:
        load_plan(plan_file(tmp_path, text))
    assert str(info.value).startswith(field), info.value
    assert "\n" not in str(info.value)


def test_overlapping_and_empty_waves_are_refused() -> None:
    hosts = [Host(name=n, group=g, module="m") for n, g in (("a", "x"), ("b", "y"))]
    tagged = [Host(name="a", tags=("eu",), module="m"), Host(name="b", tags=("eu",), module="m")]
    with pytest.raises(PlanError, match=r"waves\[1\]: host 'a' is in an earlier wave too \(overlapping\)"):
        assign_waves((WaveSpec("named", hosts=("a",)), WaveSpec("eu", tags=("eu",))), tagged)
    with pytest.raises(PlanError, match=r"waves\[1\]: empty wave"):
        assign_waves((WaveSpec("all", percent=100), WaveSpec("rest", rest=True)), hosts)


def test_cli_bad_plan_is_one_line_exit_2_and_nothing_recorded(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db = tmp_path / "db.sqlite"
    plan = plan_file(tmp_path, GOOD.replace('"Asia/Tokyo"', '"Nowhere/Atlantis"'))
    assert main(["rollout", str(plan), "--db", str(db), "--no-live"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("hotpatch: error: inventory.hosts[1].time_zone: unknown time zone 'Nowhere/Atlantis'")
    assert not db.exists()


def test_cli_package_that_does_not_verify_is_refused_before_any_host(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "fix.hpk").write_bytes(b"HPK\0" + bytes(60))
    plan = plan_file(tmp_path, GOOD)
    assert main(["rollout", str(plan), "--db", str(tmp_path / "db.sqlite"), "--no-live"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hotpatch: error: package.path: fix.hpk: ") and "\n" not in err
    unsigned = plan_file(tmp_path, GOOD.replace("allow_unsigned = true", 'trust = ["' + "ab" * 32 + '"]'))
    assert main(["rollout", str(unsigned), "--db", str(tmp_path / "db.sqlite"), "--no-live"]) == 2
    assert capsys.readouterr().err.startswith("hotpatch: error: package.path: ")


# --------------------------------------------------------------------------
# Windows in local time
# --------------------------------------------------------------------------


def test_window_follows_the_hosts_time_zone_and_daylight_saving() -> None:
    window = parse_window("daily 01:00-05:00")
    paris = zone("Europe/Paris")
    # 2026-03-28 is a winter Saturday in Paris (UTC+1); 2026-03-29 02:00 jumps to 03:00 (UTC+2)
    assert window.next_open(paris, ts(2026, 3, 27, 23, 30)) == (ts(2026, 3, 28, 0, 0), ts(2026, 3, 28, 4, 0))
    start, end = window.next_open(paris, ts(2026, 3, 28, 12, 0))
    assert (start, end) == (ts(2026, 3, 29, 0, 0), ts(2026, 3, 29, 3, 0))  # a wall-clock span: 3 h that night
    assert window.is_open(zone("Asia/Tokyo"), ts(2026, 6, 1, 17, 0))  # 02:00 in Tokyo
    assert not window.is_open(zone("Asia/Tokyo"), ts(2026, 6, 1, 21, 0))


def test_window_days_and_midnight_crossing() -> None:
    window = parse_window("Sat,Sun 22:00-02:00; Mon-Fri 03:00-04:00")
    utc = zone("UTC")
    assert window.is_open(utc, ts(2026, 6, 7, 1, 0))  # Sunday 01:00: Saturday's span runs past midnight
    assert not window.is_open(utc, ts(2026, 6, 5, 23, 0))  # Friday 23:00
    assert window.next_open(utc, ts(2026, 6, 5, 23, 0))[0] == ts(2026, 6, 6, 22, 0)
    assert parse_window("always").is_open(utc, 0)


# --------------------------------------------------------------------------
# The planner
# --------------------------------------------------------------------------


def test_planner_keeps_waves_in_order_and_groups_under_their_limit() -> None:
    hosts = [Host(name=f"h{i}", group=f"g{i % 2}", module="m") for i in range(8)]
    waves = assign_waves((WaveSpec("canary", count=1), WaveSpec("rest", rest=True)), hosts)
    planner = Planner(waves, max_in_flight=2)
    planner.add_pending([h.name for h in hosts], 0)
    assert [h.name for h in planner.ready(0)] == ["h0"]
    assert planner.ready(1) == []  # the canary is in flight: the next wave waits
    planner.finished("h0")
    started = [h.name for h in planner.ready(2)]
    assert len(started) == 4 and {planner.hosts[n].group for n in started} == {"g0", "g1"}
    planner.finished(started[0])
    assert len(planner.ready(3)) == 1
    assert max(planner.max_seen.values()) == 2


def test_planner_waits_for_the_window_and_wakes_when_it_opens() -> None:
    tokyo = Host(name="t", time_zone="Asia/Tokyo", window=parse_window("daily 02:00-03:00"), module="m")
    planner = Planner([[tokyo]], max_in_flight=1)
    midnight = ts(2026, 6, 1, 15, 0)
    planner.add_pending(["t"], midnight)
    assert planner.ready(midnight) == []
    assert planner.next_wake() == midnight + 2 * 3600
    assert [h.name for h in planner.ready(midnight + 2 * 3600)] == ["t"]


def test_planner_starts_a_host_only_with_enough_window_left_for_apply_and_soak() -> None:
    tokyo = Host(name="t", time_zone="Asia/Tokyo", window=parse_window("daily 02:00-03:00"), module="m")
    planner = Planner([[tokyo]], max_in_flight=1, task_time=20 * 60)
    late = ts(2026, 6, 1, 17, 45)  # 02:45 in Tokyo: the window is open, 15 minutes of it are left
    planner.add_pending(["t"], late)
    assert planner.ready(late) == []
    tomorrow = ts(2026, 6, 2, 17, 0)  # 02:00 the next night
    assert planner.next_wake() == tomorrow
    assert [h.name for h in planner.ready(tomorrow)] == ["t"]
    # 20 minutes left is enough
    early = Planner([[tokyo]], max_in_flight=1, task_time=20 * 60)
    early.add_pending(["t"], ts(2026, 6, 1, 17, 40))
    assert [h.name for h in early.ready(ts(2026, 6, 1, 17, 40))] == ["t"]


# --------------------------------------------------------------------------
# State, lock, and a killed orchestrator (with the simulated executor)
# --------------------------------------------------------------------------


def _store(tmp_path: Path, hosts: list[Host]) -> RolloutStore:
    store = RolloutStore(tmp_path / "db.sqlite")
    waves = assign_waves((WaveSpec("canary", count=1), WaveSpec("rest", rest=True)), hosts)
    store.create("r", {}, "f", "pkg", [(h.name, w, h.group, h.to_json()) for w, m in enumerate(waves) for h in m], 0)
    return store


def test_state_machine_refuses_a_transition_it_does_not_have(tmp_path: Path) -> None:
    store = _store(tmp_path, [Host(name=n, module="m") for n in "ab"])
    with pytest.raises(RolloutError, match="no transition pending -> applied"):
        store.transition("r", "a", "applied", 1)
    with pytest.raises(RolloutError, match="already exists"):
        store.create("r", {}, "f", "pkg", [], 0)


def test_second_orchestrator_is_refused_while_the_first_lives(tmp_path: Path) -> None:
    store = _store(tmp_path, [Host(name=n, module="m") for n in "ab"])
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from hotpatch.rollout.state import RolloutStore;"
        "RolloutStore(sys.argv[2]).acquire('r', 'the first'); print('held', flush=True); time.sleep(60)"),
        str(Path(__file__).resolve().parent.parent), str(tmp_path / "db.sqlite")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RolloutLockedError, match=f"held by the first \\(pid {holder.pid} on "):
            store.acquire("r", "the second")
    finally:
        holder.kill()
        holder.wait()
    store.acquire("r", "the second")  # the holder is dead: taken over
    assert store.holder("r")["pid"] == os.getpid()


class Scripted:
    """An executor whose outcomes the test decides (a list: one per call, the last one repeats)."""

    def __init__(self, outcomes: dict[tuple[str, str], str | list[str]]) -> None:
        self.outcomes = outcomes
        self.clock = 0.0
        self.queue: list[Completion] = []
        self.sent: list[tuple[str, str]] = []

    def now(self) -> float:
        return self.clock

    def submit(self, host: Host, action: str) -> None:
        self.sent.append((host.name, action))
        outcome = self.outcomes.get((host.name, action), {"apply": "applied", "rollback": "rolled_back",
                                                          "status": "original"}[action])
        if isinstance(outcome, list):
            outcome = outcome.pop(0) if len(outcome) > 1 else outcome[0]
        self.queue.append(Completion(host.name, action, outcome, {"committed": action == "apply"}))

    def wait(self, until: float | None) -> list[Completion]:
        self.clock += 1
        return [self.queue.pop(0)] if self.queue else []


def _runner(store: RolloutStore, executor: Scripted, rollback: str = "host") -> Runner:
    return Runner(store, "r", executor, max_in_flight=1, rollback_policy=rollback, max_failed=0)


def test_resumed_rollout_reads_back_what_was_in_flight_before_any_retry(tmp_path: Path) -> None:
    hosts = [Host(name=n, module="m") for n in "abc"]
    store = _store(tmp_path, hosts)
    # the first orchestrator sent a's apply and died: a is left "applying"
    store.transition("r", "a", "applying", 1)
    executor = Scripted({("a", "status"): "ours"})
    assert _runner(store, executor).run() == "completed"
    assert executor.sent[:2] == [("a", "status"), ("a", "apply")]  # read back first; then the gate runs again
    assert executor.sent.count(("b", "apply")) == 1 and executor.sent.count(("c", "apply")) == 1
    states = [e["new"] for e in store.history("r", "a")]
    assert states == ["pending", "applying", "unknown", "checking", "applying", "applied"]


def test_lost_worker_marks_unknown_and_reads_back_from_memory(tmp_path: Path) -> None:
    store = _store(tmp_path, [Host(name=n, module="m") for n in "ab"])
    executor = Scripted({("a", "apply"): ["lost", "applied"], ("a", "status"): "original"})
    # the read-back says "original": a is pending again, and the retry is applied
    assert _runner(store, executor).run() == "completed"
    assert [e["new"] for e in store.history("r", "a")] == [
        "pending", "applying", "unknown", "checking", "pending", "applying", "applied"]


def test_apply_cut_short_between_processes_is_read_back_partial_and_finished_not_failed(tmp_path: Path) -> None:
    store = _store(tmp_path, [Host(name=n, module="m") for n in "ab"])
    # a's worker died after the first of its processes was patched: the read-back finds the package in some
    # processes only; the host task finishes the apply there (it skips the processes that hold it)
    executor = Scripted({("a", "apply"): ["lost", "applied"], ("a", "status"): "partial"})
    runner = _runner(store, executor)
    assert runner.run() == "completed"
    assert executor.sent == [("a", "apply"), ("a", "status"), ("a", "apply"), ("b", "apply")]
    assert [e["new"] for e in store.history("r", "a")] == [
        "pending", "applying", "unknown", "checking", "applying", "applied"]
    assert runner.stats.failures == 0 and runner.stats.blast_radius == 2


def test_apply_cut_short_between_processes_while_halting_is_rolled_back(tmp_path: Path) -> None:
    store = _store(tmp_path, [Host(name=n, module="m") for n in "ab"])
    store.transition("r", "a", "applying", 1)  # a killed orchestrator left a's apply in flight
    store.set_status("r", "halting", 1)
    executor = Scripted({("a", "status"): "partial"})
    assert _runner(store, executor, rollback="none").run() == "halted"
    assert executor.sent == [("a", "status"), ("a", "rollback")]
    assert {t.host: t.state for t in store.targets("r")} == {"a": "rolled_back", "b": "pending"}


def test_failed_canary_halts_and_wave_policy_rolls_back_only_its_wave(tmp_path: Path) -> None:
    store = _store(tmp_path, [Host(name=n, module="m") for n in "abc"])
    executor = Scripted({("a", "apply"): "unhealthy"})
    assert _runner(store, executor, rollback="wave").run() == "halted"
    assert executor.sent == [("a", "apply"), ("a", "rollback")]
    assert {t.host: t.state for t in store.targets("r")} == {"a": "rolled_back", "b": "pending", "c": "pending"}


def test_status_reports_waves_targets_and_blast_radius_from_the_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    store = _store(tmp_path, [Host(name=n, module="m") for n in "abc"])
    assert _runner(store, Scripted({("b", "apply"): "failed"}), rollback="all").run() == "halted"
    assert main(["rollout", "status", "r", "--db", str(tmp_path / "db.sqlite"), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["status"] == "halted" and document["reason"] == "1 failure(s), first on b"
    assert document["waves"] == [{"wave": 0, "hosts": 1, "rolled_back": 1},
                                 {"wave": 1, "hosts": 2, "pending": 1, "failed": 1}]
    assert document["blast_radius"] == 2 and document["failed_hosts"] == ["b"]
    assert main(["rollout", "status", "--db", str(tmp_path / "none.sqlite")]) == 2
    assert capsys.readouterr().err.startswith("hotpatch: error: no rollout database at ")


def test_live_view_shows_each_wave_with_its_counts(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from hotpatch.rollout.view import LiveView

    out = io.StringIO()
    store = _store(tmp_path, [Host(name=n, module="m") for n in "abc"])
    view = LiveView(Console(file=out, force_terminal=True, width=140))
    seen = []

    def on_change(runner: Runner) -> None:
        seen.append(dict(runner.state))
        view(runner)

    runner = _runner(store, Scripted({("c", "apply"): "failed"}))
    runner.on_change = on_change
    with view:
        assert runner.run() == "halted"
    text = out.getvalue()
    assert "rollout r" in text and "applying" in text and "pending" in text
    assert {"a": "applying", "b": "pending", "c": "pending"} in seen


# --------------------------------------------------------------------------
# The simulation
# --------------------------------------------------------------------------


def test_simulation_patches_a_fleet_within_windows_and_limits() -> None:
    hosts = make_fleet(600, groups=12)
    waves = (WaveSpec("canary", count=1), WaveSpec("ten", percent=10), WaveSpec("rest", rest=True))
    figures = simulate(hosts, waves, SimConfig(), start=ts(2026, 3, 2), horizon=30 * 86400, max_in_flight=3)
    assert figures["status"] == "completed" and figures["states"] == {"applied": 600}
    assert figures["max_unavailable_in_a_group"] == 3
    # 50 hosts a group, 3 at a time, ~17 min each, 4 h a night in every zone: more than a night, less than a week
    assert 20 < figures["time_to_full_patch_h"] < 24 * 7


def test_simulated_bad_package_halts_with_a_bounded_blast_radius() -> None:
    hosts = make_fleet(600, groups=12)
    waves = (WaveSpec("canary", count=1), WaveSpec("ten", percent=10), WaveSpec("rest", rest=True))
    figures = simulate(hosts, waves, SimConfig(bad_share=1.0), start=ts(2026, 3, 2), horizon=30 * 86400,
                       max_in_flight=3)
    assert figures["status"] == "halted" and figures["blast_radius"] == 1  # the canary, rolled back
    assert figures["states"] == {"failed": 1, "pending": 599}


# --------------------------------------------------------------------------
# The inventory against a scheduler's workers (a LocalCluster, no processes patched)
# --------------------------------------------------------------------------


@pytest.mark.cluster
def test_inventory_is_checked_against_the_workers_and_every_worker_describes_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import Client

    from hotpatch.rollout.executor_dask import local_cluster
    from hotpatch.rollout.orchestrator import Options, _inventory, start

    monkeypatch.setenv("HOTPATCH_TIME_ZONE", "Asia/Kolkata")
    monkeypatch.setenv("HOTPATCH_GROUP", "batch")
    monkeypatch.setenv("HOTPATCH_TAGS", "eu,canary")
    (tmp_path / "fix.hpk").write_bytes(b"")
    with local_cluster(["a", "b"], processes=False) as cluster, Client(cluster) as client:
        # "c" has no worker: refused before the rollout is recorded or anything is sent
        plan = plan_file(tmp_path, GOOD)
        with pytest.raises(PlanError, match=r"^inventory.hosts\[2\].name: unknown host 'c' \(no worker of that "
                                            r"name on the scheduler; workers: a, b\)$"):
            _inventory(load_plan(plan), client)
        db = tmp_path / "db.sqlite"
        every = plan_file(tmp_path, GOOD.split("[inventory]")[0] + "[inventory]\nevery_worker = true\n"
                          "[defaults]\nmodule = \"app.dll\"\n[[waves]]\nname = \"all\"\nrest = true\n")
        hosts = _inventory(load_plan(every), client)
        assert [(h.name, h.time_zone, h.group, h.tags, h.module) for h in hosts] == [
            ("a", "Asia/Kolkata", "batch", ("eu", "canary"), "app.dll"),
            ("b", "Asia/Kolkata", "batch", ("eu", "canary"), "app.dll")]
        with pytest.raises(PlanError, match="^package.path: fix.hpk: "):
            start(plan, Options(db=db, client=client))
        assert not RolloutStore(db).rollouts()
