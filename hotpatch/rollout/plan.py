"""A rollout plan: what goes where, in which waves, when, how watched, and what a failure does.

Plans are TOML (docs/ROLLOUT.md has the full reference)::

    name = "scale-fix"
    [package]
    path = "scale-fix.hpk"            # relative to the plan file
    trust = ["keys/release.pub"]      # or allow_unsigned = true
    [inventory]
    hosts = [{name = "web-1", time_zone = "Europe/Paris", group = "web", tags = ["eu"], pids = [1234]}]
    # every_worker = true             # or: every worker of the scheduler is a host
    [defaults]                        # for every host that does not say otherwise
    time_zone = "UTC"; group = "default"; window = "daily 01:00-05:00"; module = "app.dll"
    [[waves]]  name = "canary"; count = 1
    [[waves]]  name = "ten percent"; percent = 10
    [[waves]]  name = "rest"; rest = true
    [limits]   max_in_flight_per_group = 2; apply_time = "1m"   # a host starts with apply_time + soak of window left
    [health]   checks = ["alive", "sites", "cmd:probe.sh"]; soak = "5m"; interval = "10s"
    [failure]  rollback = "host"      # none | host | wave | all; the rollout halts after max_failed failures
    [tls]      ca_file = "ca.pem"; cert = "orchestrator.pem"; key = "orchestrator.key"   # Dask TLS

Every problem is a ``PlanError`` whose message starts with the field's path.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..apply.health import BUILTIN_CHECKS, HealthSpec, parse_check, parse_duration
from ..errors import PackageError, PlanError
from ..package import Package, load_public_key
from .tls import TlsSettings, parse_tls
from .windows import Host, Window, parse_window, zone

__all__ = ["FailurePolicy", "Plan", "WaveSpec", "check_windows", "hosts_from_table", "load_plan", "parse_plan"]

ROLLBACK_POLICIES = ("none", "host", "wave", "all")


@dataclass(frozen=True)
class WaveSpec:
    """One wave: explicit host names and/or tags, or a count, a percentage of the fleet, or the rest."""

    name: str
    hosts: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    count: int | None = None
    percent: float | None = None
    rest: bool = False


@dataclass(frozen=True)
class FailurePolicy:
    rollback: str = "host"  # none | host | wave | all
    max_failed: int = 0  # failures tolerated before the rollout halts

    @property
    def auto_rollback(self) -> bool:
        """Whether a host rolls back its own processes when its health gate fails."""
        return self.rollback != "none"


@dataclass(frozen=True)
class Plan:
    name: str
    package_path: Path
    trust: tuple[str, ...]
    allow_unsigned: bool
    hosts: tuple[Host, ...]
    every_worker: bool
    defaults: Host
    waves: tuple[WaveSpec, ...]
    max_in_flight: int
    health: HealthSpec
    failure: FailurePolicy
    scheduler: str | None = None
    apply_time: float = 60.0  # what one host's apply is expected to take, before its soak
    tls: TlsSettings | None = None  # the orchestrator's Dask TLS files
    source: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def load_package(self) -> Package:
        """The package, checked against the plan's signature policy; PlanError naming package.path otherwise."""
        try:
            keys = [load_public_key(key) for key in self.trust]
        except PackageError as exc:
            raise PlanError(f"package.trust: {exc}") from None
        try:
            return Package.load(self.package_path, trusted_keys=keys or None, require_signature=not self.allow_unsigned)
        except PackageError as exc:
            raise PlanError(f"package.path: {self.package_path.name}: {exc}") from None
        except OSError as exc:
            raise PlanError(f"package.path: cannot read {self.package_path}: {exc.strerror or exc}") from None

    @property
    def task_time(self) -> float:
        """The window a host needs left to start: its apply and the soak after it."""
        return self.apply_time + self.health.soak

    def fingerprint(self) -> str:
        """A digest of the plan's content: a resumed rollout must run the plan it started with."""
        return hashlib.sha256(repr(sorted(_flat(self.source))).encode()).hexdigest()[:16]


