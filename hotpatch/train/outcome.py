"""What a train found: each module of each release, each release, and the whole train (plain data).

``run`` produces these; ``figures`` and ``calendar`` read them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .manifest import Manifest

__all__ = ["TRAIN_SCHEMA", "ModuleOutcome", "ReleaseOutcome", "TrainResult"]

TRAIN_SCHEMA = "hotpatch.train/1"


@dataclass
class ModuleOutcome:
    """One module of one release, judged against the cycle's baseline."""

    module: str
    #: "unchanged" (same bytes as the baseline), "changed", "added" (not in the baseline), or "baseline"
    #: (the first baseline and the releases before it: nothing to compare with)
    status: str
    #: the diff's verdict ("HOTPATCH", "NEW_BASELINE"), "NO_CODE_CHANGE" (no function or data differs),
    #: "BUILD_REFUSED" (the diff allows a hotpatch, the package builder cannot make it), or None: not diffed
    verdict: str | None = None
    summary: dict[str, int] | None = None
    reasons: list[dict[str, str]] = field(default_factory=list)
    package: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "status": self.status, "verdict": self.verdict, "summary": self.summary,
                "reasons": self.reasons, "package": self.package}


@dataclass
class ReleaseOutcome:
    index: int
    name: str
    date: dt.date
    kind: str
    #: the baseline this release's processes run on afterwards (itself when it is one)
    baseline: str | None
    baseline_id: str | None
    #: place in the cycle: 0 for a baseline, 1, 2, ... for its hotpatch months
    sequence: int
    modules: list[ModuleOutcome]
    override: dict[str, str] | None = None
    resumed: bool = False

    @property
    def reasons(self) -> list[dict[str, str]]:
        """Every blocking reason, with its module (an unplanned baseline's why)."""
        return [{"module": m.module, **r} for m in self.modules for r in m.reasons]

    @property
    def package_bytes(self) -> int:
        return sum(m.package["bytes"] for m in self.modules if m.package)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "date": self.date.isoformat(), "kind": self.kind,
                "baseline": self.baseline, "baseline_id": self.baseline_id, "sequence": self.sequence,
                "override": self.override, "modules": [m.to_json() for m in self.modules],
                "reasons": self.reasons, "package_bytes": self.package_bytes}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ReleaseOutcome:
        modules = [ModuleOutcome(m["module"], m["status"], m["verdict"], m["summary"], m["reasons"], m["package"])
                   for m in doc["modules"]]
        return cls(doc["index"], doc["name"], dt.date.fromisoformat(doc["date"]), doc["kind"], doc["baseline"],
                   doc["baseline_id"], doc["sequence"], modules, doc["override"], resumed=True)


@dataclass
class TrainResult:
    manifest: Manifest
    out_dir: Path
    releases: list[ReleaseOutcome]
    figures: dict[str, Any]
    cache: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"schema": TRAIN_SCHEMA, "train": self.manifest.name, "manifest": str(self.manifest.path),
                "policy": self.manifest.policy.to_json(), "releases": [r.to_json() for r in self.releases],
                "figures": self.figures, "cache": self.cache}
