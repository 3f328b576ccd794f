"""Running a train: each release judged against the current baseline, its packages written.

``run_train`` reads as the program: for each release in order, resume it if
its outputs are complete and made from the same inputs; else decide its kind
(``plan``), diff each changed module against the *current baseline* (through
the analysis cache), build the cumulative packages of a hotpatch month
(sequence = its place in the cycle, baseline id = the cycle's), and write them
and the release's JSON. Then the figures, ``train.json`` and the calendar.

Everything is written to a temporary file and renamed: a package or a
release's JSON is complete or absent, and a release's JSON is written after
its packages, so an interrupted train resumes from the releases it finished.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from .. import __version__
from ..cache import AnalysisCache, analysis_version
from ..diff.compare import diff
from ..errors import NotHotpatchableError
from ..package.builder import build_package
from ..package.format import dumps, package_id_of
from ..package.model import Package
from ..package.signing import load_private_key, public_key_bytes
from ..verdict.rules import decide
from .calendar import draw_calendar
from .figures import train_figures
from .files import write_bytes, write_json
from .manifest import BEFORE, HOTPATCH, PLANNED, UNPLANNED, Manifest, Release
from .outcome import ModuleOutcome, ReleaseOutcome, TrainResult
from .plan import Schedule, kind_of

__all__ = ["ModuleOutcome", "Progress", "ReleaseOutcome", "TrainResult", "run_train"]

RELEASE_SCHEMA = "hotpatch.train.release/1"


class Progress(Protocol):
    """Where a train reports how far it is (the CLI shows rich progress bars)."""

    def release(self, index: int, release: Release, modules: int, resumed: bool) -> None: ...

    def module(self, release: Release, module: str) -> None: ...


class _Quiet:
    def release(self, index: int, release: Release, modules: int, resumed: bool) -> None:
        pass

    def module(self, release: Release, module: str) -> None:
        pass


@dataclass
class _Cycle:
    """Where the train stands: the current baseline and the last sequence of its cycle."""

    baseline: Release | None = None
    sequence: int = 0
    #: the id every package of the cycle carries (``<train>/<baseline release>``)
    baseline_id: str | None = None


def run_train(manifest: Manifest, out_dir: str | Path, *, sign_key: str | Path | None = None,
              cache: AnalysisCache | None = None, progress: Progress | None = None,
              calendar: str | Path | None = "calendar.svg",
              interrupt: Callable[[ReleaseOutcome], None] | None = None) -> TrainResult:
    """Run the train of ``manifest`` into ``out_dir``; resume whatever a previous run finished.

    ``sign_key``: an Ed25519 private key (PEM) to sign the packages with.
    ``calendar``: the picture's file name in ``out_dir`` (.svg or .png), or None.
    ``interrupt`` is called after each release is written (tests stop a train there).
    """
    # everything that can be refused is checked before the first file is written
    if calendar is not None and Path(calendar).suffix.lower() not in (".svg", ".png"):
        raise ValueError(f"calendar {calendar}: .svg or .png")
    key = load_private_key(sign_key) if sign_key else None
    signer = public_key_bytes(key).hex() if key is not None else None
    cache = cache if cache is not None else AnalysisCache()
    cache.check()
    progress = progress or _Quiet()
    out = Path(out_dir)
    (out / "releases").mkdir(parents=True, exist_ok=True)
    first = manifest.releases[manifest.index_of(manifest.policy.first_baseline)]
    schedule = Schedule(manifest.policy, first.date)
    cycle = _Cycle()
    outcomes: list[ReleaseOutcome] = []
    for index, release in enumerate(manifest.releases):
        inputs = _inputs(manifest, index, signer)
        outcome = _resumed(out, index, release, inputs)
        progress.release(index, release, len(_changed(cycle, release)), outcome is not None)
        if outcome is None:
            outcome = _judge(manifest, index, release, cycle, schedule, cache, key, out, progress)
            write_json(_release_path(out, index, release), {"schema": RELEASE_SCHEMA, "inputs": inputs,
                                                               **outcome.to_json()})
        outcomes.append(outcome)
        _advance(cycle, manifest, outcome)
        if interrupt is not None:
            interrupt(outcome)

    figures = train_figures(manifest, outcomes, schedule)
    result = TrainResult(manifest, out, outcomes, figures, cache.stats.to_json())
    write_json(out / "train.json", result.to_json())
    if calendar is not None:
        draw_calendar(result, out / calendar)
    return result


# ── one release ───────────────────────────────────────────────────────────────


def _judge(manifest: Manifest, index: int, release: Release, cycle: _Cycle, schedule: Schedule,
           cache: AnalysisCache, key: Any, out: Path, progress: Progress) -> ReleaseOutcome:
    policy = manifest.policy
    started = cycle.baseline is not None or release.name == policy.first_baseline
    due = cycle.baseline is not None and schedule.due(release.date, cycle.baseline.date)
    kind = kind_of(release, started=started, due=due, policy=policy, blocked=None)
    override = policy.overrides.get(release.name)
    override_json = {"kind": override.kind, "reason": override.reason} if override else None
    changed = _changed(cycle, release)
    # before the first baseline there is nothing to compare with
    same = "unchanged" if cycle.baseline is not None else "baseline"
    modules = [ModuleOutcome(name, same) for name in sorted(release.modules) if name not in changed]
    if kind is not None:  # a baseline (or before the program): nothing to diff
        modules += [ModuleOutcome(name, status) for name, status in changed.items()]
        return _outcome(index, release, kind, manifest, modules, override_json)

    assert cycle.baseline is not None
    sequence = cycle.sequence + 1
    packages: dict[str, Package] = {}
    for name, status in changed.items():
        progress.module(release, name)
        outcome = ModuleOutcome(name, status)
        modules.append(outcome)
        if status == "added":
            outcome.reasons.append({"kind": "new_module", "subject": name,
                                    "message": f"{name} is not in baseline {cycle.baseline.name}: "
                                               "running processes do not have it loaded"})
            continue
        result = diff(cache.table(cycle.baseline.modules[name].path), cache.table(release.modules[name].path))
        verdict = decide(result, allow_layout_change=policy.allow_layout_change)
        outcome.verdict = verdict.status
        outcome.summary = result.summary()
        outcome.reasons = [r.to_json() for r in verdict.reasons]
        if not verdict.hotpatchable:
            continue
        if not any(outcome.summary[s] for s in ("changed", "added", "removed")) and not result.data:
            outcome.verdict = "NO_CODE_CHANGE"  # other bytes only (a version resource, say): nothing to patch
            continue
        try:
            packages[name] = build_package(
                result, verdict=verdict, sequence=sequence, baseline_id=cycle.baseline_id,
                description=f"{manifest.name} {release.name}: {name}"
                            + (f" ({release.description})" if release.description else ""),
                cve_ids=release.cves, created=_epoch(release.date))
        except NotHotpatchableError as exc:
            outcome.verdict = "BUILD_REFUSED"  # the diff says hotpatch, the builder cannot carry it
            outcome.reasons = [r.to_json() for r in exc.reasons]
    blocked = any(m.reasons for m in modules)
    kind = kind_of(release, started=True, due=due, policy=policy, blocked=blocked)
    if kind == HOTPATCH:
        _write_packages(out, release, packages, key, modules)
    else:
        _write_packages(out, release, {}, key, modules)  # a stale run's packages of this release go
    return _outcome(index, release, kind or UNPLANNED, manifest, modules, override_json,
                    sequence if kind == HOTPATCH else 0, cycle)


def _outcome(index: int, release: Release, kind: str, manifest: Manifest, modules: list[ModuleOutcome],
             override: dict[str, str] | None, sequence: int = 0, cycle: _Cycle | None = None) -> ReleaseOutcome:
    modules.sort(key=lambda m: m.module)
    if kind == HOTPATCH:
        assert cycle is not None and cycle.baseline is not None
        return ReleaseOutcome(index, release.name, release.date, kind, cycle.baseline.name, cycle.baseline_id,
                              sequence, modules, override)
    if kind == BEFORE:
        return ReleaseOutcome(index, release.name, release.date, kind, None, None, 0, modules, override)
    return ReleaseOutcome(index, release.name, release.date, kind, release.name, _baseline_id(manifest, release),
                          0, modules, override)


def _changed(cycle: _Cycle, release: Release) -> dict[str, str]:
    """Modules whose bytes differ from the current baseline's (all of them before the first baseline)."""
    if cycle.baseline is None:
        return {}
    base = cycle.baseline.modules
    return {name: "added" if name not in base else "changed"
            for name, module in sorted(release.modules.items())
            if name not in base or base[name].sha256 != module.sha256}


