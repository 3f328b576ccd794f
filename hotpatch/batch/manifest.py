"""What a batch runs: jobs read from a manifest (TOML or JSON lines) or paired from release folders.

A job is one stage (``diff``, ``build`` or ``verify``) over one baseline/patched
pair. Its id is a digest of what it computes (kind, both files, options), so a
rerun of the same manifest finds the jobs it already finished whatever their
order or names.

TOML manifest (paths relative to the manifest)::

    [defaults]
    kind = "diff"            # or "build", "verify"
    timeout = 600

    [[job]]
    name = "numpy core"
    baseline = "old/_multiarray_umath.pyd"
    patched = "new/_multiarray_umath.pyd"

    [[folders]]              # every module found in both folders
    releases = ["numpy-2.1.0", "numpy-2.1.1", "numpy-2.1.2"]   # consecutive pairs
    kinds = ["diff", "build"]

JSON lines: one job object per line with the keys of ``[[job]]``.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..errors import BatchError

__all__ = ["KINDS", "Job", "load_manifest", "pair_folders", "release_jobs"]

KINDS = ("diff", "build", "verify")
PE_SUFFIXES = (".dll", ".pyd", ".exe", ".sys")
#: delvewheel and auditwheel mangle bundled library names with a content hash: not part of the module's name
_MANGLED = re.compile(r"-[0-9a-f]{32}(?=\.)", re.IGNORECASE)
_JOB_KEYS = {"name", "kind", "baseline", "patched", "timeout", "inputs", "allow_layout_change"}


@dataclass(frozen=True)
class Job:
    """One stage over one pair of images."""

    kind: str
    baseline: str
    patched: str
    name: str = ""
    #: seconds before the job is stopped and recorded as failed (None: the batch's default)
    timeout: float | None = None
    #: calls for ``verify`` (docs/VERIFY.md); None: the exported functions the package changes
    inputs: str | None = None
    allow_layout_change: bool = False

    @property
    def job_id(self) -> str:
        key = orjson.dumps([self.kind, self.baseline, self.patched, self.inputs, self.allow_layout_change])
        return hashlib.sha256(key).hexdigest()[:16]

    @property
    def label(self) -> str:
        path = Path(self.patched)
        return self.name or f"{path.parent.name}/{path.name} ({self.kind})"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.job_id, "kind": self.kind, "name": self.label, "baseline": self.baseline,
                "patched": self.patched, "timeout": self.timeout, "inputs": self.inputs,
                "allow_layout_change": self.allow_layout_change}

    @classmethod
    def from_json(cls, document: dict[str, Any], root: Path | None = None,
                  defaults: dict[str, Any] | None = None) -> Job:
        merged = {**(defaults or {}), **document}
        unknown = set(merged) - _JOB_KEYS - {"id"}
        if unknown:
            raise BatchError(f"unknown job keys: {', '.join(sorted(unknown))}")
        kind = merged.get("kind", "diff")
        if kind not in KINDS:
            raise BatchError(f"job kind {kind!r} is not one of {', '.join(KINDS)}")
        for key in ("baseline", "patched"):
            if not isinstance(merged.get(key), str):
                raise BatchError(f"a job needs {key!r} (a path)")
        timeout = merged.get("timeout")
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise BatchError(f"timeout must be a positive number of seconds, not {timeout!r}")
        inputs = merged.get("inputs")
        return cls(kind=kind, baseline=_resolve(merged["baseline"], root), patched=_resolve(merged["patched"], root),
                   name=str(merged.get("name", "")), timeout=timeout,
                   inputs=_resolve(inputs, root) if inputs else None,
                   allow_layout_change=bool(merged.get("allow_layout_change", False)))


def _resolve(path: str, root: Path | None) -> str:
    candidate = Path(path)
    if root is not None and not candidate.is_absolute():
        candidate = root / candidate
    return str(candidate.resolve())


def load_manifest(path: str | Path) -> list[Job]:
    """The jobs a manifest lists (TOML by ``.toml``, otherwise JSON lines); duplicates kept once."""
    manifest = Path(path)
    try:
        text = manifest.read_text()
    except OSError as exc:
        raise BatchError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    root = manifest.resolve().parent
    if manifest.suffix.lower() == ".toml":
        jobs = _from_toml(text, root, str(path))
    else:
        jobs = _from_json_lines(text, root, str(path))
    if not jobs:
        raise BatchError(f"manifest {path} lists no jobs")
    return _unique(jobs)


def _from_toml(text: str, root: Path, label: str) -> list[Job]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BatchError(f"manifest {label} is not valid TOML: {exc}") from None
    defaults = document.get("defaults", {})
    if not isinstance(defaults, dict):
        raise BatchError("[defaults] must be a table")
    jobs = [Job.from_json(entry, root, defaults) for entry in _tables(document, "job")]
    for entry in _tables(document, "folders"):
        releases = entry.get("releases")
        if not isinstance(releases, list) or len(releases) < 2 or not all(isinstance(r, str) for r in releases):
            raise BatchError("[[folders]] needs releases = [at least two folders]")
        kinds = entry.get("kinds", [defaults.get("kind", "diff")])
        folder_defaults = {k: v for k, v in defaults.items() if k != "kind"}
        jobs.extend(release_jobs([root / r for r in releases], kinds, folder_defaults))
    return jobs


def _tables(document: dict[str, Any], key: str) -> list[dict[str, Any]]:
    entries = document.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BatchError(f"[[{key}]] must be an array of tables")
    return entries


def _from_json_lines(text: str, root: Path, label: str) -> list[Job]:
    jobs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise BatchError(f"{label}:{number}: not JSON ({exc})") from None
        if not isinstance(entry, dict):
            raise BatchError(f"{label}:{number}: a job must be a JSON object")
        jobs.append(Job.from_json(entry, root))
    return jobs


def module_key(path: Path) -> str:
    """A module's name across releases: its file name, lower case, without wheel-repair hash mangling."""
    return _MANGLED.sub("", path.name.lower())


