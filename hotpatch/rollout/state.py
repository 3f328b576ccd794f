"""Rollout state in SQLite: every target's state and history, and the lock row of the orchestrator.

The state machine of one target (a host and the processes its selector
picks)::

    pending ──► applying ──► applied ──► rolling_back ──► rolled_back
                   │  ├────► failed        (the package is not in its processes)
                   │  └────► unhealthy ──► rolling_back  (still applied, gate failed)
                   └───────► unknown ──► checking ──► pending | applying | applied | rolling_back | ...

``applying`` is written (and committed) *before* the task is sent, so an
orchestrator killed at any point leaves every target it may have touched in
``applying``, ``rolling_back`` or ``checking``; a resumed orchestrator turns
those into ``unknown``, and an unknown target is read back from its
processes' memory (``checking``) before anything is retried: no target is
patched twice or forgotten. Every transition is one SQLite transaction with
its history row. The ``locks`` row names the orchestrator holding a rollout
(host name, pid, heartbeat); a second one is refused while the holder lives.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RolloutError, RolloutLockedError

__all__ = [
    "APPLIED", "APPLYING", "CHECKING", "FAILED", "IN_FLIGHT", "PENDING", "ROLLED_BACK", "ROLLING_BACK",
    "STATES", "TRANSITIONS", "UNHEALTHY", "UNKNOWN", "HAS_PACKAGE",
    "RolloutRow", "RolloutStore", "TargetRow",
]

PENDING, APPLYING, APPLIED, FAILED, UNHEALTHY = "pending", "applying", "applied", "failed", "unhealthy"
ROLLING_BACK, ROLLED_BACK, UNKNOWN, CHECKING = "rolling_back", "rolled_back", "unknown", "checking"
STATES = (PENDING, APPLYING, APPLIED, FAILED, UNHEALTHY, ROLLING_BACK, ROLLED_BACK, UNKNOWN, CHECKING)
TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING: frozenset({APPLYING}),
    APPLYING: frozenset({APPLIED, FAILED, UNHEALTHY, UNKNOWN}),
    APPLIED: frozenset({ROLLING_BACK}),
    UNHEALTHY: frozenset({ROLLING_BACK}),
    ROLLING_BACK: frozenset({ROLLED_BACK, UNHEALTHY, UNKNOWN}),
    UNKNOWN: frozenset({CHECKING}),
    CHECKING: frozenset({PENDING, APPLYING, APPLIED, ROLLING_BACK, ROLLED_BACK, UNHEALTHY, UNKNOWN}),
    FAILED: frozenset(),
    ROLLED_BACK: frozenset(),
}
#: a task may be running for a target in these states (a killed orchestrator leaves them behind)
IN_FLIGHT = (APPLYING, ROLLING_BACK, CHECKING)
#: the package may be in the target's processes
HAS_PACKAGE = (APPLIED, UNHEALTHY)
#: a holder silent this long (seconds) is presumed dead even on another machine
STALE_LOCK = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, plan TEXT NOT NULL, fingerprint TEXT NOT NULL, package_id TEXT NOT NULL,
    status TEXT NOT NULL, reason TEXT, created REAL NOT NULL, updated REAL NOT NULL, report TEXT);
CREATE TABLE IF NOT EXISTS targets (
    rollout TEXT NOT NULL, host TEXT NOT NULL, wave INTEGER NOT NULL, grp TEXT NOT NULL, spec TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL, detail TEXT,
    PRIMARY KEY (rollout, host));
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rollout TEXT NOT NULL, host TEXT NOT NULL, time REAL NOT NULL,
    old TEXT, new TEXT NOT NULL, detail TEXT);
CREATE INDEX IF NOT EXISTS history_by_host ON history (rollout, host);
CREATE TABLE IF NOT EXISTS locks (
    rollout TEXT PRIMARY KEY, holder TEXT NOT NULL, hostname TEXT NOT NULL, pid INTEGER NOT NULL,
    acquired REAL NOT NULL, heartbeat REAL NOT NULL);
"""


@dataclass(frozen=True)
class TargetRow:
    host: str
    wave: int
    group: str
    spec: dict[str, Any]
    state: str
    attempts: int
    updated: float
    detail: dict[str, Any] | None


