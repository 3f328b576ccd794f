"""Export-only DLL images that stand in for system DLLs in the emulator.

A model DLL (kernel32.dll, msvcrt.dll, ...) is a real, minimal PE32+ image
mapped in the emulated process: headers, an export directory, and one stub
per export in its code section. A stub is ``ret`` (the CPU hook at its
address runs the Python model first) or a few instructions of real code for
models that call back into the guest (``_initterm``). Because the export
directory is real, ``find_export`` and GetProcAddress work on model DLLs
exactly as on loaded images.

Every model DLL takes one fixed 1 MiB allocation so that exports can be added
later (another image importing another name) without moving existing stubs.
"""

from __future__ import annotations

import struct

__all__ = ["CODE_RVA", "CODE_SIZE", "EDATA_RVA", "IMAGE_SIZE", "ModelDll"]

IMAGE_SIZE = 0x100000
CODE_RVA = 0x1000
CODE_SIZE = 0x3F000
EDATA_RVA = 0x40000
EDATA_SIZE = IMAGE_SIZE - EDATA_RVA
STUB_ALIGN = 16

_SCN_CODE = 0x00000020 | 0x20000000 | 0x40000000  # CNT_CODE | MEM_EXECUTE | MEM_READ
_SCN_RDATA = 0x00000040 | 0x40000000  # CNT_INITIALIZED_DATA | MEM_READ


class ModelDll:
    """One model DLL: its name, base, and exports in the order they were added."""

    def __init__(self, name: str, base: int) -> None:
        self.name = name.lower()
        self.base = base
        self.exports: dict[str, int] = {}  # name -> RVA of its stub
        self._code = bytearray(b"\xcc" * CODE_SIZE)
        self._cursor = 0

    @property
    def size(self) -> int:
        return IMAGE_SIZE

    @property
    def code_range(self) -> tuple[int, int]:
        """[start, end) VAs of the stubs."""
        return self.base + CODE_RVA, self.base + CODE_RVA + self._cursor

    def add(self, export: str, code: bytes = b"\xc3") -> int:
        """Add an export whose stub is ``code``; its VA. Adding a name twice returns the first stub."""
        if export in self.exports:
            return self.base + self.exports[export]
        span = (len(code) + STUB_ALIGN - 1) // STUB_ALIGN * STUB_ALIGN
        if self._cursor + span > CODE_SIZE:
            raise ValueError(f"{self.name}: no room for another model stub")
        rva = CODE_RVA + self._cursor
        self._code[self._cursor : self._cursor + len(code)] = code
        self._cursor += span
        self.exports[export] = rva
        return self.base + rva

    def image(self) -> bytes:
        """The mapped image: headers, code, export directory."""
        memory = bytearray(IMAGE_SIZE)
        headers, edata = self.directory()
        memory[0 : len(headers)] = headers
        memory[CODE_RVA : CODE_RVA + CODE_SIZE] = self._code
        memory[EDATA_RVA : EDATA_RVA + len(edata)] = edata
        return bytes(memory)

    def directory(self) -> tuple[bytes, bytes]:
        """The headers (at RVA 0) and the export directory (at EDATA_RVA): what an added export changes."""
        edata = self._export_directory()
        return self._headers(len(edata)), edata

    def stub_code(self, export: str) -> bytes:
        """The code at an export's stub."""
        offset = self.exports[export] - CODE_RVA
        end = min((rva - CODE_RVA for rva in self.exports.values() if rva - CODE_RVA > offset), default=self._cursor)
        return bytes(self._code[offset:end])

    def _export_directory(self) -> bytes:
        names = sorted(self.exports)  # loaders binary-search the name table
        ordinals = {name: index for index, name in enumerate(self.exports)}
        count = len(self.exports)
        functions_rva = EDATA_RVA + 40
        names_rva = functions_rva + 4 * count
        ordinals_rva = names_rva + 4 * count
        strings_rva = ordinals_rva + 2 * count
        strings = bytearray(self.name.encode() + b"\0")
        name_rvas = []
        for name in names:
            name_rvas.append(strings_rva + len(strings))
            strings += name.encode() + b"\0"
        data = bytearray(struct.pack("<IIHHIIIIIII", 0, 0, 0, 0, strings_rva, 1, count, count,
                                     functions_rva, names_rva, ordinals_rva))
        data += struct.pack(f"<{count}I", *self.exports.values())
        data += struct.pack(f"<{count}I", *name_rvas)
        data += struct.pack(f"<{count}H", *(ordinals[name] for name in names))
        data += strings
        if len(data) > EDATA_SIZE:
            raise ValueError(f"{self.name}: export directory too large")
        return bytes(data)

    def _headers(self, edata_size: int) -> bytes:
        header = bytearray(0x400)
        header[0:2] = b"MZ"
        struct.pack_into("<I", header, 0x3C, 0x40)
        header[0x40:0x44] = b"PE\0\0"
        # COFF header: AMD64, two sections, optional header of 0xF0 bytes, DLL | EXECUTABLE | LARGE_ADDRESS_AWARE
        struct.pack_into("<HHIIIHH", header, 0x44, 0x8664, 2, 0, 0, 0, 0xF0, 0x2022)
        optional = 0x58
        struct.pack_into("<HBBIIIIIQIIHHHHHHIIIIHHQQQQII", header, optional,
                         0x20B, 14, 0, CODE_SIZE, EDATA_SIZE, 0, 0, CODE_RVA, self.base, 0x1000, 0x200,
                         6, 0, 0, 0, 6, 0, 0, IMAGE_SIZE, 0x400, 0, 3, 0x160,
                         0x100000, 0x1000, 0x100000, 0x1000, 0, 16)
        struct.pack_into("<II", header, optional + 112, EDATA_RVA, edata_size)
        table = optional + 0xF0
        struct.pack_into("<8sIIIIIIHHI", header, table, b".text", CODE_SIZE, CODE_RVA, 0, 0, 0, 0, 0, 0, _SCN_CODE)
        struct.pack_into("<8sIIIIIIHHI", header, table + 40, b".edata", EDATA_SIZE, EDATA_RVA, 0, 0, 0, 0, 0, 0,
                         _SCN_RDATA)
        return bytes(header)
