"""What the transaction and recovery need of the engine, as a Protocol, so both sit below ``engine.py``.

``Engine`` (engine.py) is the one implementation; typing against this view keeps the import graph a
tree: engine imports transaction and recovery, neither imports engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..package.model import Package
from .backend import CommitWrite, ProcessBackend
from .journal import PackageRecord, ProcessJournal
from .redirects import SiteRedirect
from .status import LoadedImage

__all__ = ["EngineView"]


class EngineView(Protocol):
    """The engine's state and shared steps that a transaction or a recovery uses."""

    backend: ProcessBackend
    pid: int
    start_time: int
    process_journal: ProcessJournal
    max_attempts: int
    retry_sleep_ms: int
    on_step: Callable[[str], None] | None

    def check_signature(self, package: Package) -> None: ...

    def find_module(self, package: Package) -> LoadedImage: ...

    def allocate(self, image: LoadedImage, size: int) -> int: ...

    def read_byte(self, va: int) -> int: ...

    def verify_record(self, record: PackageRecord, sites: bool = True) -> list[SiteRedirect]: ...

    def release(self, record: PackageRecord, check_threads: bool = True, verify: bool = True) -> bool: ...

    def process_exited(self) -> bool: ...

    def commit_outcome(self, writes: list[CommitWrite]) -> str: ...

    def mark_applied(self, record: PackageRecord) -> None: ...

    def mark_rolled_back(self, record: PackageRecord) -> None: ...
