"""The train manifest (TOML): the releases in order, the files of each module, the policy.

``load_manifest(path)`` checks everything before anything runs: unknown keys,
missing files, files that are not PE32+ x86-64 images, releases out of date
order, a module that disappears from a release. Each error is one line naming
the release, the module and the field (``ManifestError``, exit 2). Module
paths are relative to the manifest's directory. Every file is read once here
and its SHA-256 kept: a module is changed when its bytes differ from the
baseline's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ImageError, ManifestError
from ..pe.image import check_headers

__all__ = ["KINDS", "Manifest", "Module", "Override", "Policy", "Release", "load_manifest"]

#: what a release can be (``before_program``: earlier than the first baseline, not serviced)
PLANNED, HOTPATCH, UNPLANNED, BEFORE = "planned_baseline", "hotpatch", "unplanned_baseline", "before_program"
KINDS = (PLANNED, HOTPATCH, UNPLANNED, BEFORE)
SCHEDULES = ("calendar", "rolling")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_TOP_KEYS = {"train", "policy", "release"}
_TRAIN_KEYS = {"name"}
_POLICY_KEYS = {"first_baseline", "cadence_months", "schedule", "allow_layout_change", "override"}
_OVERRIDE_KEYS = {"release", "kind", "reason"}
_RELEASE_KEYS = {"name", "date", "description", "cves", "modules"}


@dataclass(frozen=True)
class Module:
    """One module file of a release: ``name`` is its key in the manifest (stable across releases)."""

    name: str
    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class Release:
    name: str
    date: dt.date
    modules: dict[str, Module]
    description: str = ""
    cves: tuple[str, ...] = ()

    def fingerprint(self) -> dict[str, Any]:
        """What the outcome of this release depends on (its resume check)."""
        return {"name": self.name, "date": self.date.isoformat(), "description": self.description,
                "cves": list(self.cves), "modules": {k: m.sha256 for k, m in sorted(self.modules.items())}}


@dataclass(frozen=True)
class Override:
    """Force a release's kind: ``planned_baseline`` (an extra restart) or ``hotpatch`` (skip a planned one)."""

    release: str
    kind: str
    reason: str = ""


@dataclass(frozen=True)
class Policy:
    first_baseline: str
    #: months between planned baselines
    cadence_months: int = 3
    #: ``calendar``: planned baselines every cadence from the first one, whatever happened since
    #: (Windows Server Hotpatch's quarters); ``rolling``: a cadence after the last baseline of any kind
    schedule: str = "calendar"
    allow_layout_change: bool = False
    overrides: dict[str, Override] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"first_baseline": self.first_baseline, "cadence_months": self.cadence_months,
                "schedule": self.schedule, "allow_layout_change": self.allow_layout_change,
                "overrides": [{"release": o.release, "kind": o.kind, "reason": o.reason}
                              for o in self.overrides.values()]}


@dataclass(frozen=True)
class Manifest:
    path: Path
    name: str
    policy: Policy
    releases: tuple[Release, ...]

    def index_of(self, name: str) -> int:
        return next(i for i, r in enumerate(self.releases) if r.name == name)


