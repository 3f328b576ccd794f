"""The verdict: can this update be applied to running processes, or does it need a new baseline?

NEW_BASELINE for anything a running process cannot take without a restart,
one machine-readable reason per blocking item (kinds listed in docs/CLI.md);
everything else is HOTPATCH. A user who knows better may override the
data-layout heuristic; the override is recorded in the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..analysis.api import diff_kernels
from ..collector import gc_paused
from ..diff.result import DataChange, DiffResult
from .clobbers import gcc_built, live_clobbers, new_clobbers
from .layout import LayoutEvidence, find_layout_changes
from .ownership import ownership_changes
from .redirect import obstacles, redirectable

__all__ = ["HOTPATCH", "NEW_BASELINE", "NOTE_KINDS", "REASON_KINDS", "Reason", "Verdict", "decide", "diff_document"]

HOTPATCH = "HOTPATCH"
NEW_BASELINE = "NEW_BASELINE"

REASON_KINDS = {
    "changed_writable_data": "initialised writable data changed; the running process has its own state",
    "removed_data": "writable data the old code used is gone",
    "resized_data": "writable data changed size; the process holds the old size",
    "changed_exports": "an export was removed or now designates other code or data; other modules bound to "
                       "the old one",
    "tls_change": "thread-local storage changed; existing threads have the old layout",
    "entry_point_change": "the entry point changed; it already ran in every process",
    "function_too_short": "a changed function is too short to redirect and has no usable padding",
    "unsupported_reference": "changed code makes a reference the package builder cannot relocate",
    "data_layout_change": "a structure the process keeps in memory changed its layout",
    "uncovered_code": "executable bytes no discovered function covers changed; a package cannot carry them",
    "register_clobber": "a changed function writes a volatile register its old version left alone, and old "
                        "code that stays in the process (GCC -fipa-ra) reads it after a direct call",
    "ownership_change": "a changed function frees, or allocates into, a field of an object its old version "
                        "handled otherwise; objects made by the old code would be freed twice or leak",
}

_DATA_REASONS = {
    "changed_writable_data": "changed_writable_data",
    "removed_data": "removed_data",
    "resized_data": "resized_data",
    "removed_export": "changed_exports",
    "changed_export": "changed_exports",
    "tls_change": "tls_change",
    "entry_point_change": "entry_point_change",
    "uncovered_code": "uncovered_code",
}

NOTE_KINDS = {
    "added_export": "a new export: no code already loaded can have bound to it (a reason with --strict-exports)",
}

#: a rel8 branch leaving a function is routed through an island appended to the new code; it must reach it
_REL8_ISLAND_REACH = 120


@dataclass(frozen=True)
class Reason:
    kind: str
    subject: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "subject": self.subject, "message": self.message}


@dataclass(frozen=True)
class Verdict:
    status: str
    reasons: tuple[Reason, ...]
    #: reasons the user overrode (``allow_layout_change``); recorded, not blocking
    overridden: tuple[Reason, ...] = ()
    #: what changed without blocking (kinds in ``NOTE_KINDS``)
    notes: tuple[Reason, ...] = ()
    #: the layout traces behind a data_layout_change reason (blocking or overridden)
    evidence: tuple[LayoutEvidence, ...] = field(default=(), repr=False)

    @property
    def hotpatchable(self) -> bool:
        return self.status == HOTPATCH

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "reasons": [r.to_json() for r in self.reasons],
                "overridden": [r.to_json() for r in self.overridden], "notes": [r.to_json() for r in self.notes]}


def diff_document(result: DiffResult, verdict: Verdict, functions: bool = True) -> dict[str, Any]:
    """The ``hotpatch.diff/1`` document: the diff, then its verdict (``functions=False``: see
    ``DiffResult.to_json``)."""
    return {**result.to_json(functions), "verdict": verdict.to_json()}


def decide(result: DiffResult, allow_layout_change: bool = False, strict_exports: bool = False) -> Verdict:
    """HOTPATCH or NEW_BASELINE for ``result``; ``strict_exports`` makes a new export a blocking reason
    rather than a note, ``allow_layout_change`` records layout evidence without blocking on it."""
    with gc_paused():  # like the diff: many small objects, no cycles, and both tables a collection would walk
        return _decide(result, allow_layout_change, strict_exports)


def _decide(result: DiffResult, allow_layout_change: bool, strict_exports: bool) -> Verdict:
    reasons: list[Reason] = []
    notes: list[Reason] = []
    for change in result.data:
        if change.kind == "added_export":
            if strict_exports:
                reasons.append(Reason("changed_exports", change.detail,
                                      f"{REASON_KINDS['changed_exports']}: added_export {change.detail} "
                                      "(--strict-exports)"))
            else:
                notes.append(Reason("added_export", change.detail,
                                    f"new export {change.detail}: {NOTE_KINDS['added_export']}"))
            continue
        kind = _DATA_REASONS.get(change.kind)
        if kind is None:
            continue
        subject = change.detail if kind == "changed_exports" else _rva_subject(change)
        reasons.append(Reason(kind, subject, f"{REASON_KINDS[kind]}: {change.kind} {change.detail}"))
    # what the reference check of every changed or added function reads, looked up once
    sections = tuple((s.rva, s.end_rva, 0) for s in sorted(result.patched.image.sections, key=lambda s: s.rva))
    unsupported = diff_kernels(result.patched.backend).unsupported_refs
    for entry in result.functions:
        if entry.status == "changed" and entry.baseline is not None:
            if not redirectable(result.baseline, entry.baseline):
                why = "; ".join(f"{strategy}: {reason}"
                                for strategy, reason in obstacles(result.baseline, entry.baseline).items())
                reasons.append(Reason("function_too_short", entry.baseline.label,
                                      f"{entry.baseline.label} is {entry.baseline.size} bytes with "
                                      f"{entry.baseline.pad_before}/{entry.baseline.pad_after} bytes of padding "
                                      f"before/after: no redirect fits ({why})"))
        if entry.status in ("changed", "added") and entry.patched is not None:
            reasons.extend(_unsupported_references(result, entry.patched, unsupported, sections))
    reasons.extend(_register_clobbers(result))
    reasons.extend(_ownership_changes(result))
    evidence = find_layout_changes(result)
    overridden: list[Reason] = []
    if evidence:
        layout = Reason("data_layout_change", evidence[0].function,
                        f"{REASON_KINDS['data_layout_change']}: " + "; ".join(e.detail for e in evidence))
        (overridden if allow_layout_change else reasons).append(layout)
    status = NEW_BASELINE if reasons else HOTPATCH
    return Verdict(status, tuple(reasons), tuple(overridden), tuple(notes), tuple(evidence))


def _rva_subject(change: DataChange) -> str:
    rva = change.baseline_rva if change.baseline_rva is not None else change.patched_rva
    where = f"{change.section}:" if change.section else ""
    return f"{where}{rva:#x}" if rva is not None else change.kind


def _unsupported_references(result: DiffResult, function: Any, unsupported: Any,
                            sections: tuple[tuple[int, int, int], ...]) -> list[Reason]:
    """Reasons for the references of ``function`` (patched) a package cannot relocate: ``unsupported`` is the
    diff kernels' ``unsupported_refs``, ``sections`` the patched image's as it takes them."""
    table = result.patched
    out = []
    for why, insn_rva, target in unsupported(table.analysis_of(function).raw_refs, function.ranges,
                                             function.size > _REL8_ISLAND_REACH, sections, table.context.iat):
        label = function.label  # (made only for a reason: most functions have none)
        if why == 0:
            out.append(Reason("unsupported_reference", label,
                              f"{label}: rel8 branch at {insn_rva:#x} leaves a function too long for a relay island"))
        else:
            out.append(Reason("unsupported_reference", label,
                              f"{label}: reference at {insn_rva:#x} to {target:#x}, outside the image"))
    return out


def _register_clobbers(result: DiffResult) -> list[Reason]:
    """A reason per call site in old code that stays in the process and reads a register the new callee clobbers."""
    if not gcc_built(result.baseline):
        return []
    redirected = {entry.baseline.rva for entry in result.functions
                  if entry.status == "changed" and entry.baseline is not None}
    out = []
    for entry in result.functions:
        if entry.status != "changed" or entry.baseline is None or entry.patched is None:
            continue
        extra = new_clobbers(result.baseline, entry.baseline, result.patched, entry.patched)
        if not extra:
            continue
        callee = entry.baseline.label
        sites: dict[tuple[str, int], list[str]] = {}
        for live in live_clobbers(result.baseline, entry.baseline, extra, lambda f: f.rva not in redirected):
            sites.setdefault((live.caller.label, live.site_rva), []).append(live.register)
        for (caller, site), registers in sorted(sites.items(), key=lambda kv: kv[0][1]):
            names = ", ".join(sorted(set(registers)))
            out.append(Reason("register_clobber", callee,
                              f"{caller} keeps {names} live across its call to {callee} at {site:#x}, and the new "
                              f"{callee} writes {names} (GCC -fipa-ra; build with -fno-ipa-ra to hotpatch)"))
    return out


def _ownership_changes(result: DiffResult) -> list[Reason]:
    """A reason per field whose heap ownership a changed function's new version handles differently."""
    out = []
    for entry in result.functions:
        if entry.status != "changed" or entry.baseline is None or entry.patched is None:
            continue
        if set(entry.changes) <= {"rodata"}:
            continue  # the same instructions calling the same functions: the same evidence, as if unchanged
        for change in ownership_changes(result.baseline, entry.baseline, result.patched, entry.patched):
            out.append(Reason("ownership_change", change.function,
                              f"{REASON_KINDS['ownership_change']}: {change.detail}"))
    return out
