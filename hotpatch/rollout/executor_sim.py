"""A simulated executor: the same planner, state machine and runner over a fleet with no processes.

Time is virtual: ``wait`` jumps the clock to the next completion (or to the
instant the planner wants to be woken, a window opening). Each apply takes
``apply`` + ``soak`` seconds (with jitter); a host starts only with that
much of its window left (``check_window_left``); a bad package fails its
health gate on a share ``bad_share`` of hosts (the host rolls back); a host
vanishes mid-apply with probability ``vanish_share`` (its task is lost
before, between or after the commits of its processes, and the status
read that follows finds the package in none, some or all of them: the
runner then retries, finishes or soaks). ``make_fleet`` builds a fleet
across time zones and availability groups; ``simulate`` plays waves over
it (``simulate_plan``: a plan's own waves, limits, soak, failure policy
and inventory) and reports time to full patch, the most hosts of one group
unavailable at once, the blast radius of a bad package, and the tasks that
ran past their window's end.
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import PlanError
from .plan import FailurePolicy, Plan, WaveSpec
from .planner import assign_waves
from .runner import Completion, Runner
from .state import RolloutStore
from .windows import Host, parse_window

__all__ = ["SimConfig", "SimExecutor", "make_fleet", "simulate", "simulate_plan"]

ZONES = ("America/Los_Angeles", "America/Denver", "America/Chicago", "America/New_York", "America/Sao_Paulo",
         "Europe/London", "Europe/Paris", "Europe/Helsinki", "Asia/Kolkata", "Asia/Singapore", "Asia/Tokyo",
         "Australia/Sydney")


@dataclass(frozen=True)
class SimConfig:
    apply: float = 120.0  # seconds to apply on one host
    soak: float = 900.0
    jitter: float = 0.2  # +- share of each duration
    bad_share: float = 0.0  # hosts where a bad package fails its health gate
    vanish_share: float = 0.0  # hosts whose worker vanishes mid-apply
    status_time: float = 30.0  # a status read
    rollback: float = 30.0
    seed: int = 1
    check_window_left: bool = True  # a host starts only with apply + soak of its window left

    @property
    def task_time(self) -> float:
        return self.apply + self.soak


@dataclass
class SimExecutor:
    config: SimConfig
    clock: float
    events: list[tuple[float, int, Completion]] = field(default_factory=list)
    applied: set[str] = field(default_factory=set)  # hosts whose processes hold the package
    partial: set[str] = field(default_factory=set)  # hosts where it is in some processes only
    vanished: set[str] = field(default_factory=set)
    commits: dict[str, int] = field(default_factory=dict)  # per host, the applies that wrote the package
    overran: int = 0  # tasks that ended after their host's window closed

    def __post_init__(self) -> None:
        self.rng = random.Random(self.config.seed)
        self._seq = 0

    def now(self) -> float:
        return self.clock

    def _later(self, seconds: float) -> float:
        return self.clock + seconds * (1 + self.rng.uniform(-self.config.jitter, self.config.jitter))

    def _at(self, when: float, done: Completion) -> None:
        self._seq += 1
        heapq.heappush(self.events, (when, self._seq, done))

    def _commit(self, name: str) -> None:
        self.commits[name] = self.commits.get(name, 0) + 1

    def submit(self, host: Host, action: str) -> None:
        c, name = self.config, host.name
        if action == "status":
            outcome = "ours" if name in self.applied else "partial" if name in self.partial else "original"
            self._at(self._later(c.status_time), Completion(name, action, outcome))
        elif action == "rollback":
            self.applied.discard(name)
            self.partial.discard(name)
            self._at(self._later(c.rollback), Completion(name, action, "rolled_back"))
        elif name not in self.vanished and self.rng.random() < c.vanish_share:
            self.vanished.add(name)  # once per host: it comes back for the status read
            cut = self.rng.choice(("before", "between", "after"))  # the commits of its processes
            if cut != "before":
                self._commit(name)
                (self.applied if cut == "after" else self.partial).add(name)
            self._at(self._later(c.apply * self.rng.random()), Completion(name, action, "lost"))
        elif name in self.applied:
            self._apply_done(host, self._later(c.soak), "applied", {"committed": False})
        elif self.rng.random() < c.bad_share:
            # the soak fails part-way; the host rolls itself back
            self._commit(name)
            self.partial.discard(name)
            when = self._later(c.apply + c.soak * self.rng.random() + c.rollback)
            self._apply_done(host, when, "failed", {"committed": True, "health": "probe failed"})
        else:
            if name not in self.partial:  # else the rest of its processes: the same apply, finished
                self._commit(name)
            self.partial.discard(name)
            self.applied.add(name)
            self._apply_done(host, self._later(c.apply + c.soak), "applied", {"committed": True})

    def _apply_done(self, host: Host, when: float, outcome: str, detail: dict[str, Any]) -> None:
        if when > host.next_open(self.clock)[1]:
            self.overran += 1
        self._at(when, Completion(host.name, "apply", outcome, detail))

    def wait(self, until: float | None) -> list[Completion]:
        if self.events and (until is None or self.events[0][0] <= until):
            when, _, done = heapq.heappop(self.events)
            self.clock = max(self.clock, when)
            return [done]
        if until is not None:
            self.clock = max(self.clock, until)
        return []


def make_fleet(count: int, groups: int = 50, window: str = "daily 01:00-05:00", seed: int = 7,
               module: str = "app.dll") -> list[Host]:
    """``count`` hosts spread over ``groups`` availability groups and the zones above."""
    rng = random.Random(seed)
    parsed = parse_window(window)
    return [Host(name=f"host-{i:05d}", time_zone=rng.choice(ZONES), group=f"group-{i % groups:03d}",
                 window=parsed, module=module) for i in range(count)]


def simulate(hosts: list[Host] | tuple[Host, ...], waves: tuple[WaveSpec, ...], config: SimConfig, *, start: float,
             horizon: float, max_in_flight: int, failure: FailurePolicy | None = None,
             store: RolloutStore | None = None) -> dict[str, Any]:
    """Play a rollout of ``hosts`` from ``start`` for at most ``horizon`` seconds; the figures as JSON."""
    cpu = time.process_time()
    failure = failure or FailurePolicy()
    store = store or RolloutStore(":memory:")
    assigned = assign_waves(waves, hosts)
    rollout_id = f"sim-{config.seed}"
    store.create(rollout_id, {"simulation": True}, "sim", "sim",
                 [(h.name, w, h.group, h.to_json()) for w, members in enumerate(assigned) for h in members], start)
    executor = SimExecutor(config, start)
    runner = Runner(store, rollout_id, executor, max_in_flight=max_in_flight, rollback_policy=failure.rollback,
                    max_failed=failure.max_failed, until=start + horizon,
                    task_time=config.task_time if config.check_window_left else 0.0)
    status = runner.run()
    states: dict[str, int] = {}
    for state in runner.state.values():
        states[state] = states.get(state, 0) + 1
    stats = runner.stats.to_json()
    return {
        "hosts": len(hosts),
        "groups": len({h.group for h in hosts}),
        "zones": len({h.time_zone for h in hosts}),
        "waves": [len(w) for w in assigned],
        "status": status,
        "states": states,
        "time_to_full_patch_h": (stats["time_to_full_patch"] or 0) / 3600 if status == "completed" else None,
        "max_unavailable_in_a_group": stats["max_unavailable"],
        "blast_radius": stats["blast_radius"],
        "failures": stats["failures"],
        "vanished": len(executor.vanished),
        "patched_twice": sum(1 for count in executor.commits.values() if count > 1),
        "overran_window": executor.overran,
        "cpu_s": time.process_time() - cpu,
    }


def simulate_plan(plan: Plan, config: SimConfig, *, start: float, horizon: float, hosts: int | None = None,
                  groups: int = 50, store: RolloutStore | None = None) -> dict[str, Any]:
    """Play ``plan`` itself: its waves, in-flight limit, failure policy, apply time and soak (``config``'s
    apply and soak are replaced), over its inventory, or over ``hosts`` made-up hosts in ``groups`` groups
    with the plan's default window and selector (the waves must then not name hosts)."""
    if hosts is None:
        if not plan.hosts:
            raise PlanError("inventory.hosts: an every_worker plan lists no hosts to simulate (give a fleet size)")
        fleet: list[Host] | tuple[Host, ...] = plan.hosts
    else:
        fleet = make_fleet(hosts, groups=groups, window=plan.defaults.window.text,
                           module=plan.defaults.module or "app.dll")
    config = replace(config, apply=plan.apply_time, soak=plan.health.soak)
    return simulate(fleet, plan.waves, config, start=start, horizon=horizon, max_in_flight=plan.max_in_flight,
                    failure=plan.failure, store=store)
