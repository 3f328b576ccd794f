"""The real executor: each host's task pinned to the Dask worker named after the host.

``client.submit(host_task, ..., workers=[host], allow_other_workers=False)``
runs the host task (hotpatch.rollout.hostwork) on that host's worker only.
A host whose worker leaves the scheduler while its task runs gets a ``lost``
completion (the runner then marks it unknown and reads it back from memory
once a worker of that name is there again). Without a scheduler address,
``local_cluster`` starts a LocalCluster-style ``SpecCluster`` on this
machine, one worker per host, named after it (random ports, no dashboard
port fixed). The clock is injectable: ``Clock(start, jump=True)`` makes the
waits for a window jump instead of sleeping (tests, dry runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from distributed import Client, Future, Nanny, Scheduler, SpecCluster, Worker, wait
from distributed.client import FuturesCancelledError
from distributed.security import Security

from .hostwork import HostRequest, describe_worker, host_task
from .runner import LOST, Completion
from .windows import Host

__all__ = ["Clock", "DaskExecutor", "discover_hosts", "local_cluster", "worker_names"]

#: seconds between two looks at the scheduler's workers while tasks run
POLL = 0.5
#: a worker gone this long has lost its task
LOST_AFTER = 2.0
#: a task sent while its host's worker is away waits this long for a worker of that name (a restart)
RETURN_WITHIN = 180.0


class Clock:
    """Wall-clock POSIX time, optionally starting elsewhere (``start``) and jumping over idle waits."""

    def __init__(self, start: float | None = None, jump: bool = False) -> None:
        self._origin = time.time() if start is None else start
        self._t0 = time.monotonic()
        self._skipped = 0.0
        self.jump = jump

    def now(self) -> float:
        return self._origin + (time.monotonic() - self._t0) + self._skipped

    def idle_until(self, until: float, longest: float = POLL) -> None:
        gap = until - self.now()
        if gap <= 0:
            return
        if self.jump:
            self._skipped += gap
        else:
            time.sleep(min(gap, longest))


def local_cluster(hosts: list[str], env: dict[str, dict[str, str]] | None = None, processes: bool = True,
                  threads: int = 2, security: Security | None = None) -> SpecCluster:
    """One worker per host name on this machine; ``env`` gives each host's worker its environment
    (HOTPATCH_STATE, TZ, ...), which needs worker processes (Nanny). With ``security`` every connection is
    TLS (its scheduler, worker and client certificates)."""
    tls: dict[str, Any] = {"security": security} if security is not None else {}
    workers: dict[str, dict[str, Any]] = {}
    for name in hosts:
        options: dict[str, Any] = {"name": name, "nthreads": threads, "dashboard_address": None, **tls}
        if processes:
            options["env"] = dict((env or {}).get(name, {}))
        workers[name] = {"cls": Nanny if processes else Worker, "options": options}
    protocol = {"protocol": "tls://"} if security is not None else {}
    scheduler = {"cls": Scheduler, "options": {"port": 0, "dashboard_address": ":0", **protocol, **tls}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="hotpatch-rollout", **tls)


def worker_names(client: Client) -> dict[str, str]:
    """name -> address of every worker the scheduler knows now.

    Asked of the scheduler directly: ``Client.scheduler_info()`` returns a cache that the client's own
    periodic refresh (which leaves out the workers) may overwrite between the fetch and the read."""
    identity = client.sync(client.scheduler.identity, n_workers=-1)
    return {str(info.get("name")): address for address, info in identity["workers"].items()}


def discover_hosts(client: Client) -> dict[str, dict[str, Any]]:
    """Every worker's description of its host (inventory ``every_worker``), by worker name."""
    names = {address: name for name, address in worker_names(client).items()}
    return {names[address]: described for address, described in client.run(describe_worker).items()
            if address in names}


