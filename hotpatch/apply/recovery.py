"""Recovery: bringing journaled operations that were cut short to an end, as the target's memory says.

An apply or rollback interrupted between its journal intent and its result
(the host killed, the agent lost) is finished when memory holds its commit,
undone when it holds none of it, and reported inconsistent when it holds
part of it or the journal does not match the package.
"""

from __future__ import annotations

from ..errors import BackendError, JournalError, ProcessGoneError
from .enginetypes import EngineView
from .journal import (
    ALLOCATED,
    APPLIED,
    APPLYING,
    FAILED,
    INTENT,
    PENDING,
    RETAINED,
    ROLLING_BACK,
    UNDONE,
    PackageRecord,
)
from .results import RecoveryReport
from .status import OURS, site_state

__all__ = ["recover"]


def recover(engine: EngineView) -> RecoveryReport:
    """Bring every journaled operation that was cut short to an end, as memory says it stands."""
    report = RecoveryReport(engine.pid)
    with engine.process_journal.locked() as journal:
        for record in list(journal.records):
            before = record.phase
            try:
                outcome, note = _recover_record(engine, record)
            except JournalError as exc:  # the journal does not match the package or the target's memory
                outcome, note = "inconsistent", str(exc)
            if outcome:
                report.actions.append(
                    {
                        "serial": record.serial,
                        "package_id": record.package_id,
                        "before": before,
                        "after": record.phase,
                        "outcome": outcome,
                        "allocation": record.allocation.state if record.allocation else None,
                        "note": note,
                    }
                )
        journal.save()
    return report

def _recover_record(engine: EngineView, record: PackageRecord) -> tuple[str, str]:
    journal = engine.process_journal
    commit = record.commit
    if record.phase in (APPLYING, ROLLING_BACK):
        pending = commit is not None and commit.state == PENDING
        outcome = engine.commit_outcome(commit.writes) if pending and commit else "expected"
        if outcome == "mixed":
            return "inconsistent", "memory holds part of a commit: foreign changes; left as it is"
        if record.phase == APPLYING:
            if outcome == "new":
                engine.mark_applied(record)
                if record.replaces is not None:
                    engine.release(journal.record(record.replaces))
                return "completed", "the commit had happened: the package is applied"
            if commit is not None:
                commit.state = FAILED
            record.phase = UNDONE
            journal.event(record, "recover", "undo")
            lost = record.allocation is not None and record.allocation.state == INTENT
            engine.release(record, check_threads=False)
            note = "the commit had not happened: allocation, function table and libraries removed"
            if lost:
                note += "; an allocation was requested but its address was never journaled: it may have leaked"
            return "undone", note
        if outcome == "new":
            engine.mark_rolled_back(record)
            released = engine.release(record)
            return "completed", "the rollback's commit had happened" + ("" if released else "; code retained")
        if commit is not None:
            commit.state = FAILED
        record.phase = APPLIED
        journal.event(record, "recover", "still applied")
        return "kept", "the rollback's commit had not happened: the package is still applied"
    if record.allocation is not None and record.allocation.state in (ALLOCATED, RETAINED) and not record.live:
        released = engine.release(record)
        return ("released" if released else "retained"), "code of a package no longer applied"
    if record.phase == APPLIED:
        try:
            states = {site_state(engine.backend, site).state for site in record.sites}
        except ProcessGoneError:
            raise
        except BackendError as exc:
            return "inconsistent", f"sites cannot be read: {exc}"
        if states == {OURS}:
            return "verified", "every site holds our redirect"
        return "inconsistent", f"sites found {', '.join(sorted(states))}"
    return "", ""