@dataclass(frozen=True)
class RolloutRow:
    id: str
    plan: dict[str, Any]
    fingerprint: str
    package_id: str
    status: str
    reason: str | None
    created: float
    updated: float
    report: dict[str, Any] | None


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), default=str)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class RolloutStore:
    """One SQLite database of rollouts (a file, or ":memory:" for simulations)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL" if self.path != ":memory:" else "PRAGMA journal_mode=MEMORY")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise RolloutError(f"{self.path}: not a rollout database: {exc}") from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- rollouts --------------------------------------------------------------------

    def create(self, rollout_id: str, plan: dict[str, Any], fingerprint: str, package_id: str,
               targets: list[tuple[str, int, str, dict[str, Any]]], at: float) -> None:
        """Record a new rollout and its targets (host, wave, group, spec), all pending."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM rollouts WHERE id = ?", (rollout_id,)).fetchone():
                raise RolloutError(f"rollout {rollout_id!r} already exists in {self.path}: "
                                   "use `hotpatch rollout resume` (or another name)")
            db.execute("INSERT INTO rollouts VALUES (?, ?, ?, ?, 'running', NULL, ?, ?, NULL)",
                       (rollout_id, _dumps(plan), fingerprint, package_id, at, at))
            db.executemany("INSERT INTO targets VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, NULL)",
                           [(rollout_id, host, wave, group, _dumps(spec), at) for host, wave, group, spec in targets])
            db.executemany("INSERT INTO history (rollout, host, time, old, new) VALUES (?, ?, ?, NULL, ?)",
                           [(rollout_id, host, at, PENDING) for host, *_ in targets])

    def rollout(self, rollout_id: str) -> RolloutRow:
        row = self.db.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        if row is None:
            raise RolloutError(f"no rollout {rollout_id!r} in {self.path}")
        return RolloutRow(row[0], _loads(row[1]), row[2], row[3], row[4], row[5], row[6], row[7], _loads(row[8]))

    def rollouts(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM rollouts ORDER BY created")]

    def set_status(self, rollout_id: str, status: str, at: float, reason: str | None = None,
                   report: dict[str, Any] | None = None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE rollouts SET status = ?, reason = COALESCE(?, reason), updated = ?, "
                       "report = COALESCE(?, report) WHERE id = ?", (status, reason, at, _dumps(report), rollout_id))

    # -- targets ---------------------------------------------------------------------

    def targets(self, rollout_id: str) -> list[TargetRow]:
        rows = self.db.execute("SELECT host, wave, grp, spec, state, attempts, updated, detail FROM targets "
                               "WHERE rollout = ? ORDER BY wave, rowid", (rollout_id,))
        return [TargetRow(r[0], r[1], r[2], _loads(r[3]), r[4], r[5], r[6], _loads(r[7])) for r in rows]

    def transition(self, rollout_id: str, host: str, new: str, at: float, detail: dict[str, Any] | None = None) -> str:
        """Move a target to ``new`` (checked against the state machine); returns the old state."""
        with self.transaction() as db:
            row = db.execute("SELECT state FROM targets WHERE rollout = ? AND host = ?", (rollout_id, host)).fetchone()
            if row is None:
                raise RolloutError(f"rollout {rollout_id!r} has no target {host!r}")
            old = row[0]
            if new not in TRANSITIONS[old]:
                raise RolloutError(f"target {host!r}: no transition {old} -> {new}")
            db.execute("UPDATE targets SET state = ?, updated = ?, detail = COALESCE(?, detail), "
                       "attempts = attempts + ? WHERE rollout = ? AND host = ?",
                       (new, at, _dumps(detail), int(new == APPLYING), rollout_id, host))
            db.execute("INSERT INTO history (rollout, host, time, old, new, detail) VALUES (?, ?, ?, ?, ?, ?)",
                       (rollout_id, host, at, old, new, _dumps(detail)))
        return old

    def history(self, rollout_id: str, host: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT host, time, old, new, detail FROM history WHERE rollout = ?"
        args: tuple[Any, ...] = (rollout_id,)
        if host is not None:
            query += " AND host = ?"
            args += (host,)
        rows = self.db.execute(query + " ORDER BY id", args)
        return [{"host": r[0], "time": r[1], "old": r[2], "new": r[3], "detail": _loads(r[4])} for r in rows]

    # -- the orchestrator lock -------------------------------------------------------------

    def acquire(self, rollout_id: str, holder: str) -> None:
        """Take the rollout for this process; RolloutLockedError naming the holder when another one lives."""
        me, pid, now = socket.gethostname(), os.getpid(), time.time()
        with self.transaction() as db:
            row = db.execute("SELECT holder, hostname, pid, acquired, heartbeat FROM locks WHERE rollout = ?",
                             (rollout_id,)).fetchone()
            if row is not None and (row[1], row[2]) != (me, pid) and _alive(row[1], row[2], row[4], now):
                since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(row[3]))
                raise RolloutLockedError(f"rollout {rollout_id!r} is held by {row[0]} (pid {row[2]} on {row[1]}, "
                                         f"since {since}); refused")
            db.execute("INSERT OR REPLACE INTO locks VALUES (?, ?, ?, ?, ?, ?)",
                       (rollout_id, holder, me, pid, now, now))

    def heartbeat(self, rollout_id: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE locks SET heartbeat = ? WHERE rollout = ? AND hostname = ? AND pid = ?",
                       (time.time(), rollout_id, socket.gethostname(), os.getpid()))

    def release(self, rollout_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM locks WHERE rollout = ? AND hostname = ? AND pid = ?",
                       (rollout_id, socket.gethostname(), os.getpid()))

    def holder(self, rollout_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT holder, hostname, pid, acquired, heartbeat FROM locks WHERE rollout = ?",
                              (rollout_id,)).fetchone()
        if row is None:
            return None
        return {"holder": row[0], "hostname": row[1], "pid": row[2], "acquired": row[3], "heartbeat": row[4],
                "alive": _alive(row[1], row[2], row[4], time.time())}


def _alive(hostname: str, pid: int, heartbeat: float, now: float) -> bool:
    """Whether a lock's holder may still run: on this machine, its pid exists; elsewhere, it beat lately."""
    if hostname == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return now - heartbeat < STALE_LOCK
