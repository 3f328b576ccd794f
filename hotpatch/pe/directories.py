"""The data directories discovery and ``info`` need, read from a mapped image without LIEF.

Reads what ``hotpatch.pe.image`` reads through LIEF (exports, imports with their IAT slots, DIR64 base
relocations, COFF symbols, .pdata with unwind info and chains, TLS, load config) into the same model,
straight from the image as the loader maps it (``Image.memory``); tests/test_pe_directories.py holds
the two readers equal on every fixture and on real binaries. LIEF's native module costs about half a
second to import, more than ``info`` on a small DLL should cost in all. Damaged directories raise
``CorruptImageError``, never a bare ``struct.error``.
"""

from __future__ import annotations

import struct
from typing import Any

from ..errors import CorruptImageError
from ..names import pe_name
from ._pdata import read_pdata
from .headers import (
    DIRECTORY_BASERELOC,
    DIRECTORY_EXCEPTION,
    DIRECTORY_EXPORT,
    DIRECTORY_IMPORT,
    DIRECTORY_LOAD_CONFIG,
    DIRECTORY_TLS,
    PEHeaders,
)

__all__ = ["DirectoryReader"]

_REL_BASED_DIR64 = 10
_ORDINAL_FLAG = 1 << 63
_UNW_FLAG_EHANDLER, _UNW_FLAG_UHANDLER, _UNW_FLAG_CHAININFO = 1, 2, 4
_STORAGE_EXTERNAL, _STORAGE_STATIC = 2, 3
_COMPLEX_FUNCTION = 2
_MAX_CHAIN = 32

#: IMAGE_LOAD_CONFIG_DIRECTORY64 fields the model keeps: (name, offset, struct format)
_LOAD_CONFIG_LAYOUT = (
    ("security_cookie", 0x58, "<Q"), ("guard_flags", 0x90, "<I"), ("guard_cf_check_function_pointer", 0x70, "<Q"),
    ("guard_cf_function_table", 0x80, "<Q"), ("guard_cf_function_count", 0x88, "<Q"),
    ("chpe_metadata_pointer", 0xC8, "<Q"), ("dynamic_value_reloc_table", 0xC0, "<Q"),
    ("volatile_metadata_pointer", 0x100, "<Q"),
)


