"""Diff of everything that is not function code: data, imports, exports, TLS, entry point, load config.

Baseline data maps to patched data through the references of matched
instructions (the same operand of matched instructions points at
corresponding data). Votes from unchanged functions are trusted first; a
changed function can only map what they left unmapped.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable
from operator import itemgetter

from ..analysis.functions import FunctionTable
from .dataitems import DataItems
from .pairing import Pairing
from .result import ADDED, CHANGED, REMOVED, UNCHANGED, DataChange, FunctionDiff
from .targets import TargetClassifier

__all__ = ["diff_data"]

def diff_data(a: FunctionTable, b: FunctionTable, functions: list[FunctionDiff], function_map: dict[int, int],
              pairing: Pairing) -> tuple[list[DataChange], dict[int, int]]:
    items_a, items_b = pairing.items()
    data_map = _data_map(a, b, pairing, functions, function_map)
    changes: list[DataChange] = []

    def section_name(items: DataItems, rva: int) -> str | None:
        section = items.section(rva)
        return section.name if section else None

    # mapped items whose content differs
    for rva_a, rva_b in sorted(data_map.items()):
        if rva_a in pairing.jump_tables_a or pairing.items_equal(rva_a, rva_b):
            continue
        writable = pairing.targets_a.is_writable_data(rva_a)
        kind = "changed_writable_data" if writable else "changed_rodata"
        size = min(items_a.extent(rva_a), items_b.extent(rva_b))
        changes.append(DataChange(kind, rva_a, rva_b, size, section_name(items_a, rva_a),
                                  f"{size} bytes at baseline {rva_a:#x} differ from patched {rva_b:#x}"))
    changes.extend(_resized(items_a, items_b, pairing))

    # data only the new code references
    mapped_b = set(data_map.values())
    moved = [f for f in functions if f.status != UNCHANGED]  # the others are most of a large diff
    changed_b = pairing.targets_b.data_targets_of([f.patched for f in moved
                                                   if f.patched is not None and f.status in (CHANGED, ADDED)])
    for rva in sorted(changed_b - mapped_b):
        writable = pairing.targets_b.is_writable_data(rva)
        if not writable:
            kind = "new_rodata"
        elif items_b.is_zero_initialised(rva):
            kind = "new_bss"
        else:
            kind = "new_data"
        size = items_b.extent(rva)
        changes.append(DataChange(kind, None, rva, size, section_name(items_b, rva),
                                  f"new {size}-byte item at patched {rva:#x}"))
    # data only the old code referenced
    changed_a = pairing.targets_a.data_targets_of([f.baseline for f in moved
                                                   if f.baseline is not None and f.status in (CHANGED, REMOVED)])
    for rva in sorted(changed_a - set(data_map)):
        writable = pairing.targets_a.is_writable_data(rva)
        kind = "removed_data" if writable else "removed_rodata"
        changes.append(DataChange(kind, rva, None, items_a.extent(rva), section_name(items_a, rva),
                                  f"baseline item at {rva:#x} is no longer referenced"))

    changes.extend(_imports(a, b))
    changes.extend(_exports(a, b, function_map, data_map))
    changes.extend(_tls(a, b))
    changes.extend(_entry_point(a, b, function_map, functions))
    changes.extend(_load_config(a, b))
    return changes, data_map


def _data_map(a: FunctionTable, b: FunctionTable, pairing: Pairing, functions: list[FunctionDiff],
              function_map: dict[int, int]) -> dict[int, int]:
    """Baseline data RVA -> patched data RVA: by symbol name, by matched instructions, by identical content."""
    data_map: dict[int, int] = {}
    taken: set[int] = set()

    def pair(pairs: Iterable[tuple[int, int]]) -> None:
        """Each (rva_a, rva_b) in turn, unless one side is mapped already (a loop here, not a call per pair)."""
        for rva_a, rva_b in pairs:
            if rva_a not in data_map and rva_b not in taken:
                data_map[rva_a] = rva_b
                taken.add(rva_b)

    pair(_same_named_data(a, b, pairing))
    pair(_exported_data(a, b, pairing))
    for source in ("unchanged", "changed"):
        # most votes first, ties by pair: sorted by pair, then stably by count (no key tuple made per pair)
        ordered = sorted(pairing.data_votes[source].items())
        ordered.sort(key=itemgetter(1), reverse=True)
        pair(map(itemgetter(0), ordered))
    # What a changed function still reads, maybe through different instructions: unique identical content.
    items_a, items_b = pairing.items()
    changed = [entry for entry in functions
               if entry.status == CHANGED and entry.baseline is not None and entry.patched is not None]
    baselines = [entry.baseline for entry in changed]
    # only a function reading data still unmapped can map more (the map only grows): those found in one pass
    unmapped = pairing.targets_a.data_targets_of(baselines).difference(data_map)
    for index in pairing.targets_a.reaching(baselines, unmapped) if unmapped else ():
        entry = changed[index]
        left = sorted(pairing.targets_a.data_targets(entry.baseline).difference(data_map))
        if not left:
            continue
        by_key: dict[tuple[bool, bytes], list[int]] = defaultdict(list)
        for rva_b in sorted(pairing.targets_b.data_targets(entry.patched).difference(taken)):
            by_key[(pairing.targets_b.is_writable_data(rva_b), _content_key(items_b, rva_b))].append(rva_b)
        for rva_a in left:
            key = (pairing.targets_a.is_writable_data(rva_a), _content_key(items_a, rva_a))
            same = [rva_b for rva_b in by_key.get(key, ()) if rva_b not in taken
                    and pairing.items_equal(rva_a, rva_b)]
            if len(same) == 1:
                pair(((rva_a, same[0]),))
    return data_map


def _content_key(items: DataItems, rva: int) -> bytes:
    """The first bytes of an item, pointer slots blanked: equal items have equal keys."""
    length = min(8, items.extent(rva))
    raw = bytearray(items.contents(rva, length))
    for offset in items.pointer_slots(rva - 7, length + 7):  # slots that overlap the first bytes
        low, high = max(0, offset - 7), min(length, offset + 1)
        raw[low:high] = bytes(max(0, high - low))
    return bytes(raw)


def _same_named_data(a: FunctionTable, b: FunctionTable, pairing: Pairing) -> list[tuple[int, int]]:
    """Data symbols of the same name that code references on both sides."""
    def named(table: FunctionTable, targets: TargetClassifier) -> dict[str, int]:
        referenced = targets.all_data_targets()
        seen: dict[str, list[int]] = {}
        for symbol in table.image.symbols:
            if symbol.rva in referenced:
                seen.setdefault(symbol.name, []).append(symbol.rva)
        return {name: rvas[0] for name, rvas in seen.items() if len(rvas) == 1}

    left, right = named(a, pairing.targets_a), named(b, pairing.targets_b)
    return [(left[name], right[name]) for name in sorted(left.keys() & right.keys())]


def _exported_data(a: FunctionTable, b: FunctionTable, pairing: Pairing) -> list[tuple[int, int]]:
    """Data exported under the same name on both sides: the name says it is the same item."""
    def exported(table: FunctionTable, targets: TargetClassifier) -> dict[str, int]:
        return {export.name: export.rva for export in table.image.exports
                if export.name and export.forwarder is None and targets.is_data(export.rva)}

    left, right = exported(a, pairing.targets_a), exported(b, pairing.targets_b)
    return [(left[name], right[name]) for name in sorted(left.keys() & right.keys())]


def _resized(items_a: DataItems, items_b: DataItems, pairing: Pairing) -> list[DataChange]:
    """Writable objects that matched code now reaches past their old extent.

    A PE image carries no data sizes, and a different distance to the next
    label is no evidence (alignment and neighbours move labels). Evidence is
    an instruction of a matched function, paired with one that read an
    object, now reaching past the bytes the object had before, measured from
    the object's symbol on each side (so only images with symbols give it).
    The old extent runs to the next label, padding included, so what passes
    it certainly grew.
    """
    objects_a, objects_b = _data_objects(items_a), _data_objects(items_b)
    if not objects_a or not objects_b:
        return []
    rvas_a = sorted(objects_a)
    by_name_b = {name: rva for rva, name in objects_b.items()}
    found: dict[tuple[int, int], tuple[int, int]] = {}
    for source in ("unchanged", "changed"):
        for rva_a, rva_b in pairing.data_votes[source]:
            if not pairing.targets_a.is_writable_data(rva_a):
                continue
            index = bisect_right(rvas_a, rva_a) - 1
            if index < 0 or index + 1 >= len(rvas_a):
                continue
            base_a, following = rvas_a[index], rvas_a[index + 1]
            base_b = by_name_b.get(objects_a[base_a])
            if base_b is None or not 0 <= rva_b - base_b:
                continue
            extent, reach = following - base_a, rva_b - base_b
            if reach >= extent and reach > found.get((base_a, base_b), (0, 0))[0]:
                found[(base_a, base_b)] = (reach, extent)
    return [DataChange("resized_data", base_a, base_b, None, None,
                       f"matched code now reaches {objects_a[base_a]}+{reach:#x}, past the {extent} bytes it "
                       f"had in the baseline")
            for (base_a, base_b), (reach, extent) in sorted(found.items())]


def _data_objects(items: DataItems) -> dict[int, str]:
    """RVA -> name of the data symbols with a name of their own (not section labels), unique by name."""
    seen: dict[str, list[int]] = defaultdict(list)
    for symbol in items.image.symbols:
        if not symbol.is_function and not symbol.name.startswith(".") and items.classifier.is_data(symbol.rva):
            seen[symbol.name].append(symbol.rva)
    return {rvas[0]: name for name, rvas in seen.items() if len(rvas) == 1}


def _imports(a: FunctionTable, b: FunctionTable) -> list[DataChange]:
    labels_a = {imp.label for imp in a.image.imports}
    labels_b = {imp.label: imp for imp in b.image.imports}
    out = [DataChange("new_import", None, labels_b[label].iat_rva, None, None, label)
           for label in sorted(labels_b.keys() - labels_a)]
    out += [DataChange("removed_import", None, None, None, None, label) for label in sorted(labels_a - labels_b.keys())]
    return out


def _exports(a: FunctionTable, b: FunctionTable, function_map: dict[int, int],
             data_map: dict[int, int]) -> list[DataChange]:
    """Removed and added exports, and those that now designate other code or data.

    An export is unchanged when its baseline item maps to the patched one (a
    function by the matching, data by the data map): a package keeps using the
    baseline's items, and the export table in memory still points at them.
    """
    def key(export: object) -> str:
        return export.name if export.name else f"#{export.ordinal}"  # type: ignore[attr-defined]

    exports_a = {key(e): e for e in a.image.exports}
    exports_b = {key(e): e for e in b.image.exports}
    out = []
    for name in sorted(exports_a.keys() - exports_b.keys()):
        out.append(DataChange("removed_export", exports_a[name].rva, None, None, None, name))
    for name in sorted(exports_b.keys() - exports_a.keys()):
        out.append(DataChange("added_export", None, exports_b[name].rva, None, None, name))
    for name in sorted(exports_a.keys() & exports_b.keys()):
        old, new = exports_a[name], exports_b[name]
        if old.forwarder or new.forwarder:
            same = old.forwarder == new.forwarder
        elif old.rva in function_map:
            same = function_map[old.rva] == new.rva
        else:
            same = data_map.get(old.rva) == new.rva
        if not same:
            out.append(DataChange("changed_export", old.rva, new.rva, None, None, name))
    return out


def _tls(a: FunctionTable, b: FunctionTable) -> list[DataChange]:
    tls_a, tls_b = a.image.tls, b.image.tls
    if tls_a is None and tls_b is None:
        return []
    if tls_a is None or tls_b is None:
        return [DataChange("tls_change", None, None, None, None,
                           "TLS directory added" if tls_a is None else "TLS directory removed")]
    details = []
    if tls_a.template != tls_b.template or tls_a.zero_fill != tls_b.zero_fill:
        details.append("thread-local data template changed")
    if len(tls_a.callback_rvas) != len(tls_b.callback_rvas):
        details.append("TLS callbacks changed")
    return [DataChange("tls_change", None, None, None, None, "; ".join(details))] if details else []


def _entry_point(a: FunctionTable, b: FunctionTable, function_map: dict[int, int],
                 functions: list[FunctionDiff]) -> list[DataChange]:
    entry_a, entry_b = a.image.entry_rva, b.image.entry_rva
    if entry_a is None and entry_b is None:
        return []
    if entry_a is None or entry_b is None or function_map.get(entry_a) != entry_b:
        return [DataChange("entry_point_change", entry_a, entry_b, None, None, "entry point moved to other code")]
    status = next((f.status for f in functions if f.baseline is not None and f.baseline.rva == entry_a), None)
    if status == "changed":
        return [DataChange("entry_point_change", entry_a, entry_b, None, None, "entry point code changed")]
    return []


def _load_config(a: FunctionTable, b: FunctionTable) -> list[DataChange]:
    fields = ("guard_flags",)
    out = []
    for name in fields:
        old, new = a.image.load_config.get(name), b.image.load_config.get(name)
        if old != new:
            out.append(DataChange("load_config_change", None, None, None, None, f"{name}: {old} -> {new}"))
    return out