def _advance(cycle: _Cycle, manifest: Manifest, outcome: ReleaseOutcome) -> None:
    if outcome.kind in (PLANNED, UNPLANNED):
        cycle.baseline = manifest.releases[outcome.index]
        cycle.baseline_id = outcome.baseline_id
        cycle.sequence = 0
    elif outcome.kind == HOTPATCH:
        cycle.sequence = outcome.sequence


def _baseline_id(manifest: Manifest, release: Release) -> str:
    return f"{manifest.name}/{release.name}"


def _epoch(day: dt.date) -> int:
    """The release date as package creation time: a train rebuilt later makes the same bytes."""
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())


# ── files ─────────────────────────────────────────────────────────────────────


def _release_path(out: Path, index: int, release: Release) -> Path:
    return out / "releases" / f"{index:03d}-{release.name}.json"


def _package_path(out: Path, release: str, module: str) -> Path:
    return out / "packages" / release / f"{module}.hpk"


def _write_packages(out: Path, release: Release, packages: dict[str, Package], key: Any,
                    modules: list[ModuleOutcome]) -> None:
    by_name = {m.module: m for m in modules}
    keep = set()
    for name, package in packages.items():
        data = dumps(package, key)
        path = _package_path(out, release.name, name)
        write_bytes(path, data)
        keep.add(path)
        by_name[name].package = {
            "path": path.relative_to(out).as_posix(), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "package_id": package_id_of(package),
            "baseline_id": package.baseline_id, "sequence": package.sequence, "signed": key is not None,
            "sites": len(package.sites),
        }
    folder = out / "packages" / release.name
    if folder.is_dir():
        for stale in folder.rglob("*.hpk"):
            if stale not in keep:
                stale.unlink()


def _inputs(manifest: Manifest, index: int, signer: str | None) -> str:
    """What a release's outcome depends on: the policy, every release up to it, the signer, the code."""
    document = {"version": __version__, "analysis": analysis_version(), "train": manifest.name,
                "policy": manifest.policy.to_json(), "signer": signer,
                "releases": [r.fingerprint() for r in manifest.releases[:index + 1]]}
    return hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _resumed(out: Path, index: int, release: Release, inputs: str) -> ReleaseOutcome | None:
    """The release as a previous run wrote it, if made from the same inputs with every package intact."""
    path = _release_path(out, index, release)
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("schema") != RELEASE_SCHEMA or doc.get("inputs") != inputs:
        return None
    try:
        outcome = ReleaseOutcome.from_json(doc)
        for module in outcome.modules:
            if module.package is None:
                continue
            data = (out / module.package["path"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != module.package["sha256"]:
                return None
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return outcome