def load_manifest(path: str | Path) -> Manifest:
    """Read and check a train manifest; ``ManifestError`` names the first problem."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read the manifest: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: not valid TOML: {exc}") from None
    where = str(path)
    _keys(document, _TOP_KEYS, where)
    train = _table(document.get("train", {}), f"{where}: [train]")
    _keys(train, _TRAIN_KEYS, f"{where}: [train]")
    name = _name(train.get("name", path.stem), f"{where}: [train] field 'name'")

    raw_releases = document.get("release")
    if not isinstance(raw_releases, list) or not raw_releases:
        raise ManifestError(f"{where}: no [[release]] entries")
    releases = _releases(raw_releases, path.parent, where)
    policy = _policy(_table(document.get("policy", {}), f"{where}: [policy]"), releases, where)
    return Manifest(path, name, policy, releases)


# ── releases ────────────────────────────────────────────────────────────────


def _releases(raw: list[Any], base: Path, where: str) -> tuple[Release, ...]:
    releases: list[Release] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw):
        label = f"{where}: release #{index + 1}"
        entry = _table(entry, label)
        if "name" in entry:
            label = f"{where}: release {entry['name']!r}"
        _keys(entry, _RELEASE_KEYS, label)
        for required in ("name", "date", "modules"):
            if required not in entry:
                raise ManifestError(f"{label}: field {required!r} is missing")
        name = _name(entry["name"], f"{label}: field 'name'")
        if name in seen:
            raise ManifestError(f"{label}: field 'name': a second release of that name")
        seen.add(name)
        date = _date(entry["date"], f"{label}: field 'date'")
        if releases and date < releases[-1].date:
            raise ManifestError(f"{label}: field 'date': {date} is before release {releases[-1].name!r} "
                                f"({releases[-1].date}); releases must be in date order")
        description = entry.get("description", "")
        if not isinstance(description, str):
            raise ManifestError(f"{label}: field 'description': a string is expected")
        cves = entry.get("cves", [])
        if not isinstance(cves, list) or not all(isinstance(c, str) for c in cves):
            raise ManifestError(f"{label}: field 'cves': a list of strings is expected")
        modules = _modules(_table(entry["modules"], f"{label}: field 'modules'"), base, label)
        if releases:
            gone = sorted(set(releases[-1].modules) - set(modules))
            if gone:
                raise ManifestError(f"{label}: module {gone[0]!r}: missing (release {releases[-1].name!r} has it; "
                                    "a module may not disappear from a product)")
        releases.append(Release(name, date, modules, description, tuple(cves)))
    return tuple(releases)


def _modules(raw: dict[str, Any], base: Path, label: str) -> dict[str, Module]:
    if not raw:
        raise ManifestError(f"{label}: field 'modules': no modules")
    out = {}
    for key, value in raw.items():
        where = f"{label}: module {key!r}"
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
            raise ManifestError(f"{where}: the module name must be a relative path without '..'")
        if not isinstance(value, str) or not value:
            raise ManifestError(f"{where}: field 'path': a file path (string) is expected")
        path = base / value
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ManifestError(f"{where}: field 'path': {value} does not exist") from None
        except OSError as exc:
            raise ManifestError(f"{where}: field 'path': cannot read {value}: {exc.strerror}") from None
        try:
            check_headers(data, value)
        except ImageError as exc:
            raise ManifestError(f"{where}: field 'path': {exc}") from None
        out[key] = Module(key, path, hashlib.sha256(data).hexdigest(), len(data))
    return out


# ── policy ──────────────────────────────────────────────────────────────────


def _policy(raw: dict[str, Any], releases: tuple[Release, ...], where: str) -> Policy:
    label = f"{where}: [policy]"
    _keys(raw, _POLICY_KEYS, label)
    names = {r.name for r in releases}
    first = raw.get("first_baseline", releases[0].name)
    if first not in names:
        raise ManifestError(f"{label} field 'first_baseline': no release named {first!r}")
    cadence = raw.get("cadence_months", 3)
    if not isinstance(cadence, int) or isinstance(cadence, bool) or not 1 <= cadence <= 120:
        raise ManifestError(f"{label} field 'cadence_months': a whole number of months from 1 to 120 is expected")
    schedule = raw.get("schedule", "calendar")
    if schedule not in SCHEDULES:
        raise ManifestError(f"{label} field 'schedule': one of {', '.join(SCHEDULES)} is expected")
    allow_layout = raw.get("allow_layout_change", False)
    if not isinstance(allow_layout, bool):
        raise ManifestError(f"{label} field 'allow_layout_change': true or false is expected")
    overrides: dict[str, Override] = {}
    raw_overrides = raw.get("override", [])
    if not isinstance(raw_overrides, list):
        raise ManifestError(f"{label} field 'override': a list of [[policy.override]] tables is expected")
    for index, entry in enumerate(raw_overrides):
        olabel = f"{where}: [[policy.override]] #{index + 1}"
        entry = _table(entry, olabel)
        _keys(entry, _OVERRIDE_KEYS, olabel)
        release = entry.get("release")
        if release not in names:
            raise ManifestError(f"{olabel} field 'release': no release named {release!r}")
        kind = entry.get("kind")
        if kind not in (PLANNED, HOTPATCH):
            raise ManifestError(f"{olabel} (release {release!r}) field 'kind': {PLANNED} or {HOTPATCH} is expected")
        if release == first:
            raise ManifestError(f"{olabel} (release {release!r}) field 'release': the first baseline is always one")
        reason = entry.get("reason", "")
        if not isinstance(reason, str):
            raise ManifestError(f"{olabel} (release {release!r}) field 'reason': a string is expected")
        if release in overrides:
            raise ManifestError(f"{olabel} (release {release!r}) field 'release': a second override of it")
        overrides[release] = Override(release, kind, reason)
    return Policy(first, cadence, schedule, allow_layout, overrides)


# ── small checks ────────────────────────────────────────────────────────────


def _keys(table: dict[str, Any], allowed: set[str], label: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ManifestError(f"{label}: unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})")


def _table(value: Any, label: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"{label}: a table is expected")
    return value


def _name(value: Any, label: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ManifestError(f"{label}: {value!r} is not a name (letters, digits, '.', '_', '+', '-'; "
                            "64 at most)")
    return value


def _date(value: Any, label: str) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    raise ManifestError(f"{label}: {value!r} is not a date (YYYY-MM-DD)")
