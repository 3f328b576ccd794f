"""Which targets go when: hosts into waves, then, wave by wave, the ones whose window is open.

``assign_waves`` resolves the plan's waves over the inventory once (stored
with the rollout, so a resumed rollout keeps them). ``Planner`` decides, at
an instant, which pending hosts of the current wave may start: their
window is open in their own time zone with enough of it left for the
apply and its soak (``task_time``: a host whose window closes sooner waits
for its next window), and their availability group has fewer than
``max_in_flight`` hosts in flight. A wave starts only when the
one before it has no target left pending or in flight. Both executors
(Dask, simulation) drive the same planner through hotpatch.rollout.runner.

Cost: hosts wait in a heap keyed by the instant their window next opens and,
when their group is full, in that group's queue; each start, finish or wake
is O(log n), so 10,000 hosts over a month plan in well under a second.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence

from ..errors import PlanError
from .plan import WaveSpec
from .windows import Host

__all__ = ["Planner", "assign_waves"]


def _interleaved(hosts: Sequence[Host]) -> list[Host]:
    """Hosts taken round-robin across groups, so a share of the fleet spreads over every group."""
    by_group: dict[str, deque[Host]] = {}
    for host in hosts:
        by_group.setdefault(host.group, deque()).append(host)
    out: list[Host] = []
    queues = list(by_group.values())
    while queues:
        for queue in queues:
            out.append(queue.popleft())
        queues = [q for q in queues if q]
    return out


def _wave_size(wave: WaveSpec, fleet: int) -> int:
    if wave.count is not None:
        return wave.count
    assert wave.percent is not None
    return max(1, math.ceil(fleet * wave.percent / 100))


def assign_waves(waves: Sequence[WaveSpec], hosts: Sequence[Host]) -> list[list[Host]]:
    """Each wave's hosts. Named hosts and tags first, then counts and shares over the hosts left
    (interleaved across groups), and the rest. PlanError for an empty wave, an unknown host or a
    host left out of every wave."""
    by_name = {h.name: h for h in hosts}
    taken: set[str] = set()
    chosen: list[list[Host] | None] = [None] * len(waves)
    for index, wave in enumerate(waves):
        if not (wave.hosts or wave.tags):
            continue
        members = []
        for name in wave.hosts:
            if name not in by_name:
                raise PlanError(f"waves[{index}].hosts: unknown host {name!r}")
            members.append(by_name[name])
        members += [h for h in hosts if set(wave.tags) & set(h.tags) and h.name not in wave.hosts]
        for host in members:
            if host.name in taken:
                raise PlanError(f"waves[{index}]: host {host.name!r} is in an earlier wave too (overlapping)")
            taken.add(host.name)
        chosen[index] = members
    free = _interleaved([h for h in hosts if h.name not in taken])
    for index, wave in enumerate(waves):
        if chosen[index] is not None or wave.rest:
            continue
        size = _wave_size(wave, len(hosts))
        chosen[index], free = free[:size], free[size:]
    for index, wave in enumerate(waves):
        if wave.rest:
            chosen[index], free = free, []
    for index, members in enumerate(chosen):
        if not members:
            raise PlanError(f"waves[{index}]: empty wave ({waves[index].name!r} gets no host)")
    if free:
        raise PlanError(f"waves: {len(free)} host(s) are in no wave (first: {free[0].name!r}); add a rest wave")
    return [list(m or ()) for m in chosen]


class Planner:
    """The scheduling decisions of one rollout; the runner tells it what started and what finished."""

    def __init__(self, waves: Sequence[Sequence[Host]], max_in_flight: int, task_time: float = 0.0) -> None:
        self.waves = [list(w) for w in waves]
        self.max_in_flight = max_in_flight
        self.task_time = task_time  # seconds of window a host needs left to start (apply + soak)
        self.wave_of = {h.name: i for i, wave in enumerate(self.waves) for h in wave}
        self.hosts = {h.name: h for wave in self.waves for h in wave}
        self.current = 0
        self.outstanding = [0] * len(self.waves)  # pending or in flight, per wave
        self.in_flight: dict[str, int] = defaultdict(int)  # per group
        self.max_seen: dict[str, int] = defaultdict(int)
        self._heap: list[list[tuple[float, int, str]]] = [[] for _ in self.waves]
        self._blocked: dict[str, deque[str]] = defaultdict(deque)
        self._freed: set[str] = set()
        self._seq = 0

    # -- what the runner reports ---------------------------------------------------

    def add_pending(self, names: Iterable[str], at: float) -> None:
        """Hosts that still need the package (at the start, on resume, or to retry)."""
        for name in names:
            wave = self.wave_of[name]
            self.outstanding[wave] += 1
            self._push(name, at)
        self.current = self._first_open_wave()

    def add_in_flight(self, name: str) -> None:
        """A host already running (resumed rollout: a status read or retry in progress)."""
        self.outstanding[self.wave_of[name]] += 1
        self._count_start(self.hosts[name].group)

    def finished(self, name: str) -> None:
        """A host's task ended (whatever the outcome): its group has room again."""
        group = self.hosts[name].group
        self.in_flight[group] -= 1
        self.outstanding[self.wave_of[name]] -= 1
        self._freed.add(group)

    # -- decisions -------------------------------------------------------------------

    def wave_done(self, index: int) -> bool:
        return self.outstanding[index] == 0

    def _first_open_wave(self) -> int:
        index = 0
        while index < len(self.waves) and self.outstanding[index] == 0:
            index += 1
        return index

    def ready(self, now: float) -> list[Host]:
        """The hosts to start now (the runner must then start each of them)."""
        self.current = self._first_open_wave()
        if self.current >= len(self.waves):
            return []
        started: list[Host] = []
        for group in self._freed:
            queue = self._blocked[group]
            while queue and self.in_flight[group] < self.max_in_flight:
                name = queue.popleft()
                if self.wave_of[name] != self.current:
                    self._push(name, now)  # a later wave's host: waits its turn in the heap
                    continue
                self._try(name, now, started)
        self._freed.clear()
        heap = self._heap[self.current]
        while heap and heap[0][0] <= now:
            _, _, name = heapq.heappop(heap)
            self._try(name, now, started)
        return started

    def _try(self, name: str, now: float, started: list[Host]) -> None:
        host = self.hosts[name]
        opens, closes = host.next_open(now)
        if opens > now:
            self._push(name, opens)
        elif closes - now < self.task_time:
            # not enough window left: its next window (or, with overlapping spans, the one open then)
            self._push(name, host.next_open(closes)[0])
        elif self.in_flight[host.group] >= self.max_in_flight:
            self._blocked[host.group].append(name)
        else:
            self._count_start(host.group)
            started.append(host)

    def _count_start(self, group: str) -> None:
        self.in_flight[group] += 1
        self.max_seen[group] = max(self.max_seen[group], self.in_flight[group])

    def _push(self, name: str, at: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap[self.wave_of[name]], (at, self._seq, name))

    def next_wake(self) -> float | None:
        """When a window next opens for a waiting host of the current wave (None: only a finish can help)."""
        self.current = self._first_open_wave()
        if self.current >= len(self.waves) or not self._heap[self.current]:
            return None
        return self._heap[self.current][0][0]

    def drop_pending(self) -> list[str]:
        """Forget every waiting host (a halted rollout): they stay pending in the store."""
        names = [name for heap in self._heap for _, _, name in heap]
        names += [name for queue in self._blocked.values() for name in queue]
        for name in names:
            self.outstanding[self.wave_of[name]] -= 1
        self._heap = [[] for _ in self.waves]
        self._blocked.clear()
        return names