def pair_folders(old: str | Path, new: str | Path) -> list[tuple[Path, Path]]:
    """Modules present in both release folders, matched by name (relative path when names repeat)."""
    found_old, found_new = _modules(Path(old)), _modules(Path(new))
    pairs = []
    for key, paths in sorted(found_old.items()):
        others = found_new.get(key)
        if not others:
            continue
        if len(paths) == 1 and len(others) == 1:
            pairs.append((paths[0], others[0]))
            continue
        by_place = {p.parent.relative_to(new).as_posix(): p for p in others}
        pairs.extend((p, by_place[place]) for p in paths
                     if (place := p.parent.relative_to(old).as_posix()) in by_place)
    return pairs


def _modules(folder: Path) -> dict[str, list[Path]]:
    if not folder.is_dir():
        raise BatchError(f"release folder {folder} does not exist")
    out: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in PE_SUFFIXES and path.is_file():
            out.setdefault(module_key(path), []).append(path)
    return out


def release_jobs(releases: Sequence[str | Path], kinds: Iterable[str] = ("diff",),
                 defaults: dict[str, Any] | None = None) -> list[Job]:
    """Jobs over consecutive release folders: every module both releases ship, for each kind."""
    jobs = []
    kinds = list(kinds)
    for old, new in zip(releases, releases[1:]):
        for baseline, patched in pair_folders(old, new):
            for kind in kinds:
                entry = {"kind": kind, "baseline": str(baseline), "patched": str(patched),
                         "name": f"{module_key(patched)} {Path(old).name}->{Path(new).name}"}
                jobs.append(Job.from_json(entry, None, defaults))
    return jobs


def _unique(jobs: list[Job]) -> list[Job]:
    seen: dict[str, Job] = {}
    for job in jobs:
        seen.setdefault(job.job_id, job)
    return list(seen.values())
