"""Starting, resuming and aborting a rollout: plan, package, cluster, store and runner wired together.

``start`` checks everything before anything is sent: the plan, the package
against the plan's signature policy, that every inventory host has a worker
on the scheduler, the waves over the inventory. Only then is the rollout
recorded and its lock taken. ``resume`` and ``abort`` re-read the plan the
rollout was started with from the database (the package must still be the
same one) and run the same loop.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed import Client

from ..errors import PlanError, RolloutError
from ..package import load_public_key
from .executor_dask import Clock, DaskExecutor, discover_hosts, local_cluster, worker_names
from .hostwork import HostRequest
from .plan import Plan, check_windows, hosts_from_table, load_plan, parse_plan
from .planner import assign_waves
from .runner import Runner
from .state import RolloutStore
from .tls import TlsSettings
from .windows import Host

__all__ = ["Options", "abort", "connect", "resume", "start", "status"]


@dataclass
class Options:
    """How to run: the database, the scheduler (None: a local cluster), the clock, the live view."""

    db: Path
    scheduler: str | None = None
    clock: Clock | None = None
    until: float | None = None
    on_change: Callable[[Runner], None] | None = None
    client: Client | None = None  # an existing client (tests, embedding)
    tls: TlsSettings | None = None  # the CLI's TLS files (else the plan's, else distributed's configuration)


@contextlib.contextmanager
def connect(options: Options, host_names: list[str]) -> Iterator[Client]:
    """A client of the plan's scheduler, or of a cluster on this machine with one worker per host."""
    if options.client is not None:
        yield options.client
        return
    if options.scheduler:
        # without TLS files of our own, distributed's configuration decides (DASK_DISTRIBUTED__COMM__TLS__...)
        security = options.tls.security() if options.tls else None
        try:
            client = Client(options.scheduler, timeout="20s", security=security)
        except (OSError, TypeError, ValueError) as exc:  # TypeError: a tls:// address without TLS settings
            raise RolloutError(f"cannot reach the scheduler {options.scheduler}: {exc}") from None
        with client:
            yield client
        return
    # our own cluster, torn down at the end: its workers' complaints about the closing scheduler are noise
    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    security = options.tls.cluster_security() if options.tls else None
    with local_cluster(host_names, processes=False, security=security) as cluster, \
            Client(cluster, security=security) as client:
        yield client


def _holder() -> str:
    return f"hotpatch rollout of user {getpass.getuser()}"


def _request_factory(plan: Plan, package_bytes: bytes) -> Callable[[Host], HostRequest]:
    keys = tuple(load_public_key(k) for k in plan.trust)

    def request_for(host: Host) -> HostRequest:
        return HostRequest(package_bytes, keys, plan.allow_unsigned, host.module, host.pids, plan.health,
                           plan.failure.auto_rollback)

    return request_for


def _inventory(plan: Plan, client: Client) -> tuple[Host, ...]:
    """The plan's hosts, each checked against the scheduler's workers; or every worker's own description."""
    present = worker_names(client)
    if plan.every_worker:
        described = discover_hosts(client)
        listed = {h.name: h for h in plan.hosts}
        items = [{**described[name], "name": name} for name in sorted(described) if name not in listed]
        hosts = plan.hosts + hosts_from_table(items, plan.defaults, "worker")
        check_windows(hosts, plan.task_time, "worker")
        if not hosts:
            raise PlanError("inventory.every_worker: the scheduler has no workers")
        return hosts
    for index, host in enumerate(plan.hosts):
        if host.name not in present:
            raise PlanError(f"inventory.hosts[{index}].name: unknown host {host.name!r} (no worker of that name "
                            f"on the scheduler; workers: {', '.join(sorted(present)) or 'none'})")
    return plan.hosts


def _runner(store: RolloutStore, rollout_id: str, plan: Plan, executor: DaskExecutor, options: Options) -> Runner:
    return Runner(store, rollout_id, executor, max_in_flight=plan.max_in_flight,
                  rollback_policy=plan.failure.rollback, max_failed=plan.failure.max_failed, until=options.until,
                  on_change=options.on_change, task_time=plan.task_time)


def start(plan_path: str | Path, options: Options) -> tuple[str, str]:
    """Check the plan and start its rollout; (rollout id, final status)."""
    plan = load_plan(plan_path)
    package = plan.load_package()
    package_bytes = plan.package_path.read_bytes()
    store = RolloutStore(options.db)
    if plan.name in store.rollouts():
        raise RolloutError(f"rollout {plan.name!r} already exists in {options.db}: use `hotpatch rollout resume "
                           f"{plan.name}` (or give the plan another name)")
    options.scheduler = options.scheduler or plan.scheduler
    options.tls = options.tls or plan.tls
    with connect(options, [h.name for h in plan.hosts]) as client:
        hosts = _inventory(plan, client)
        waves = assign_waves(plan.waves, hosts)
        stored = {"source": plan.source, "plan_dir": _plan_dir(plan_path)}
        clock = options.clock or Clock()
        store.create(plan.name, stored, plan.fingerprint(), package.package_id,
                     [(h.name, w, h.group, h.to_json()) for w, members in enumerate(waves) for h in members],
                     clock.now())
        store.acquire(plan.name, _holder())
        try:
            executor = DaskExecutor(client, _request_factory(plan, package_bytes), clock)
            status = _runner(store, plan.name, plan, executor, options).run()
        finally:
            store.release(plan.name)
    return plan.name, status


def _plan_dir(plan_path: str | Path) -> str:
    return str(Path(plan_path).resolve().parent)


def _stored_plan(store: RolloutStore, rollout_id: str) -> tuple[Plan, bytes]:
    row = store.rollout(rollout_id)
    plan = parse_plan(row.plan["source"], Path(row.plan["plan_dir"]), name=rollout_id)
    package = plan.load_package()
    if package.package_id != row.package_id:
        raise PlanError(f"package.path: {plan.package_path} is no longer the package the rollout started with "
                        f"({package.package_id} != {row.package_id})")
    return plan, plan.package_path.read_bytes()


def _continue(rollout_id: str, options: Options, abort_it: bool) -> str:
    if not Path(options.db).is_file():
        raise RolloutError(f"no rollout database at {options.db}")
    store = RolloutStore(options.db)
    plan, package_bytes = _stored_plan(store, rollout_id)
    store.acquire(rollout_id, _holder())
    try:
        hosts = [t.host for t in store.targets(rollout_id)]
        options.scheduler = options.scheduler or plan.scheduler
        options.tls = options.tls or plan.tls
        with connect(options, hosts) as client:
            executor = DaskExecutor(client, _request_factory(plan, package_bytes), options.clock or Clock())
            return _runner(store, rollout_id, plan, executor, options).run(abort=abort_it)
    finally:
        store.release(rollout_id)


def resume(rollout_id: str, options: Options) -> str:
    """Continue a rollout (after its orchestrator stopped, or a window it waited for)."""
    return _continue(rollout_id, options, abort_it=False)


def abort(rollout_id: str, options: Options) -> str:
    """Stop starting anything and roll back every target that has the package."""
    return _continue(rollout_id, options, abort_it=True)


def status(rollout_id: str | None, db: Path) -> dict[str, Any]:
    from .view import report

    if not Path(db).is_file():
        raise RolloutError(f"no rollout database at {db}")
    store = RolloutStore(db)
    ids = store.rollouts()
    if not ids:
        raise RolloutError(f"no rollout in {db}")
    return report(store, rollout_id or ids[-1])