def _flat(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [item for key, sub in value.items() for item in _flat(sub, f"{prefix}.{key}")]
    if isinstance(value, list):
        return [item for i, sub in enumerate(value) for item in _flat(sub, f"{prefix}[{i}]")]
    return [(prefix, repr(value))]


# --------------------------------------------------------------------------
# Field readers: each error names the field
# --------------------------------------------------------------------------


def _get(table: dict[str, Any], key: str, path: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = table.get(key, default)
    if value is default:
        return value
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        names = " or ".join(k.__name__ for k in _kinds(kind))
        raise PlanError(f"{path}{key}: expected {names}, got {type(value).__name__}")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _strings(table: dict[str, Any], key: str, path: str) -> tuple[str, ...]:
    values = _get(table, key, path, list, [])
    if not all(isinstance(v, str) for v in values):
        raise PlanError(f"{path}{key}: expected a list of strings")
    return tuple(values)


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    return _get(data, key, "", dict, {})


def _unknown(table: dict[str, Any], known: set[str], path: str) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise PlanError(f"{path}{extra[0]}: unknown field")


_HOST_FIELDS = {"name", "time_zone", "group", "tags", "window", "module", "pids"}


def _host(table: dict[str, Any], path: str, base: Host) -> Host:
    _unknown(table, _HOST_FIELDS, path)
    tz = _get(table, "time_zone", path, str, base.time_zone)
    try:
        zone(tz)
    except ValueError as exc:
        raise PlanError(f"{path}time_zone: {exc}") from None
    window_text = _get(table, "window", path, str, None)
    try:
        window: Window = parse_window(window_text) if window_text is not None else base.window
    except ValueError as exc:
        raise PlanError(f"{path}window: {exc}") from None
    pids = _get(table, "pids", path, list, None)
    if pids is not None and not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in pids):
        raise PlanError(f"{path}pids: expected a list of positive process ids")
    name = _get(table, "name", path, str, base.name)
    if not name:
        raise PlanError(f"{path}name: a host needs a name (its Dask worker's name)")
    return Host(
        name=name, time_zone=tz, group=_get(table, "group", path, str, base.group),
        tags=_strings(table, "tags", path) or base.tags, window=window,
        module=_get(table, "module", path, str, base.module),
        pids=tuple(pids) if pids is not None else base.pids,
    )


def hosts_from_table(items: list[Any], defaults: Host, path: str = "inventory.hosts") -> tuple[Host, ...]:
    """Hosts from a list of tables (the plan's inventory, or what the workers said of themselves)."""
    hosts = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        where = f"{path}[{index}]."
        if not isinstance(item, dict):
            raise PlanError(f"{path}[{index}]: expected a table")
        host = _host(item, where, defaults)
        if host.name in seen:
            raise PlanError(f"{where}name: host {host.name!r} listed twice")
        if host.module is None and not host.pids:
            raise PlanError(f"{where}module: no process selector (module or pids) for host {host.name!r}")
        seen.add(host.name)
        hosts.append(host)
    return tuple(hosts)


def _wave(table: dict[str, Any], path: str) -> WaveSpec:
    _unknown(table, {"name", "hosts", "tags", "count", "percent", "rest"}, path)
    count = _get(table, "count", path, int, None)
    percent = _get(table, "percent", path, (int, float), None)
    rest = _get(table, "rest", path, bool, False)
    wave = WaveSpec(_get(table, "name", path, str, path.rstrip(".")), _strings(table, "hosts", path),
                    _strings(table, "tags", path), count, float(percent) if percent is not None else None, rest)
    kinds = sum(bool(x) for x in (wave.hosts or wave.tags, count is not None, percent is not None, rest))
    if kinds != 1:
        raise PlanError(f"{path.rstrip('.')}: a wave takes exactly one of hosts/tags, count, percent, rest")
    if count is not None and count < 1:
        raise PlanError(f"{path}count: empty wave (count {count})")
    if percent is not None and not 0 < percent <= 100:
        raise PlanError(f"{path}percent: must be in (0, 100], got {percent}")
    return wave


def parse_plan(data: dict[str, Any], base_dir: Path, name: str = "rollout") -> Plan:
    """Check a parsed TOML document; PlanError naming the first bad field."""
    _unknown(data, {"name", "package", "inventory", "defaults", "waves", "limits", "health", "failure", "tls"}, "")
    package = _table(data, "package")
    _unknown(package, {"path", "trust", "allow_unsigned"}, "package.")
    package_path = _get(package, "path", "package.", str, None)
    if not package_path:
        raise PlanError("package.path: missing")
    defaults = _host(_table(data, "defaults"), "defaults.", Host(name="*", window=Window("always")))
    inventory = _table(data, "inventory")
    _unknown(inventory, {"hosts", "every_worker", "scheduler"}, "inventory.")
    every_worker = _get(inventory, "every_worker", "inventory.", bool, False)
    hosts = hosts_from_table(_get(inventory, "hosts", "inventory.", list, []), defaults)
    if not hosts and not every_worker:
        raise PlanError("inventory.hosts: no hosts (list them, or set every_worker = true)")
    waves_data = _get(data, "waves", "", list, [])
    if not waves_data:
        raise PlanError("waves: no waves")
    waves = tuple(_wave(w if isinstance(w, dict) else {}, f"waves[{i}].") for i, w in enumerate(waves_data))
    _check_wave_names(waves, {h.name for h in hosts}, every_worker)
    limits = _table(data, "limits")
    _unknown(limits, {"max_in_flight_per_group", "apply_time"}, "limits.")
    in_flight = _get(limits, "max_in_flight_per_group", "limits.", int, 1)
    if in_flight < 1:
        raise PlanError(f"limits.max_in_flight_per_group: must be at least 1, got {in_flight}")
    try:
        apply_time = parse_duration(limits.get("apply_time", 60.0), "apply_time")
    except ValueError as exc:
        raise PlanError(f"limits.apply_time: {exc}") from None
    health = _health(_table(data, "health"))
    check_windows(hosts, apply_time + health.soak)
    failure = _table(data, "failure")
    _unknown(failure, {"rollback", "max_failed"}, "failure.")
    rollback = _get(failure, "rollback", "failure.", str, "host")
    if rollback not in ROLLBACK_POLICIES:
        raise PlanError(f"failure.rollback: {rollback!r} is not one of {', '.join(ROLLBACK_POLICIES)}")
    max_failed = _get(failure, "max_failed", "failure.", int, 0)
    if max_failed < 0:
        raise PlanError("failure.max_failed: must not be negative")
    return Plan(
        name=_get(data, "name", "", str, name) or name,
        package_path=(base_dir / package_path).resolve(),
        trust=tuple(str(base_dir / k) if (base_dir / k).is_file() else k
                    for k in _strings(package, "trust", "package.")),
        allow_unsigned=_get(package, "allow_unsigned", "package.", bool, False),
        hosts=hosts, every_worker=every_worker, defaults=defaults, waves=waves, max_in_flight=in_flight,
        health=health, failure=FailurePolicy(rollback, max_failed),
        scheduler=_get(inventory, "scheduler", "inventory.", str, None), apply_time=apply_time,
        tls=parse_tls(_table(data, "tls"), base_dir), source=data,
    )


def check_windows(hosts: tuple[Host, ...], task_time: float, path: str = "inventory.hosts") -> None:
    """PlanError for a host none of whose window spans is long enough for its apply and soak (it would never
    start)."""
    for index, host in enumerate(hosts):
        spans = host.window.spans
        if spans and max(span.minutes for span in spans) * 60 < task_time:
            raise PlanError(f"{path}[{index}].window: {host.window.text!r} of host {host.name!r} is shorter than "
                            f"the {task_time / 60:g} min an apply and its soak need (limits.apply_time + "
                            "health.soak)")


def _check_wave_names(waves: tuple[WaveSpec, ...], known: set[str], every_worker: bool) -> None:
    owner: dict[str, str] = {}
    for index, wave in enumerate(waves):
        for host in wave.hosts:
            if known and host not in known and not every_worker:
                raise PlanError(f"waves[{index}].hosts: unknown host {host!r}")
            if host in owner:
                raise PlanError(f"waves[{index}].hosts: {host!r} is already in wave {owner[host]!r} (overlapping)")
            owner[host] = wave.name
    if sum(w.rest for w in waves) > 1:
        raise PlanError("waves: more than one wave takes the rest")


def _health(table: dict[str, Any]) -> HealthSpec:
    _unknown(table, {"checks", "soak", "interval", "probe_timeout"}, "health.")
    checks = _strings(table, "checks", "health.") or BUILTIN_CHECKS
    values = {}
    for key, default in (("soak", 0.0), ("interval", 1.0), ("probe_timeout", 10.0)):
        try:
            values[key] = parse_duration(table.get(key, default), key)
        except ValueError as exc:
            raise PlanError(f"health.{key}: {exc}") from None
    for index, check in enumerate(checks):
        try:
            parse_check(check)
        except ValueError as exc:
            raise PlanError(f"health.checks[{index}]: {exc}") from None
    return HealthSpec(tuple(checks), values["soak"], max(values["interval"], 0.01), values["probe_timeout"])


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise PlanError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: not TOML: {exc}") from None
    return parse_plan(data, path.resolve().parent, name=path.stem)
