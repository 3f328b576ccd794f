"""Building a patch package from a diff.

Every changed and added function of the patched image becomes a CODE blob;
every reference it makes becomes a fixup resolved against the *baseline*:
unchanged functions and existing data by their baseline RVA (the process's
state stays where it is), changed and added functions by their new blob, new
data by new blobs, imports by name. Addresses taken of existing functions
resolve to the baseline function (as kpatch does), so pointers the process
already holds stay valid; the redirect sends them to the new code.

Jump tables travel with their function and become fixups (table-relative or
image-relative entries). A rel8 branch that leaves its function goes through
a relay island appended to the blob. Unwind info travels too, with the RVAs
inside it expressed relative to the package's allocation (ALLOC_REL32).
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Iterable

from .. import __version__
from ..analysis.functions import Function, FunctionTable
from ..analysis.refkinds import (
    ABS64,
    BRANCH_REL8,
    IMAGE_REL32,
    JUMP_TABLE,
    RIP_RELATIVE,
    TABLE_IMAGE_REL32,
)
from ..diff.result import DiffResult
from ..errors import NotHotpatchableError
from ..verdict.redirect import possible_strategies
from ..verdict.rules import Reason, Verdict, decide
from ..verdict.strategy import Strategy
from ..x86 import disassembler
from .buildstate import BuildState, CodeBlob, Unsupported
from .model import (
    PADDING_JMP_SIZE,
    BaselineRVA,
    Blob,
    BlobKind,
    BlobTarget,
    Fixup,
    FixupKind,
    FixupTarget,
    ImportTarget,
    Metadata,
    Package,
    PatchSite,
    TargetIdentity,
    UnwindEntry,
)
from .unwindcopy import UnwindCopying

__all__ = ["build_package"]

_CODE_ALIGNMENT = 16


def build_package(result: DiffResult, *, verdict: Verdict | None = None, sequence: int = 1, description: str = "",
                  cve_ids: Iterable[str] = (), baseline_id: str | None = None, created: int | None = None,
                  origins: dict[int, int] | None = None) -> Package:
    """The package that takes a process running ``result.baseline`` to ``result.patched``.

    ``verdict`` is ``decide(result)`` with the caller's policy (default: decided here, no override).

    Raises ``NotHotpatchableError`` (exit 3) when the verdict is NEW_BASELINE
    or when something the builder meets cannot be relocated. ``origins``, if
    given, is filled with blob index -> the patched-image RVA its data came from.
    """
    if verdict is None:
        verdict = decide(result)
    if not verdict.hotpatchable:
        raise NotHotpatchableError(verdict.reasons)
    builder = _Builder(result)
    try:
        blobs, fixups, sites, unwind = builder.build()
    except Unsupported as exc:
        raise NotHotpatchableError((Reason("unsupported_reference", "package", str(exc)),)) from None
    if origins is not None:
        origins.update(builder.origins)
    image = result.baseline.image
    identity = image.identity
    return Package(
        target=TargetIdentity(image.name, identity.timedatestamp, identity.size_of_image, identity.checksum,
                              bytes.fromhex(identity.code_sha256)),
        baseline_id=baseline_id or identity.code_sha256[:16],
        sequence=sequence,
        metadata=Metadata(description=description, cve_ids=tuple(cve_ids), creator=f"hotpatch {__version__}",
                          created=created),
        blobs=tuple(blobs),
        fixups=tuple(fixups),
        sites=tuple(sites),
        unwind=tuple(unwind),
    )


class _Builder(UnwindCopying):
    def __init__(self, result: DiffResult) -> None:
        self.result = result
        self.a: FunctionTable = result.baseline
        self.b: FunctionTable = result.patched
        self.state = BuildState(result)
        self.inverse_functions = {b: a for a, b in result.function_map.items()}
        self.inverse_data = {b: a for a, b in result.data_map.items()}
        self.status = {f.patched.rva: f.status for f in result.functions if f.patched is not None}
        self.changed_rodata = {d.patched_rva for d in result.data if d.kind == "changed_rodata"}
        self.items_b = self._items_b()
        self.md = disassembler()
        self.labels_a = {imp.label: imp.iat_rva for imp in self.a.image.imports}
        #: data blob index -> the patched-image RVA its bytes come from
        self.origins: dict[int, int] = {}

    def _items_b(self) -> object:
        from ..diff.dataitems import DataItems
        from ..diff.targets import TargetClassifier

        targets = TargetClassifier(self.b)
        referenced = {ref[4] for a in self.b.analyses for ref in a.raw_refs if targets.is_data(ref[4])}
        return DataItems(self.b, targets, referenced)

    # ── the whole build ───────────────────────────────────────────────────

    def build(self) -> tuple[list[Blob], list[Fixup], list[PatchSite], list[UnwindEntry]]:
        moved = [f.patched for f in self.result.functions if f.status in ("changed", "added") and f.patched]
        for function in moved:
            self._reserve_code(function)
        for function in moved:
            self._relocate(self.state.code_of[function.rva])
        unwind = self._unwind(moved)
        sites = self._sites()
        blobs = []
        for index, blob in enumerate(self.state.blobs):
            if isinstance(blob, CodeBlob):
                data = bytes(blob.data)
                blobs.append(Blob(index, BlobKind.CODE, _CODE_ALIGNMENT, data, len(data)))
            else:
                assert blob is not None
                blobs.append(blob)
        return blobs, self.state.fixups, sites, unwind

    # ── code ──────────────────────────────────────────────────────────────

    def _reserve_code(self, function: Function) -> None:
        memory = self.b.image.memory
        data = bytearray()
        ranges = []
        for begin, end in function.ranges:
            if ranges and ranges[-1][1] == begin:
                # a chained fragment right after the previous range: one copy, so the short branches
                # between them keep their displacements (MSVC chains fragments of one function this way)
                ranges[-1] = (ranges[-1][0], end, ranges[-1][2])
                data += memory[begin:end]
                continue
            while len(data) % _CODE_ALIGNMENT and ranges:
                data.append(0xCC)
            ranges.append((begin, end, len(data)))
            data += memory[begin:end]
        index = self.state.reserve()
        blob = CodeBlob(function, index, ranges, data)
        self.state.blobs[index] = blob
        self.state.code_of[function.rva] = blob

    def _insn_length(self, rva: int) -> int:
        for _, size, _, _ in self.md.disasm_lite(self.b.image.memory[rva:rva + 15], rva, 1):
            return size
        raise Unsupported(f"cannot decode the instruction at {rva:#x}")

    def _relocate(self, blob: CodeBlob) -> None:
        analysis = self.b.analysis_of(blob.function)
        tables = {t[0]: t for t in analysis.raw_tables}
        for _, table_rva, entry_kind, targets in analysis.raw_tables:
            self._copy_jump_table(blob, table_rva, entry_kind, targets)
        for kind, insn_rva, operand_offset, operand_size, target in analysis.raw_refs:
            if kind == JUMP_TABLE:
                assert insn_rva in tables
                continue
            field_rva = insn_rva + operand_offset
            position = blob.offset_of(field_rva)
            if position is None:
                raise Unsupported(f"{blob.function.label}: reference at {insn_rva:#x} outside the copied ranges")
            insn_end = insn_rva + self._insn_length(insn_rva)
            own_range = blob.range_of(insn_rva)
            target_range = blob.range_of(target)
            relative = operand_size in (1, 4) and kind not in (ABS64, IMAGE_REL32)
            if relative and target_range is not None and target_range == own_range:
                continue  # both move together: the displacement stays right
            if kind == BRANCH_REL8:
                self._island(blob, position, insn_end, self._resolve(blob, target, call=True))
                continue
            taking_address = kind in (RIP_RELATIVE, ABS64, IMAGE_REL32)
            resolved = self._resolve(blob, target, call=not taking_address)
            blob.data[position:position + operand_size] = bytes(operand_size)
            if kind == ABS64:
                self._fixup(blob.index, position, FixupKind.ABS64, resolved)
            elif kind == IMAGE_REL32:
                self._fixup(blob.index, position, FixupKind.IMAGE_REL32, resolved)
            elif operand_size == 4:
                self._fixup(blob.index, position, FixupKind.REL32, resolved, -(insn_end - field_rva))
            else:
                raise Unsupported(f"{blob.function.label}: {operand_size}-byte reference at {insn_rva:#x}")

    def _island(self, blob: CodeBlob, position: int, insn_end: int, target: FixupTarget) -> None:
        """Route a rel8 branch leaving its range through ``jmp rel32`` appended to the blob."""
        island = len(blob.data)
        blob.data += b"\xe9\x00\x00\x00\x00"
        end_offset = blob.offset_of(insn_end)
        assert end_offset is not None
        displacement = island - end_offset
        if not -128 <= displacement <= 127:
            raise Unsupported(f"{blob.function.label}: a rel8 branch cannot reach a relay island")
        blob.data[position] = displacement & 0xFF
        self._fixup(blob.index, island + 1, FixupKind.REL32, target, -4)

    def _fixup(self, blob: int, offset: int, kind: FixupKind, target: FixupTarget, addend: int = 0) -> None:
        self.state.fixups.append(Fixup(blob, offset, kind, target, addend))

    # ── where a patched-image address goes in the target process ─────────

    def _resolve(self, blob: CodeBlob | None, target: int, call: bool) -> FixupTarget:
        """``target`` (a patched-image RVA) as the package reaches it; ``call``: a call or jump, not an address."""
        state = self.state
        if target in state.data_blob_at:
            index, offset = state.data_blob_at[target]
            return BlobTarget(index, offset)
        label = self.b.context.iat.get(target)
        if label is not None:
            return self._import_slot(label.decode())
        if blob is not None and blob.range_of(target) is not None:
            own = blob.offset_of(target)
            assert own is not None
            return BlobTarget(blob.index, own)
        function = self.b.at(target)
        if function is not None:
            status = self.status.get(function.rva)
            if status == "added" or (status == "changed" and call):
                return BlobTarget(state.code_of[function.rva].index, 0)
            return BaselineRVA(self.inverse_functions[function.rva])
        section = self.b.image.section_from_rva(target)
        if section is None:
            if 0 <= target < min(s.rva for s in self.b.image.sections):
                return BaselineRVA(target)  # the headers: __ImageBase and friends
            raise Unsupported(f"reference to {target:#x}, outside the image")
        if section.executable:
            return self._code_place(target)
        return self._data_place(target)

    def _code_place(self, target: int) -> FixupTarget:
        owner = self.b.containing(target) or self.b.preceding(target)
        if owner is None:
            raise Unsupported(f"reference into code at {target:#x} outside every function")
        if owner.rva in self.state.code_of:
            moved = self.state.code_of[owner.rva]
            offset = moved.offset_of(target)
            if offset is None:
                raise Unsupported(f"reference to {target:#x} between the copied ranges of {owner.label}")
            return BlobTarget(moved.index, offset)
        return BaselineRVA(self.inverse_functions[owner.rva] + target - owner.rva)

    def _data_place(self, target: int) -> FixupTarget:
        """Existing data stays where the process has it; new (or changed read-only) data is copied."""
        items = self.items_b
        starts = items.starts  # type: ignore[attr-defined]
        start = target
        index = bisect_right(starts, target) - 1
        if index >= 0 and target < starts[index] + items.extent(starts[index]):  # type: ignore[attr-defined]
            start = starts[index]
        if not self._is_new(start):
            return BaselineRVA(self.inverse_data[start] + target - start)
        if start not in self.state.data_blob_at:
            self._copy_data(start)
        blob, offset = self.state.data_blob_at[start]
        return BlobTarget(blob, offset + target - start)

    def _import_slot(self, label: str) -> FixupTarget:
        if label in self.labels_a:
            return BaselineRVA(self.labels_a[label])
        if label not in self.state.import_slots:
            index = self.state.reserve()
            self.state.blobs[index] = Blob(index, BlobKind.DATA, 8, bytes(8), 8)
            dll, _, name = label.partition("!")
            if name.startswith("#"):
                raise Unsupported(f"import {label} by ordinal")
            self._fixup(index, 0, FixupKind.ABS64, ImportTarget(dll, name))
            self.state.import_slots[label] = index
        return BlobTarget(self.state.import_slots[label], 0)

    # ── data ──────────────────────────────────────────────────────────────

    def _copy_data(self, target: int) -> None:
        """A blob for the new data item at ``target`` and its new neighbours (the layout between them holds)."""
        items = self.items_b
        begin = target
        end = target + max(1, items.extent(target))  # type: ignore[attr-defined]
        # grow over adjacent items that are new too, so indexing from one into the next keeps working
        while end in items.starts and self._is_new(end):  # type: ignore[attr-defined]
            end = end + max(1, items.extent(end))  # type: ignore[attr-defined]
        image = self.b.image
        section = image.section_from_rva(begin)
        assert section is not None
        zero = items.is_zero_initialised(begin)  # type: ignore[attr-defined]
        kind = BlobKind.BSS if zero else BlobKind.DATA if section.writable else BlobKind.RODATA
        index = self.state.reserve()
        data = b"" if zero else image.read(begin, end - begin)
        self.state.blobs[index] = Blob(index, kind, 16, data, end - begin)
        self.origins[index] = begin
        for start in [s for s in items.starts if begin <= s < end]:  # type: ignore[attr-defined]
            self.state.data_blob_at[start] = (index, start - begin)
        self.state.data_blob_at[target] = (index, target - begin)
        if not zero:
            self._relocate_pointers(index, begin, end)

    def _is_new(self, rva: int) -> bool:
        return rva not in self.inverse_data or rva in self.changed_rodata

    def _relocate_pointers(self, index: int, begin: int, end: int) -> None:
        """ABS64 fixups for the base-relocated pointers inside a copied data blob."""
        image = self.b.image
        blob = self.state.blobs[index]
        assert isinstance(blob, Blob)
        data = bytearray(blob.data)
        for slot in [s for s in image.relocations if begin <= s < end]:
            if slot + 8 > end:
                raise Unsupported(f"a pointer at {slot:#x} straddles the end of a copied data item")
            pointer = struct.unpack_from("<Q", image.memory, slot)[0] - image.image_base
            data[slot - begin:slot - begin + 8] = bytes(8)
            self._fixup(index, slot - begin, FixupKind.ABS64, self._resolve_pointer(None, pointer))
        self.state.blobs[index] = Blob(index, blob.kind, blob.alignment, bytes(data), blob.size)

    def _resolve_pointer(self, blob: CodeBlob | None, pointer: int) -> FixupTarget:
        """A stored address: existing functions keep their baseline address, new ones get their blob."""
        function = self.b.at(pointer)
        if function is not None:
            if self.status.get(function.rva) == "added":
                return BlobTarget(self.state.code_of[function.rva].index, 0)
            return BaselineRVA(self.inverse_functions[function.rva])
        return self._resolve(blob, pointer, call=False)

    def _copy_jump_table(self, blob: CodeBlob, table: int, entry_kind: int, targets: tuple[int, ...]) -> None:
        index = self.state.reserve()
        size = 4 * max(1, len(targets))
        self.state.blobs[index] = Blob(index, BlobKind.RODATA, 4, bytes(size), size)
        self.state.data_blob_at[table] = (index, 0)
        for position, target in enumerate(targets):
            offset = blob.offset_of(target)
            if offset is None:
                raise Unsupported(f"{blob.function.label}: jump-table entry {target:#x} outside the function")
            if entry_kind == TABLE_IMAGE_REL32:
                self._fixup(index, 4 * position, FixupKind.IMAGE_REL32, BlobTarget(blob.index, offset))
            else:  # entries relative to the table start: S - table = S + 4i - P
                self._fixup(index, 4 * position, FixupKind.REL32, BlobTarget(blob.index, offset), 4 * position)

    # ── patch sites ───────────────────────────────────────────────────────

    def _sites(self) -> list[PatchSite]:
        """One site per changed function; neighbouring sites never share a byte."""
        changed = sorted(((entry.baseline, self.state.code_of[entry.patched.rva].index)
                          for entry in self.result.functions
                          if entry.status == "changed" and entry.baseline is not None and entry.patched is not None),
                         key=lambda pair: pair[0].rva)
        options = [possible_strategies(self.a, function) for function, _ in changed]
        for position, (function, _) in enumerate(changed):
            if not options[position]:
                raise Unsupported(f"{function.label} cannot be redirected")
        # Walk backwards: each site keeps the strategies that stay clear of the next site's footprint.
        limit = None
        for position in range(len(changed) - 1, -1, -1):
            function = changed[position][0]
            if limit is not None:
                fits = [s for s in options[position] if function.rva + s.width <= limit]
                if not fits:
                    raise Unsupported(f"{function.label} is too close to the next changed function to redirect")
                options[position] = fits
            first = options[position][0]
            limit = function.rva - PADDING_JMP_SIZE if first is Strategy.SHORT_JMP_PADDING else function.rva
            options[position] = [s for s in options[position] if s is not Strategy.SHORT_JMP_PADDING or s is first]
        return [self._site(function, blob, options[position]) for position, (function, blob) in enumerate(changed)]

    def _site(self, function: Function, blob: int, strategies: list[Strategy]) -> PatchSite:
        strategies = strategies[:3]
        width = max(s.width for s in strategies)
        expected = self.a.image.read(function.rva, width)
        padding_rva = None
        padding = b""
        if Strategy.SHORT_JMP_PADDING in strategies:
            padding_rva = function.rva - PADDING_JMP_SIZE
            padding = self.a.image.read(padding_rva, PADDING_JMP_SIZE)
        return PatchSite(function.rva, function.label, expected, blob, 0, strategies[0], tuple(strategies[1:]),
                         padding_rva, padding)
