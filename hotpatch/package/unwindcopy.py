"""The builder's unwind info: each moved function's UNWIND_INFO copied with the RVAs inside it rebased.

Windows reads the RVAs in unwind info (chained entries, the handler, the handler's
language-specific data) against the base the function table is registered with,
which is the package's allocation: they become ALLOC_REL32 fixups. Which handlers'
data can travel, and how it is laid out, is package/handlers.py's.
"""

from __future__ import annotations

import struct
from functools import cached_property
from typing import TYPE_CHECKING

from ..analysis.functions import Function, FunctionTable
from ..pe.unwindinfo import UNW_FLAG_CHAININFO, UNW_FLAG_EHANDLER, UNW_FLAG_UHANDLER, tail_offset
from .buildstate import BuildState, CodeBlob, Unsupported
from .handlers import (
    C_SPECIFIC_HANDLER,
    CXX_FRAME_HANDLER4,
    GCC_PERSONALITIES,
    GS_HANDLER_CHECK,
    GS_HANDLER_CHECK_EH4,
    Fh4Error,
    fh4_blocks,
    gs_handler_data_size,
    is_gs_handler_check,
    is_gs_handler_check_eh4,
)
from .model import Blob, BlobKind, BlobTarget, FixupKind, FixupTarget, UnwindEntry, unwind_info_size

__all__ = ["UnwindCopying"]

#: how many bytes of an LSDA are copied when nothing bounds it sooner
_MAX_LSDA = 1024


class UnwindCopying:
    """Mixed into the builder: the part that copies unwind info and exception-handler data."""

    b: FunctionTable
    state: BuildState

    if TYPE_CHECKING:  # the builder's own, used here
        def _fixup(self, blob: int, offset: int, kind: FixupKind, target: FixupTarget, addend: int = 0) -> None: ...
        def _resolve_pointer(self, blob: CodeBlob | None, pointer: int) -> FixupTarget: ...
        def _relocate_pointers(self, index: int, begin: int, end: int) -> None: ...

    def _unwind(self, moved: list[Function]) -> list[UnwindEntry]:
        pdata = {f.begin_rva: f for f in self.b.image.runtime_functions}
        infos = bytearray()
        pending: list[tuple[int, int, int, int, int]] = []  # code blob, begin, end, info offset, info rva
        info_fixups: list[tuple[int, FixupKind, FixupTarget]] = []
        placed: dict[int, int] = {}  # unwind RVA in the patched image -> offset in the info blob
        memory = self.b.image.memory
        info_index = self.state.reserve() if any(f.rva in pdata for f in moved) else None
        lsda_starts = sorted(self._lsda_rvas(pdata))

        def place(unwind_rva: int, blob: CodeBlob) -> int:
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
                    raise Unsupported(f"{blob.function.label}: chained unwind info outside the function")
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

    @cached_property
    def _handler_names(self) -> dict[int, str | None]:
        """Handler RVA -> ``_handler_name``'s answer: every unwind entry names its handler again, and a nameless
        one is told by its body (regular expressions over up to 0x80 bytes, and its callee's name)."""
        return {}

    def _handler_name(self, handler_rva: int) -> str | None:
        names = self._handler_names
        if handler_rva not in names:
            names[handler_rva] = self._find_handler_name(handler_rva)
        return names[handler_rva]

    def _find_handler_name(self, handler_rva: int) -> str | None:
        function = self.b.at(handler_rva)
        if function is None:
            return None
        if function.name:
            return function.name
        from ..analysis.functions import import_thunk_target

        label = import_thunk_target(self.b, function)
        if label:
            return label.split("!", 1)[1]
        memory = self.b.image.memory
        if is_gs_handler_check(memory, handler_rva):
            return GS_HANDLER_CHECK
        if is_gs_handler_check_eh4(memory, handler_rva, lambda rva: self._handler_name(rva) == CXX_FRAME_HANDLER4):
            return GS_HANDLER_CHECK_EH4
        return None

    def _handler_data(self, blob: CodeBlob, handler_rva: int, data_rva: int, infos: bytearray,
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
                raise Unsupported(f"{blob.function.label}: scope table of {count} entries")
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
        elif name in (CXX_FRAME_HANDLER4, GS_HANDLER_CHECK_EH4):
            info_fixups.append((len(infos), FixupKind.ALLOC_REL32, self._copy_fh4(blob, memory, data_rva)))
            infos.extend(bytes(4))
            if name == GS_HANDLER_CHECK_EH4:  # the FuncInfo4 RVA, then the stack-cookie offset
                infos.extend(memory[data_rva + 4:data_rva + 4 + gs_handler_data_size(memory, data_rva + 4)])
        else:
            raise Unsupported(f"{blob.function.label}: exception handler {name or hex(handler_rva)} "
                               "has language-specific data the builder cannot relocate")

    def _copy_fh4(self, blob: CodeBlob, memory: bytes, data_rva: int) -> FixupTarget:
        """Copy a FuncInfo4 and every map it reaches; their RVAs become ALLOC_REL32 fixups (the handler reads
        them against the base the function table is registered with). C++ type descriptors are copied too:
        the runtime matches a catch clause by the type's name when the addresses differ."""
        func_info = struct.unpack_from("<I", memory, data_rva)[0]
        try:
            blocks = fh4_blocks(memory, func_info)
        except Fh4Error as exc:
            raise Unsupported(f"{blob.function.label}: {exc}") from None
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
                raise Unsupported(f"type descriptor at {rva:#x} has no name")
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
            raise Unsupported(f"LSDA at {lsda:#x} outside the image")
        following = [s for s in lsda_starts if s > lsda]
        end = min([section.end_rva, lsda + _MAX_LSDA] + following[:1])
        index = self.state.reserve()
        self.state.blobs[index] = Blob(index, BlobKind.RODATA, 8, self.b.image.read(lsda, end - lsda), end - lsda)
        self.state.data_blob_at[lsda] = (index, 0)
        self._relocate_pointers(index, lsda, end)
        return index, 0