class DaskExecutor:
    """Runs the runner's tasks on the workers; ``request_for(host)`` builds each host's request."""

    def __init__(self, client: Client, request_for: Callable[[Host], HostRequest], clock: Clock | None = None,
                 lost_after: float = LOST_AFTER, return_within: float = RETURN_WITHIN) -> None:
        self.client = client
        self.request_for = request_for
        self.clock = clock or Clock()
        self.lost_after = lost_after
        self.return_within = return_within
        self.futures: dict[Future, tuple[str, str]] = {}
        self._missing_since: dict[Future, float] = {}
        self._seen: set[Future] = set()  # futures whose worker was there at some point since they were sent
        #: the address of the worker each future was sent to (or first seen at): a worker of the same name at
        #: another address is a restarted one, and the task it held is lost even if the name never left
        self._address: dict[Future, str] = {}
        self.submitted: list[tuple[str, str, float]] = []

    def now(self) -> float:
        return self.clock.now()

    def submit(self, host: Host, action: str) -> None:
        future = self.client.submit(host_task, action, self.request_for(host), workers=[host.name],
                                    allow_other_workers=False, pure=False, retries=0,
                                    key=f"hotpatch-{action}-{host.name}-{time.time_ns()}")
        self.futures[future] = (host.name, action)
        address = worker_names(self.client).get(host.name)
        if address is not None:
            self._seen.add(future)
            self._address[future] = address
        self.submitted.append((host.name, action, self.now()))

    def wait(self, until: float | None) -> list[Completion]:
        if not self.futures:
            if until is not None:
                self.clock.idle_until(until)
            return []
        timeout = POLL if until is None else max(0.0, min(POLL, until - self.now()))
        try:
            done, _ = wait(list(self.futures), timeout=timeout, return_when="FIRST_COMPLETED")
        except TimeoutError:
            done = set()
        except FuturesCancelledError:
            # the scheduler gave up a task (its worker went away): lost, so the target is read back
            done = {f for f in self.futures if f.cancelled()}
        out = [self._completion(f) for f in done]
        return out + self._lost()  # with tasks running the clock never jumps: they run in real time

    def _completion(self, future: Future) -> Completion:
        host, action = self.futures.pop(future)
        self._missing_since.pop(future, None)
        self._seen.discard(future)
        self._address.pop(future, None)
        try:
            if future.status == "finished":
                result = future.result()
                return Completion(host, action, result.pop("outcome"), result)
            try:
                error = repr(future.exception())
            except Exception as exc:  # noqa: BLE001 - a cancelled future raises instead of returning its error
                error = repr(exc)
            return Completion(host, action, LOST, {"error": f"the task was lost: {error}"})
        finally:
            _forget(future)

    def _lost(self) -> list[Completion]:
        """Tasks whose worker left while they ran (after ``lost_after``), or that were sent while it was away
        and saw no worker of that name come back within ``return_within`` (a restarting worker does)."""
        present = worker_names(self.client)
        out = []
        now = time.monotonic()
        for future, (host, action) in list(self.futures.items()):
            restarted = host in present and self._address.setdefault(future, present[host]) != present[host]
            if host in present and not restarted:
                self._seen.add(future)
                self._missing_since.pop(future, None)
                continue
            if not restarted:
                since = self._missing_since.setdefault(future, now)
                if now - since < (self.lost_after if future in self._seen else self.return_within):
                    continue
            why = ("restarted at another address" if restarted else "left the scheduler" if future in self._seen
                   else f"did not come back within {self.return_within:g} s")
            future.cancel()
            _forget(future)
            self.futures.pop(future)
            self._missing_since.pop(future, None)
            self._seen.discard(future)
            self._address.pop(future, None)
            out.append(Completion(host, action, LOST, {"error": f"worker {host!r} {why}"}))
        return out


def _forget(future: Future) -> None:
    """Have the scheduler forget a task the runner has its answer for.

    While a client holds a finished task's future, the scheduler keeps its result on the worker and, should
    that worker die, runs the task again on the worker that takes its name: an old rollback or apply of that
    host, run behind the runner's back. A future dropped without release lingers until the garbage collector
    finds it (the polling ``wait`` leaves it in reference cycles), so it is released here, at once."""
    future.release()