class DirectoryReader:
    """Reads one image's directories from its mapped bytes; every method returns model values."""

    def __init__(self, memory: bytes, data: bytes, headers: PEHeaders, sections: tuple[Any, ...], label: str,
                 model: Any) -> None:
        self.memory, self.data, self.headers, self.sections, self.label = memory, data, headers, sections, label
        self.model = model  # hotpatch.pe.image: the dataclasses to build (pe sits below image in the layers)

    # ── raw access ──────────────────────────────────────────────────────

    def _u32(self, rva: int) -> int:
        return self._unpack("<I", rva)[0]

    def _unpack(self, fmt: str, rva: int) -> tuple[Any, ...]:
        if not 0 <= rva < len(self.memory):
            raise CorruptImageError(f"{self.label}: corrupt directory: RVA {rva:#x} is outside the image")
        try:
            return struct.unpack_from(fmt, self.memory, rva)
        except struct.error:
            raise CorruptImageError(f"{self.label}: corrupt directory: {fmt} at RVA {rva:#x} is outside the image") \
                from None

    def _array(self, kind: str, rva: int, count: int) -> tuple[int, ...] | None:
        """``count`` little-endian items (``H`` or ``I``) from ``rva`` in one call, or None when they do not all
        lie in the image (the caller reads them one at a time, as ``_unpack`` names the first outside it)."""
        if 0 <= rva and rva + struct.calcsize(kind) * count <= len(self.memory):
            return struct.unpack_from(f"<{count}{kind}", self.memory, rva)
        return None

    def _string(self, rva: int) -> bytes:
        end = self.memory.find(b"\0", rva)
        if rva <= 0 or rva >= len(self.memory) or end < 0:
            raise CorruptImageError(f"{self.label}: corrupt directory: no string at RVA {rva:#x}")
        return self.memory[rva:end]

    # ── directories ─────────────────────────────────────────────────────

    def exports(self) -> tuple[Any, ...]:
        rva, size = self.headers.directory(DIRECTORY_EXPORT)
        if not rva:
            return ()
        base, count_functions, count_names, functions, names, ordinals = self._unpack("<IIIIII", rva + 16)
        if 4 * count_functions + 6 * count_names > len(self.memory):
            raise CorruptImageError(f"{self.label}: corrupt export directory: {count_functions} functions, "
                                    f"{count_names} names")
        name_of: dict[int, bytes] = {}
        slots, pointers = self._array("H", ordinals, count_names), self._array("I", names, count_names)
        for index in range(count_names):
            if slots is None or pointers is None:  # read one at a time: the first fault is named
                slot, pointer = self._unpack("<H", ordinals + 2 * index)[0], self._u32(names + 4 * index)
            else:
                slot, pointer = slots[index], pointers[index]
            name_of.setdefault(slot, self._string(pointer))
        out = []
        export = self.model.Export
        addresses = self._array("I", functions, count_functions)
        for slot in range(count_functions):
            address = self._u32(functions + 4 * slot) if addresses is None else addresses[slot]
            name = name_of.get(slot)
            if not address and name is None:
                continue  # an unused ordinal
            forwarder = None
            if rva <= address < rva + size:
                library, _, function = self._string(address).partition(b".")
                forwarder = f"{pe_name(library)}.{pe_name(function)}"
                address = 0  # as LIEF gives it: a forwarder has no code in this image
            out.append(export(pe_name(name) or None if name is not None else None, base + slot, address, forwarder))
        return tuple(sorted(out, key=lambda e: (e.rva, e.ordinal)))

    def imports(self) -> tuple[Any, ...]:
        rva, _ = self.headers.directory(DIRECTORY_IMPORT)
        out: list[Any] = []
        if not rva:
            return ()
        make = self.model.Import
        descriptor = rva
        while True:
            lookup, _, _, name_rva, iat = self._unpack("<IIIII", descriptor)
            if not (lookup or name_rva or iat):
                break
            dll = pe_name(self._string(name_rva))
            table = lookup or iat
            index = 0
            while True:
                (value,) = self._unpack("<Q", table + 8 * index)
                if not value:
                    break
                slot = iat + 8 * index
                if value & _ORDINAL_FLAG:
                    out.append(make(dll, None, value & 0xFFFF, slot))
                else:
                    out.append(make(dll, pe_name(self._string((value & 0x7FFFFFFF) + 2)), None, slot))
                index += 1
            descriptor += 20
        return tuple(out)

    def relocations(self) -> tuple[int, ...]:
        rva, size = self.headers.directory(DIRECTORY_BASERELOC)
        out = []
        cursor, end = rva, rva + size
        while rva and cursor + 8 <= end:
            page, block_size = self._unpack("<II", cursor)
            if block_size < 8:
                break
            count = (min(block_size, end - cursor) - 8) // 2
            raw = self.memory[cursor + 8:cursor + 8 + 2 * count]
            # a block's entries in one call (an odd tail cut by the image end raises as one at a time does)
            entries = struct.unpack(f"<{count}H", raw) if len(raw) == 2 * count else \
                [entry for (entry,) in struct.iter_unpack("<H", raw)]
            targets = [page + (entry & 0xFFF) for entry in entries if entry >> 12 == _REL_BASED_DIR64]
            if targets and max(targets) + 8 > self.headers.size_of_image:
                target = next(t for t in targets if t + 8 > self.headers.size_of_image)
                raise CorruptImageError(f"{self.label}: corrupt base relocation at {target:#x}")
            out += targets
            cursor += block_size
        out.sort()
        return tuple(out)

    def symbols(self) -> tuple[Any, ...]:
        """COFF symbols defined in a section; the table lives in the file, outside the mapped image."""
        data, sections = self.data, self.sections
        pointer, count = struct.unpack_from("<II", data, self.headers.pe_offset + 12)
        if not pointer or not count or pointer + 18 * count > len(data):
            return ()
        strings = pointer + 18 * count
        by_rva = {s.rva: s for s in sections}
        by_number = {i + 1: by_rva[h.rva] for i, h in enumerate(self.headers.sections) if h.rva in by_rva}
        out: dict[tuple[str, int], Any] = {}
        make = self.model.Symbol
        index = 0
        while index < count:
            raw, value, number, kind, storage, aux = struct.unpack_from("<8sIhHBB", data, pointer + 18 * index)
            index += 1 + aux
            section = by_number.get(number)
            if section is None or storage not in (_STORAGE_EXTERNAL, _STORAGE_STATIC):
                continue
            if raw[:4] == b"\0\0\0\0":
                offset = strings + int.from_bytes(raw[4:], "little")
                end = data.find(b"\0", offset)
                raw_name = data[offset:end if end >= 0 else len(data)]
            else:
                raw_name = raw.rstrip(b"\0")
            name = pe_name(raw_name)
            if not name or name.startswith("."):
                continue
            rva = section.rva + value
            out[(name, rva)] = make(name, rva, (kind >> 4) & 0xF == _COMPLEX_FUNCTION)
        return tuple(sorted(out.values(), key=lambda s: (s.rva, s.name)))

    def unwind(self, rva: int) -> tuple[Any, tuple[int, int, int] | None]:
        """The UNWIND_INFO at ``rva`` and the RUNTIME_FUNCTION it chains to (or None)."""
        head, prolog, codes, frame = self._unpack("<BBBB", rva)
        flags = head >> 3
        tail = rva + 4 + 2 * (codes + (codes & 1))
        handler = chained = None
        if flags & _UNW_FLAG_CHAININFO:
            chained = self._unpack("<III", tail)
        elif flags & (_UNW_FLAG_EHANDLER | _UNW_FLAG_UHANDLER):
            handler = self._u32(tail)
        info = self.model.unwind_info(rva, head & 7, flags, prolog, codes, frame & 0xF, frame >> 4, handler)
        return info, chained

    def runtime_functions(self) -> tuple[Any, ...]:
        """.pdata entries; chained entries (UNW_FLAG_CHAININFO) become fragments of their root."""
        rva, size = self.headers.directory(DIRECTORY_EXCEPTION)
        if not rva:
            return ()
        executable = [(s.rva, s.end_rva) for s in self.sections if s.executable]
        table = self.memory[rva:rva + size - size % 12]
        # the common table in one compiled pass; this loop (its twin) reads any other and names what is wrong
        read_at_once = read_pdata(self.memory, table, executable, self.model.UnwindInfo, self.model.RuntimeFunction)
        if read_at_once is not None:
            return read_at_once  # type: ignore[no-any-return]
        memory, label, make = self.memory, self.label, self.model.unwind_info
        limit = len(memory)
        unpack_from, read = struct.unpack_from, self._unpack
        roots: dict[int, tuple[int, Any]] = {}
        fragments: dict[int, list[tuple[int, int, int]]] = {}
        links: dict[int, tuple[int, int, int] | None] = {}  # unwind RVA -> what it chains to, read once each
        # unwind RVA -> its UnwindInfo, or the RUNTIME_FUNCTION it chains to: MSVC shares one UNWIND_INFO
        # between the functions whose prologs are alike (duckdb: 15,500 for 37,700 roots), read once each
        heads: dict[int, Any] = {}
        low = high = 0  # the executable section the last entry lay in: .pdata runs in address order
        # tens of thousands of entries on a large image: one struct call for each head, an UnwindInfo for
        # roots only, and the rare tails through the checked reader (it names a place outside the image)
        for begin, end, unwind_rva in struct.iter_unpack("<III", table):
            if not begin and not end and not unwind_rva:
                continue
            if not low <= begin < end <= high:
                for low, high in executable:
                    if low <= begin < end <= high:
                        break
                else:
                    raise CorruptImageError(f"{label}: corrupt .pdata entry {begin:#x}-{end:#x}")
            info = heads.get(unwind_rva)
            if info is None:
                if unwind_rva + 4 > limit:
                    raise CorruptImageError(f"{label}: .pdata entry {begin:#x} has no readable unwind info")
                head, prolog, codes, frame = unpack_from("<4B", memory, unwind_rva)
                flags = head >> 3
                tail = unwind_rva + 4 + 2 * (codes + (codes & 1))
                # the tail straight from memory when it lies inside: the checked reader only to name what is not
                if flags & _UNW_FLAG_CHAININFO:
                    info = unpack_from("<III", memory, tail) if tail + 12 <= limit else read("<III", tail)
                else:
                    handler = None
                    if flags & (_UNW_FLAG_EHANDLER | _UNW_FLAG_UHANDLER):
                        handler = unpack_from("<I", memory, tail)[0] if tail + 4 <= limit else read("<I", tail)[0]
                    info = make(unwind_rva, head & 7, flags, prolog, codes, frame & 0xF, frame >> 4, handler)
                heads[unwind_rva] = info
            if type(info) is not tuple:
                roots[begin] = (end, info)
                continue
            chained: tuple[int, int, int] | None = info
            root_begin, depth = begin, 0
            while chained is not None and depth < _MAX_CHAIN:
                root_begin, parent = chained[0], chained[2]
                if parent + 4 > limit:
                    chained = None
                elif parent in links:
                    chained = links[parent]
                else:
                    chained = links[parent] = self.unwind(parent)[1]
                depth += 1
            fragments.setdefault(root_begin, []).append((begin, end, unwind_rva))
        return self.model.fold_chains(roots, fragments)  # type: ignore[no-any-return]

    def tls(self) -> Any:
        rva, _ = self.headers.directory(DIRECTORY_TLS)
        if not rva:
            return None
        start, end, _, callbacks_va, zero_fill, characteristics = self._unpack("<QQQQII", rva)
        base = self.headers.image_base
        template = self.memory[start - base:end - base] if base <= start <= end else b""
        callbacks = []
        if callbacks_va:
            cursor = callbacks_va - base
            while True:
                (va,) = self._unpack("<Q", cursor)
                if not va:
                    break
                callbacks.append(va - base)
                cursor += 8
        return self.model.Tls(bytes(template), zero_fill, tuple(callbacks), characteristics)

    def load_config(self) -> dict[str, int]:
        rva, _ = self.headers.directory(DIRECTORY_LOAD_CONFIG)
        if not rva:
            return {}
        (declared,) = self._unpack("<I", rva)
        out = {}
        for name, offset, fmt in _LOAD_CONFIG_LAYOUT:
            if offset + struct.calcsize(fmt) <= declared:
                out[name] = self._unpack(fmt, rva + offset)[0]
        return out
