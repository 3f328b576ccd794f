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
from dataclasses import dataclass, field

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
from ..pe.unwindinfo import UNW_FLAG_CHAININFO, UNW_FLAG_EHANDLER, UNW_FLAG_UHANDLER, tail_offset
from ..verdict.redirect import possible_strategies
from ..verdict.rules import Reason, Verdict, decide
from ..verdict.strategy import Strategy
from ..x86 import disassembler
from .handlers import (
    C_SPECIFIC_HANDLER,
    CXX_FRAME_HANDLER4,
    GCC_PERSONALITIES,
    GS_HANDLER_CHECK,
    Fh4Error,
    fh4_blocks,
    gs_handler_data_size,
    is_gs_handler_check,
)
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
    unwind_info_size,
)

__all__ = ["build_package"]

#: how many bytes of an LSDA are copied when nothing bounds it sooner
_MAX_LSDA = 1024
_CODE_ALIGNMENT = 16


class _Unsupported(Exception):
    """Something the builder cannot relocate; becomes an ``unsupported_reference`` reason."""


@dataclass
class _CodeBlob:
    function: Function
    index: int
    #: (patched begin RVA, end RVA, offset in the blob) per copied range
    ranges: list[tuple[int, int, int]]
    data: bytearray

    def offset_of(self, rva: int) -> int | None:
        for begin, end, offset in self.ranges:
            if begin <= rva < end or rva == end:
                return offset + rva - begin
        return None

    def range_of(self, rva: int) -> int | None:
        for position, (begin, end, _) in enumerate(self.ranges):
            if begin <= rva < end:
                return position
        return None


@dataclass
class _State:
    result: DiffResult
    blobs: list[Blob | _CodeBlob | None] = field(default_factory=list)
    fixups: list[Fixup] = field(default_factory=list)
    code_of: dict[int, _CodeBlob] = field(default_factory=dict)  # patched function RVA -> blob
    data_blob_at: dict[int, tuple[int, int]] = field(default_factory=dict)  # patched data RVA -> (blob, offset)
    import_slots: dict[str, int] = field(default_factory=dict)  # "dll!name" -> DATA blob holding its address

    def reserve(self) -> int:
        self.blobs.append(None)
        return len(self.blobs) - 1


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
    except _Unsupported as exc:
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


