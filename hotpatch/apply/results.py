"""What an apply, a rollback and a recovery report: the records the CLI prints as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .backend import CommitReport
from .imports import ResolvedImport
from .redirects import SiteRedirect
from .status import CodeHash

__all__ = ["ApplyResult", "RecoveryReport", "RollbackResult"]


def _report_json(report: CommitReport | None) -> dict[str, Any] | None:
    return asdict(report) if report is not None else None


@dataclass
class ApplyResult:
    pid: int
    package_id: str
    module: str
    module_base: int
    status: str  # applied | dry-run
    sequence: int = 0
    serial: int = 0
    allocation_va: int = 0
    allocation_size: int = 0
    function_table_va: int = 0
    sites: list[SiteRedirect] = field(default_factory=list)
    imports: list[ResolvedImport] = field(default_factory=list)
    code_hash: CodeHash | None = None
    commit: CommitReport | None = None
    replaced: str | None = None
    replaced_released: bool | None = None
    durations_ms: dict[str, float] = field(default_factory=dict)
    #: where each blob of the package was placed in the target
    blob_vas: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "package_id": self.package_id,
            "status": self.status,
            "module": self.module,
            "module_base": self.module_base,
            "sequence": self.sequence,
            "allocation": {"va": self.allocation_va, "size": self.allocation_size},
            "function_table": self.function_table_va,
            "sites": [
                {"rva": s.rva, "function": s.function, "strategy": s.strategy.name, "target": s.target_va}
                for s in self.sites
            ],
            "imports": [i.to_json() for i in self.imports],
            "code_hash": self.code_hash.to_json() if self.code_hash else None,
            "commit": _report_json(self.commit),
            "replaced": self.replaced,
            "replaced_released": self.replaced_released,
            "durations_ms": self.durations_ms,
        }


@dataclass
class RollbackResult:
    pid: int
    package_id: str
    serial: int
    commit: CommitReport | None = None
    released: bool | None = None  # None until the transaction ends; False: the code is retained

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "package_id": self.package_id,
            "status": "rolled_back",
            "commit": _report_json(self.commit),
            "code": {None: "pending", True: "freed", False: "retained"}[self.released],
        }


@dataclass
class RecoveryReport:
    pid: int
    actions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not any(a["outcome"] == "inconsistent" for a in self.actions)

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "consistent": self.consistent, "actions": self.actions}
