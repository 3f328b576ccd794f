"""The orchestration loop both executors share: planner decisions in, state transitions out.

``Runner.run()`` reads the rollout's targets from the store, turns what a
killed orchestrator left in flight into ``unknown``, reads every unknown
target back from its processes (a ``status`` task) before anything is
retried, then starts hosts as the planner allows, records each completion
as one transition, and applies the failure policy: after more than
``max_failed`` failures the rollout halts (nothing new starts), the tasks in
flight finish, and the policy's rollbacks run (the failed wave, or
everything applied; a failed host rolls itself back in its own task).
``abort`` rolls back every target that has the package.

An executor runs tasks and keeps the clock::

    now() -> float                          POSIX seconds (real, injected or simulated)
    submit(host, action) -> None            action: apply | rollback | status
    wait(until) -> list[Completion]         the next completions, or [] at ``until``
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .planner import Planner
from .state import (
    APPLIED,
    APPLYING,
    CHECKING,
    FAILED,
    HAS_PACKAGE,
    IN_FLIGHT,
    PENDING,
    ROLLED_BACK,
    ROLLING_BACK,
    UNHEALTHY,
    UNKNOWN,
    RolloutStore,
)
from .windows import Host

__all__ = ["Completion", "Executor", "RunStats", "Runner"]

LOST = "lost"


@dataclass(frozen=True)
class Completion:
    """A finished task. outcome: apply -> applied|failed|unhealthy|lost, rollback -> rolled_back|failed|lost,
    status -> ours|partial|original|mixed|lost. ``detail['committed']`` says whether the package went in."""

    host: str
    action: str
    outcome: str
    detail: dict[str, Any] = field(default_factory=dict)


class Executor(Protocol):
    def now(self) -> float: ...
    def submit(self, host: Host, action: str) -> None: ...
    def wait(self, until: float | None) -> list[Completion]: ...


@dataclass
class RunStats:
    started: float
    finished: float | None = None
    last_applied: float | None = None
    failures: int = 0
    blast_radius: int = 0  # hosts the package went into
    halted_at: float | None = None
    completions: int = 0
    max_unavailable: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"started": self.started, "finished": self.finished, "last_applied": self.last_applied,
                "time_to_full_patch": (self.last_applied - self.started) if self.last_applied else None,
                "failures": self.failures, "blast_radius": self.blast_radius, "halted_at": self.halted_at,
                "max_unavailable_per_group": dict(self.max_unavailable),
                "max_unavailable": max(self.max_unavailable.values(), default=0)}


class Runner:
    """One orchestrator's run of one rollout (start, resume or abort)."""

    def __init__(self, store: RolloutStore, rollout_id: str, executor: Executor, *, max_in_flight: int,
                 rollback_policy: str, max_failed: int, until: float | None = None,
                 on_change: Callable[[Runner], None] | None = None, heartbeat_every: float = 5.0,
                 task_time: float = 0.0) -> None:
        self.store = store
        self.id = rollout_id
        self.executor = executor
        self.rollback_policy = rollback_policy
        self.max_failed = max_failed
        self.until = until
        self.on_change = on_change
        self.heartbeat_every = heartbeat_every
        rows = store.targets(rollout_id)
        self.hosts = {r.host: _host(r.spec) for r in rows}
        self.wave_of = {r.host: r.wave for r in rows}
        self.state = {r.host: r.state for r in rows}
        waves: list[list[Host]] = [[] for _ in range(max((r.wave for r in rows), default=-1) + 1)]
        for row in rows:
            waves[row.wave].append(self.hosts[row.host])
        self.planner = Planner(waves, max_in_flight, task_time)  # task_time: the window a start needs left
        self.running: dict[str, str] = {}  # host -> action in flight
        self.halting = False
        self.aborting = False
        self.stats = RunStats(executor.now())
        self.failed_waves: set[int] = set()
        self.reached: set[str] = set()  # hosts the package went into during this run
        self._beat = time.monotonic()
        failed = {h["host"] for h in store.history(rollout_id) if h["new"] in (FAILED, UNHEALTHY)}
        self.stats.failures = len(failed)
        self.failed_waves = {self.wave_of[h] for h in failed}

    # -- transitions ---------------------------------------------------------------

    def _move(self, host: str, new: str, detail: dict[str, Any] | None = None) -> None:
        self.store.transition(self.id, host, new, self.executor.now(), detail)
        self.state[host] = new

    def _send(self, host: str, action: str, state: str, detail: dict[str, Any] | None = None) -> None:
        self._move(host, state, detail)  # committed before the task exists: a crash leaves it in flight
        self.running[host] = action
        self.executor.submit(self.hosts[host], action)

    # -- the loop --------------------------------------------------------------------

    def run(self, abort: bool = False) -> str:
        status = self.store.rollout(self.id).status
        self.aborting = abort or status in ("aborting", "aborted")
        self.halting = status in ("halting", "halted")
        self.store.set_status(self.id, "aborting" if self.aborting else "halting" if self.halting else "running",
                              self.executor.now())
        for host, state in list(self.state.items()):
            if state in IN_FLIGHT:
                self._move(host, UNKNOWN, {"note": "the orchestrator stopped while this was in flight"})
        if not (self.aborting or self.halting):
            self.planner.add_pending([h for h, s in self.state.items() if s == PENDING], self.executor.now())
        for host, state in self.state.items():
            if state == UNKNOWN:
                self.planner.add_in_flight(host)
                self._send(host, "status", CHECKING)
        if self.aborting or self.halting:
            self._policy_rollbacks()
        return self._loop()

    def _loop(self) -> str:
        while True:
            if not (self.halting or self.aborting):
                for host in self.planner.ready(self.executor.now()):
                    self._send(host.name, "apply", APPLYING)
            self._changed()
            if not self.running:
                wake = None if (self.halting or self.aborting) else self.planner.next_wake()
                if wake is None:
                    return self._finish()
                if self.until is not None and wake >= self.until:
                    opens = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(wake))
                    self.store.set_status(self.id, "waiting", self.executor.now(), reason=f"next window opens {opens}")
                    self.stats.finished = self.executor.now()
                    return "waiting"
            else:
                wake = None if (self.halting or self.aborting) else self.planner.next_wake()
            for done in self.executor.wait(wake):
                self._complete(done)
            if time.monotonic() - self._beat > self.heartbeat_every:
                self.store.heartbeat(self.id)
                self._beat = time.monotonic()

    def _complete(self, done: Completion) -> None:
        self.stats.completions += 1
        self.running.pop(done.host, None)
        action, outcome, host = done.action, done.outcome, done.host
        detail = {"action": action, "outcome": outcome, **done.detail}
        # a lost apply may have committed too: its read-back says so; each host counts once
        if ((action == "apply" and done.detail.get("committed"))
                or (action == "status" and outcome in ("ours", "partial"))):
            self.reached.add(host)
            self.stats.blast_radius = len(self.reached)
        if outcome == LOST:
            self._move(host, UNKNOWN, detail)
            if action != "status":
                # the worker vanished: the processes' memory says what happened, before any retry
                self._send(host, "status", CHECKING)
            else:
                self.planner.finished(host)  # cannot even be read back: left unknown, counted as a failure
                self._failure(host)
            return
        if action == "status":
            self._after_status(host, outcome, detail)
            return
        if action == "apply":
            new = {"applied": APPLIED, "unhealthy": UNHEALTHY}.get(outcome, FAILED)
            self._move(host, new, detail)
            if new == APPLIED:
                self.stats.last_applied = self.executor.now()
            if self.aborting or (self.halting and self._should_roll_back(host)):
                if new in HAS_PACKAGE:
                    self._send(host, "rollback", ROLLING_BACK)
                    return
            self.planner.finished(host)
            if new != APPLIED:
                self._failure(host)
            return
        # rollback
        self._move(host, ROLLED_BACK if outcome == "rolled_back" else UNHEALTHY, detail)
        self.planner.finished(host)

    def _after_status(self, host: str, outcome: str, detail: dict[str, Any]) -> None:
        if outcome == "partial":
            # an apply stopped between two processes (its worker died): each process is whole, so the host
            # task finishes the apply where it stopped, or, when nothing new may start, the host is undone
            if self.aborting or self.halting:
                self._send(host, "rollback", ROLLING_BACK, detail)
            else:
                self._send(host, "apply", APPLYING, detail)
        elif outcome == "ours":
            if self.aborting or (self.halting and self._should_roll_back(host)):
                self._send(host, "rollback", ROLLING_BACK, detail)
            elif self.halting:
                self._move(host, APPLIED, {**detail, "note": "read back applied while halting; not soaked again"})
                self.planner.finished(host)
            else:
                self._send(host, "apply", APPLYING, detail)  # the host task sees it applied and only soaks
        elif outcome == "original":
            self._move(host, PENDING if not self.aborting else ROLLED_BACK, detail)
            self.planner.finished(host)
            if not (self.aborting or self.halting):
                self.planner.add_pending([host], self.executor.now())
        else:
            self._move(host, UNHEALTHY, detail)
            self.planner.finished(host)
            self._failure(host)

    def _failure(self, host: str) -> None:
        self.stats.failures += 1
        self.failed_waves.add(self.wave_of[host])
        if self.stats.failures > self.max_failed and not self.halting:
            self.halting = True
            self.stats.halted_at = self.executor.now()
            self.planner.drop_pending()
            self.store.set_status(self.id, "halting", self.executor.now(),
                                  reason=f"{self.stats.failures} failure(s), first on {host}")
            self._policy_rollbacks()

    def _should_roll_back(self, host: str) -> bool:
        if self.aborting or self.rollback_policy == "all":
            return True
        return self.rollback_policy == "wave" and self.wave_of[host] in self.failed_waves

    def _policy_rollbacks(self) -> None:
        for host, state in list(self.state.items()):
            if host not in self.running and state in HAS_PACKAGE and self._should_roll_back(host):
                self.planner.add_in_flight(host)
                self._send(host, "rollback", ROLLING_BACK)

    def _finish(self) -> str:
        self.stats.finished = self.executor.now()
        self.stats.max_unavailable = dict(self.planner.max_seen)
        counts = Counter(self.state.values())
        if self.aborting:
            status = "aborted"
        elif self.halting:
            status = "halted"
        else:
            status = "completed" if counts[APPLIED] == len(self.state) else "completed_with_failures"
        self.store.set_status(self.id, status, self.executor.now(), report={"stats": self.stats.to_json()})
        self._changed()
        return status

    def _changed(self) -> None:
        self.stats.max_unavailable = dict(self.planner.max_seen)
        if self.on_change is not None:
            self.on_change(self)


def _host(spec: dict[str, Any]) -> Host:
    from .windows import parse_window

    return Host(name=spec["name"], time_zone=spec["time_zone"], group=spec["group"], tags=tuple(spec["tags"]),
                window=parse_window(spec["window"]), module=spec.get("module"), pids=tuple(spec.get("pids") or ()))