class _Builder:
    def __init__(self, result: DiffResult) -> None:
        self.result = result
        self.a: FunctionTable = result.baseline
        self.b: FunctionTable = result.patched
        self.state = _State(result)
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
            if isinstance(blob, _CodeBlob):
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
        blob = _CodeBlob(function, index, ranges, data)
        self.state.blobs[index] = blob
        self.state.code_of[function.rva] = blob

    def _insn_length(self, rva: int) -> int:
        for _, size, _, _ in self.md.disasm_lite(self.b.image.memory[rva:rva + 15], rva, 1):
            return size
        raise _Unsupported(f"cannot decode the instruction at {rva:#x}")

    def _relocate(self, blob: _CodeBlob) -> None:
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
                raise _Unsupported(f"{blob.function.label}: reference at {insn_rva:#x} outside the copied ranges")
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
                raise _Unsupported(f"{blob.function.label}: {operand_size}-byte reference at {insn_rva:#x}")

    def _island(self, blob: _CodeBlob, position: int, insn_end: int, target: FixupTarget) -> None:
        """Route a rel8 branch leaving its range through ``jmp rel32`` appended to the blob."""
        island = len(blob.data)
        blob.data += b"\xe9\x00\x00\x00\x00"
        end_offset = blob.offset_of(insn_end)
        assert end_offset is not None
        displacement = island - end_offset
        if not -128 <= displacement <= 127:
            raise _Unsupported(f"{blob.function.label}: a rel8 branch cannot reach a relay island")
        blob.data[position] = displacement & 0xFF
        self._fixup(blob.index, island + 1, FixupKind.REL32, target, -4)

    def _fixup(self, blob: int, offset: int, kind: FixupKind, target: FixupTarget, addend: int = 0) -> None:
        self.state.fixups.append(Fixup(blob, offset, kind, target, addend))

    # ── where a patched-image address goes in the target process ─────────

    def _resolve(self, blob: _CodeBlob | None, target: int, call: bool) -> FixupTarget:
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
            raise _Unsupported(f"reference to {target:#x}, outside the image")
        if section.executable:
            return self._code_place(target)
        return self._data_place(target)

    def _code_place(self, target: int) -> FixupTarget:
        owner = self.b.containing(target) or self.b.preceding(target)
        if owner is None:
            raise _Unsupported(f"reference into code at {target:#x} outside every function")
        if owner.rva in self.state.code_of:
            moved = self.state.code_of[owner.rva]
            offset = moved.offset_of(target)
            if offset is None:
                raise _Unsupported(f"reference to {target:#x} between the copied ranges of {owner.label}")
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
                raise _Unsupported(f"import {label} by ordinal")
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
                raise _Unsupported(f"a pointer at {slot:#x} straddles the end of a copied data item")
            pointer = struct.unpack_from("<Q", image.memory, slot)[0] - image.image_base
            data[slot - begin:slot - begin + 8] = bytes(8)
            self._fixup(index, slot - begin, FixupKind.ABS64, self._resolve_pointer(None, pointer))
        self.state.blobs[index] = Blob(index, blob.kind, blob.alignment, bytes(data), blob.size)

    def _resolve_pointer(self, blob: _CodeBlob | None, pointer: int) -> FixupTarget:
        """A stored address: existing functions keep their baseline address, new ones get their blob."""
        function = self.b.at(pointer)
        if function is not None:
            if self.status.get(function.rva) == "added":
                return BlobTarget(self.state.code_of[function.rva].index, 0)
            return BaselineRVA(self.inverse_functions[function.rva])
        return self._resolve(blob, pointer, call=False)

    def _copy_jump_table(self, blob: _CodeBlob, table: int, entry_kind: int, targets: tuple[int, ...]) -> None:
        index = self.state.reserve()
        size = 4 * max(1, len(targets))
        self.state.blobs[index] = Blob(index, BlobKind.RODATA, 4, bytes(size), size)
        self.state.data_blob_at[table] = (index, 0)
        for position, target in enumerate(targets):
            offset = blob.offset_of(target)
            if offset is None:
                raise _Unsupported(f"{blob.function.label}: jump-table entry {target:#x} outside the function")
            if entry_kind == TABLE_IMAGE_REL32:
                self._fixup(index, 4 * position, FixupKind.IMAGE_REL32, BlobTarget(blob.index, offset))
            else:  # entries relative to the table start: S - table = S + 4i - P
                self._fixup(index, 4 * position, FixupKind.REL32, BlobTarget(blob.index, offset), 4 * position)

    # ── unwind info ───────────────────────────────────────────────────────

    def _unwind(self, moved: list[Function]) -> list[UnwindEntry]:
        pdata = {f.begin_rva: f for f in self.b.image.runtime_functions}
        infos = bytearray()
        pending: list[tuple[int, int, int, int, int]] = []  # code blob, begin, end, info offset, info rva
        info_fixups: list[tuple[int, FixupKind, FixupTarget]] = []
        placed: dict[int, int] = {}  # unwind RVA in the patched image -> offset in the info blob
        memory = self.b.image.memory
        info_index = self.state.reserve() if any(f.rva in pdata for f in moved) else None
        lsda_starts = sorted(self._lsda_rvas(pdata))

        def place(unwind_rva: int, blob: _CodeBlob) -> int:
            if unwind_rva in placed:
                return placed[unwind_rva]
            while len(infos) % 4:
                infos.append(0)
            offset = len(infos)
            placed[unwind_rva] = offset
            size = unwind_info_size(memory, unwind_rva)
            infos.extend(memory[unwind_rva:unwind_rva + size])
            flags = memory[unwind_rva] >> 3
            tail = offset + tail_offset(memory[unwind_rva + 2])
            if flags & (UNW_FLAG_EHANDLER | UNW_FLAG_UHANDLER):
                handler_rva = struct.unpack_from("<I", memory, unwind_rva + tail - offset)[0]
                info_fixups.append((tail, FixupKind.ALLOC_REL32, self._resolve_pointer(blob, handler_rva)))
                self._handler_data(blob, handler_rva, unwind_rva + tail - offset + 4, infos, info_fixups,
                                   lsda_starts)
            elif flags & UNW_FLAG_CHAININFO:
                begin, end, parent_unwind = struct.unpack_from("<III", memory, unwind_rva + tail - offset)
                start, stop = blob.offset_of(begin), blob.offset_of(end)
                if start is None or stop is None:
                    raise _Unsupported(f"{blob.function.label}: chained unwind info outside the function")
                parent_offset = place(parent_unwind, blob)
                for position, value in ((0, start), (4, stop)):
                    info_fixups.append((tail + position, FixupKind.ALLOC_REL32, BlobTarget(blob.index, value)))
                assert info_index is not None
                info_fixups.append((tail + 8, FixupKind.ALLOC_REL32, BlobTarget(info_index, parent_offset)))
            return offset

        for function in moved:
            root = pdata.get(function.rva)
            if root is None:
                continue
            blob = self.state.code_of[function.rva]
            ranges = [(root.begin_rva, root.end_rva, root.unwind.rva)]
            ranges += [(b, e, u) for (b, e), u in zip(root.fragments, root.fragment_unwind_rvas)]
            for begin, end, unwind_rva in ranges:
                offset = place(unwind_rva, blob)
                start, stop = blob.offset_of(begin), blob.offset_of(end)
                assert start is not None and stop is not None
                pending.append((blob.index, start, stop, offset, unwind_rva))
        if info_index is None:
            return []
        data = bytearray(infos)
        for offset, kind, target in info_fixups:
            data[offset:offset + 4] = bytes(4)
            self._fixup(info_index, offset, kind, target)
        self.state.blobs[info_index] = Blob(info_index, BlobKind.RODATA, 4, bytes(data), len(data))
        return [UnwindEntry(code, begin, end, info_index, offset) for code, begin, end, offset, _ in pending]

    def _handler_name(self, handler_rva: int) -> str | None:
        function = self.b.at(handler_rva)
        if function is None:
            return None
        if function.name:
            return function.name
        from ..analysis.functions import import_thunk_target

        label = import_thunk_target(self.b, function)
        if label:
            return label.split("!", 1)[1]
        return GS_HANDLER_CHECK if is_gs_handler_check(self.b.image.memory, handler_rva) else None

    def _handler_data(self, blob: _CodeBlob, handler_rva: int, data_rva: int, infos: bytearray,
                      info_fixups: list[tuple[int, FixupKind, FixupTarget]], lsda_starts: list[int]) -> None:
        """Copy the handler's language-specific data after the handler RVA, rebased."""
        memory = self.b.image.memory
        name = self._handler_name(handler_rva)
        if name in GCC_PERSONALITIES:
            lsda = struct.unpack_from("<I", memory, data_rva)[0]
            position = len(infos)
            infos.extend(bytes(4))
            index, offset = self._copy_lsda(lsda, lsda_starts)
            info_fixups.append((position, FixupKind.ALLOC_REL32, BlobTarget(index, offset)))
        elif name == C_SPECIFIC_HANDLER:
            count = struct.unpack_from("<I", memory, data_rva)[0]
            if count > 256:
                raise _Unsupported(f"{blob.function.label}: scope table of {count} entries")
            infos.extend(struct.pack("<I", count))
            for entry in range(count):
                fields = struct.unpack_from("<IIII", memory, data_rva + 4 + 16 * entry)
                for position, value in enumerate(fields):
                    at = len(infos)
                    infos.extend(bytes(4))
                    if position in (2, 3) and value <= 1:  # EXCEPTION_EXECUTE_HANDLER / no target
                        infos[at:at + 4] = struct.pack("<I", value)
                        continue
                    info_fixups.append((at, FixupKind.ALLOC_REL32, self._resolve_pointer(blob, value)))
        elif name == GS_HANDLER_CHECK:  # a stack-cookie offset: no RVA to rebase
            infos.extend(memory[data_rva:data_rva + gs_handler_data_size(memory, data_rva)])
        elif name == CXX_FRAME_HANDLER4:
            info_fixups.append((len(infos), FixupKind.ALLOC_REL32, self._copy_fh4(blob, memory, data_rva)))
            infos.extend(bytes(4))
        else:
            raise _Unsupported(f"{blob.function.label}: exception handler {name or hex(handler_rva)} "
                               "has language-specific data the builder cannot relocate")

    def _copy_fh4(self, blob: _CodeBlob, memory: bytes, data_rva: int) -> FixupTarget:
        """Copy a FuncInfo4 and every map it reaches; their RVAs become ALLOC_REL32 fixups (the handler reads
        them against the base the function table is registered with). C++ type descriptors are copied too:
        the runtime matches a catch clause by the type's name when the addresses differ."""
        func_info = struct.unpack_from("<I", memory, data_rva)[0]
        try:
            blocks = fh4_blocks(memory, func_info)
        except Fh4Error as exc:
            raise _Unsupported(f"{blob.function.label}: {exc}") from None
        fresh = [block for block in blocks.values() if block.rva not in self.state.data_blob_at]
        for block in fresh:
            index = self.state.reserve()
            data = bytearray(memory[block.rva:block.end])
            for offset, _, _ in block.rvas:
                data[offset:offset + 4] = bytes(4)
            self.state.blobs[index] = Blob(index, BlobKind.RODATA, 4, bytes(data), len(data))
            self.state.data_blob_at[block.rva] = (index, 0)
        for block in fresh:
            index = self.state.data_blob_at[block.rva][0]
            for offset, value, what in block.rvas:
                if what == "block":
                    target: FixupTarget = BlobTarget(*self.state.data_blob_at[value])
                elif what == "data":
                    target = self._copy_type_descriptor(value)
                else:
                    target = self._resolve_pointer(blob, value)
                self._fixup(index, offset, FixupKind.ALLOC_REL32, target)
        return BlobTarget(*self.state.data_blob_at[func_info])

    def _copy_type_descriptor(self, rva: int) -> BlobTarget:
        """A TypeDescriptor (type_info vftable pointer, spare pointer, decorated name) as a new data blob."""
        if rva not in self.state.data_blob_at:
            image = self.b.image
            end = image.memory.find(b"\0", rva + 16)
            if end < 0 or end - rva > 4096:
                raise _Unsupported(f"type descriptor at {rva:#x} has no name")
            index = self.state.reserve()
            self.state.blobs[index] = Blob(index, BlobKind.DATA, 8, image.read(rva, end + 1 - rva), end + 1 - rva)
            self.state.data_blob_at[rva] = (index, 0)
            self._relocate_pointers(index, rva, end + 1)
        return BlobTarget(*self.state.data_blob_at[rva])

    def _lsda_rvas(self, pdata: dict) -> set[int]:
        out = set()
        memory = self.b.image.memory
        for root in pdata.values():
            info = root.unwind  # as LIEF read it from the patched file
            if not info.rva or info.flags & (UNW_FLAG_EHANDLER | UNW_FLAG_UHANDLER) == 0 or info.handler_rva is None:
                continue
            if self._handler_name(info.handler_rva) in GCC_PERSONALITIES:
                out.add(struct.unpack_from("<I", memory, info.rva + tail_offset(info.code_count) + 4)[0])
        return out

    def _copy_lsda(self, lsda: int, lsda_starts: list[int]) -> tuple[int, int]:
        if lsda in self.state.data_blob_at:
            return self.state.data_blob_at[lsda]
        section = self.b.image.section_from_rva(lsda)
        if section is None:
            raise _Unsupported(f"LSDA at {lsda:#x} outside the image")
        following = [s for s in lsda_starts if s > lsda]
        end = min([section.end_rva, lsda + _MAX_LSDA] + following[:1])
        index = self.state.reserve()
        self.state.blobs[index] = Blob(index, BlobKind.RODATA, 8, self.b.image.read(lsda, end - lsda), end - lsda)
        self.state.data_blob_at[lsda] = (index, 0)
        self._relocate_pointers(index, lsda, end)
        return index, 0

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
                raise _Unsupported(f"{function.label} cannot be redirected")
        # Walk backwards: each site keeps the strategies that stay clear of the next site's footprint.
        limit = None
        for position in range(len(changed) - 1, -1, -1):
            function = changed[position][0]
            if limit is not None:
                fits = [s for s in options[position] if function.rva + s.width <= limit]
                if not fits:
                    raise _Unsupported(f"{function.label} is too close to the next changed function to redirect")
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
