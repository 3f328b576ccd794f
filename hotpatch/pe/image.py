"""The PE32+ x86-64 image model, read with LIEF or with hotpatch's own directory reader.

``Image.load`` checks the headers itself first (``hotpatch.pe.headers``, so
every kind of bad input gets its own error and a one-line message), then lets
LIEF parse the directories. ``Image.load_fast`` builds the same model with
``hotpatch.pe.directories`` instead, for commands whose whole cost would
otherwise be LIEF's import (``info``, ``functions``). The model is immutable: plain frozen dataclasses and a mapped
copy of the image (sections laid out at their RVAs) for reading code and data.
"""

from __future__ import annotations

import hashlib
import warnings
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..collector import gc_paused
from ..errors import (
    CorruptImageError,
    NotPEError,
    TruncatedImageError,
    UnsupportedArchitectureError,
)
from ..names import pe_name
from .headers import DIRECTORY_SECURITY, MACHINE_NAMES, PEHeaders, read_file_headers

__all__ = [
    "Export",
    "Tls",
    "Identity",
    "Image",
    "Import",
    "RuntimeFunction",
    "Section",
    "Symbol",
    "UnwindInfo",
    "check_headers",
    "fold_chains",
    "unwind_info",
]

#: The image is mapped into memory whole (Image.memory): beyond the rel32 reach nothing could be hotpatched
#: anyway, and it keeps a hostile header from costing gigabytes.
MAX_SIZE_OF_IMAGE = 1 << 31

SCN_MEM_EXECUTE = 0x20000000
SCN_MEM_READ = 0x40000000
SCN_MEM_WRITE = 0x80000000
SCN_CNT_CODE = 0x00000020


@dataclass(frozen=True)
class Section:
    name: str
    rva: int
    virtual_size: int
    raw_offset: int
    raw_size: int
    characteristics: int

    @property
    def end_rva(self) -> int:
        return self.rva + max(self.virtual_size, self.raw_size if self.virtual_size == 0 else 0)

    @property
    def readable(self) -> bool:
        return bool(self.characteristics & SCN_MEM_READ)

    @property
    def writable(self) -> bool:
        return bool(self.characteristics & SCN_MEM_WRITE)

    @property
    def executable(self) -> bool:
        return bool(self.characteristics & (SCN_MEM_EXECUTE | SCN_CNT_CODE))

    @property
    def permissions(self) -> str:
        return ("r" if self.readable else "-") + ("w" if self.writable else "-") + ("x" if self.executable else "-")

    def contains_rva(self, rva: int) -> bool:
        return self.rva <= rva < self.end_rva


#: section starts, ends and the sections themselves, sorted by RVA
_SectionIndex = tuple[list[int], list[int], list[Section]]


def _holding(index: _SectionIndex, rva: int) -> Section | None:
    starts, ends, ordered = index
    i = bisect_right(starts, rva) - 1
    return ordered[i] if i >= 0 and rva < ends[i] else None


@dataclass(frozen=True)
class Identity:
    """What a patch package pins its target to."""

    machine: int
    timedatestamp: int
    size_of_image: int
    checksum: int
    code_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": MACHINE_NAMES.get(self.machine, hex(self.machine)),
            "timedatestamp": self.timedatestamp,
            "size_of_image": self.size_of_image,
            "checksum": self.checksum,
            "code_sha256": self.code_sha256,
        }


@dataclass(frozen=True)
class Export:
    name: str | None
    ordinal: int
    rva: int
    forwarder: str | None = None


@dataclass(frozen=True)
class Import:
    dll: str
    name: str | None
    ordinal: int | None
    iat_rva: int

    @property
    def label(self) -> str:
        symbol = self.name if self.name is not None else f"#{self.ordinal}"
        return f"{self.dll.lower()}!{symbol}"


@dataclass(frozen=True)
class Symbol:
    """A COFF symbol defined in a section (mingw images keep them unless stripped)."""

    name: str
    rva: int
    is_function: bool


@dataclass(frozen=True, slots=True)
class UnwindInfo:
    """One UNWIND_INFO's head (slots: a large image has tens of thousands, built by ``unwind_info``)."""

    rva: int
    version: int
    flags: int
    prolog_size: int
    code_count: int
    frame_register: int
    frame_offset: int
    handler_rva: int | None


@dataclass(frozen=True, slots=True)
class RuntimeFunction:
    """One function as .pdata describes it, with its chained fragments folded in (slots, as UnwindInfo)."""

    begin_rva: int
    end_rva: int
    unwind: UnwindInfo
    #: (begin, end) ranges of chained .pdata entries whose root is this function
    fragments: tuple[tuple[int, int], ...] = ()
    #: the UNWIND_INFO RVA of each fragment (chained to the root's), in ``fragments`` order
    fragment_unwind_rvas: tuple[int, ...] = ()


def _slot_setters(cls: type) -> tuple[Any, ...]:
    return tuple(cls.__dict__[name].__set__ for name in cls.__slots__)  # type: ignore[attr-defined]


_new_object = object.__new__
_SET_UNWIND = _slot_setters(UnwindInfo)
_SET_RUNTIME = _slot_setters(RuntimeFunction)


def unwind_info(rva: int, version: int, flags: int, prolog_size: int, code_count: int, frame_register: int,
                frame_offset: int, handler_rva: int | None) -> UnwindInfo:
    """``UnwindInfo(...)`` with its slots set through their descriptors: the frozen dataclass's ``__init__``
    goes through ``object.__setattr__`` by name for each field, half the cost of reading .pdata on a large
    image (both readers build one per .pdata root)."""
    info = _new_object(UnwindInfo)
    s0, s1, s2, s3, s4, s5, s6, s7 = _SET_UNWIND
    s0(info, rva)
    s1(info, version)
    s2(info, flags)
    s3(info, prolog_size)
    s4(info, code_count)
    s5(info, frame_register)
    s6(info, frame_offset)
    s7(info, handler_rva)
    return info


def _runtime_function(begin_rva: int, end_rva: int, unwind: UnwindInfo, fragments: tuple[tuple[int, int], ...] = (),
                      fragment_unwind_rvas: tuple[int, ...] = ()) -> RuntimeFunction:
    """``RuntimeFunction(...)``, built as ``unwind_info`` builds its objects."""
    function = _new_object(RuntimeFunction)
    s0, s1, s2, s3, s4 = _SET_RUNTIME
    s0(function, begin_rva)
    s1(function, end_rva)
    s2(function, unwind)
    s3(function, fragments)
    s4(function, fragment_unwind_rvas)
    return function


@dataclass(frozen=True)
class Tls:
    """The TLS directory: what every new thread gets, and who runs when it starts."""

    template: bytes
    zero_fill: int
    callback_rvas: tuple[int, ...]
    characteristics: int


@dataclass(frozen=True, eq=False)
class Image:
    """A parsed PE32+ x86-64 image. Build it with ``Image.load``."""

    path: str | None
    image_base: int
    entry_rva: int | None
    identity: Identity
    sections: tuple[Section, ...]
    exports: tuple[Export, ...]
    imports: tuple[Import, ...]
    relocations: tuple[int, ...]
    symbols: tuple[Symbol, ...]
    runtime_functions: tuple[RuntimeFunction, ...]
    load_config: dict[str, int]
    tls: Tls | None
    memory: bytes = field(repr=False)
    _iat: dict[int, Import] = field(repr=False, default_factory=dict)

    # ── loading ─────────────────────────────────────────────────────────

    @classmethod
    def load(cls, source: str | Path | bytes) -> Image:
        """Parse a PE32+ x86-64 image from a path or from its bytes."""
        import lief  # its native module takes half a second to import: only here, never for load_fast

        data, path, label = _read_source(source)
        headers = _check_headers(data, label)
        lief.logging.disable()
        config = lief.PE.ParserConfig()
        config.parse_exceptions = True
        config.parse_rsrc = False
        config.parse_signature = False
        # LIEF's bindings warn (RuntimeWarning, with file paths) for values outside their enums, such as an
        # unknown relocation type or storage class; those entries are simply not ones this model keeps.
        with gc_paused(), warnings.catch_warnings():  # gc: tens of thousands of LIEF objects, no cycles
            warnings.simplefilter("ignore")
            binary = _lief_parse(lief, data, config)
            if binary is None:
                raise CorruptImageError(f"{label}: LIEF could not parse the image")
            memory = _mapped(data, headers)
            return _build(_LiefDirectories(lief, binary, headers, label, memory), data, path, label, headers, memory)

    @classmethod
    def load_fast(cls, source: str | Path | bytes) -> Image:
        """The same image as ``load`` gives, read without LIEF (``hotpatch.pe.directories``)."""
        import sys

        from .directories import DirectoryReader

        data, path, label = _read_source(source)
        headers = _check_headers(data, label)
        memory = _mapped(data, headers)
        with gc_paused():
            reader = DirectoryReader(memory, data, headers.pe, headers.sections, label, sys.modules[__name__])
            return _build(reader, data, path, label, headers, memory)

    # ── addresses ───────────────────────────────────────────────────────

    def section_from_rva(self, rva: int) -> Section | None:
        return _holding(self._index("all"), rva)

    def code_section(self, rva: int) -> Section | None:
        """The executable section holding ``rva``, or None."""
        # discovery asks this a hundred thousand times: bisect the executable sections only, inline
        starts, ends, ordered = self.__dict__.get("_section_index_code") or self._index("code")
        i = bisect_right(starts, rva) - 1
        return ordered[i] if i >= 0 and rva < ends[i] else None

    def _index(self, which: str) -> _SectionIndex:
        """Sections (all, or executable only) by RVA for bisection, built once per image.

        Loading refuses overlapping sections, so at most one holds an RVA.
        """
        key = f"_section_index_{which}"
        cached = self.__dict__.get(key)
        if cached is None:
            ordered = sorted(self.sections, key=lambda s: s.rva)
            if which == "code":
                ordered = [s for s in ordered if s.executable]
            cached = ([s.rva for s in ordered], [s.end_rva for s in ordered], ordered)
            object.__setattr__(self, key, cached)
        return cached

    def is_executable_rva(self, rva: int) -> bool:
        return self.code_section(rva) is not None

    def read(self, rva: int, size: int) -> bytes:
        """Bytes of the mapped image at ``rva`` (zero-filled past raw data, as the loader does)."""
        if rva < 0 or size < 0 or rva + size > len(self.memory):
            raise ValueError(f"RVA range {rva:#x}+{size:#x} is outside the image")
        return self.memory[rva:rva + size]

    def import_at(self, iat_rva: int) -> Import | None:
        """The import whose IAT slot is at ``iat_rva``."""
        return self._iat.get(iat_rva)

    @property
    def has_tls(self) -> bool:
        return self.tls is not None

    @property
    def executable_sections(self) -> tuple[Section, ...]:
        return tuple(s for s in self.sections if s.executable)

    @property
    def name(self) -> str:
        return Path(self.path).name if self.path else "<bytes>"


# ── header checks (before LIEF sees the bytes) ─────────────────────────────


@dataclass(frozen=True)
class _Headers:
    machine: int
    timedatestamp: int
    checksum: int
    size_of_image: int
    sections: tuple[Section, ...]
    pe: PEHeaders


def _read_source(source: str | Path | bytes) -> tuple[bytes, str | None, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), None, "<bytes>"
    path = str(source)
    try:
        return Path(source).read_bytes(), path, path
    except OSError as exc:
        raise NotPEError(f"{path}: cannot read: {exc.strerror}") from None


def _lief_parse(lief: Any, data: bytes, config: Any) -> Any:
    try:
        return lief.PE.parse(data, config=config)
    except Exception:  # LIEF raises assorted types on damaged input; all mean "corrupt"
        return None


def check_headers(data: bytes, label: str) -> None:
    """Refuse ``data`` as ``Image.load`` would for its headers (not a PE, PE32, another machine,
    truncated or inconsistent), without parsing the rest: a cheap check of many inputs up front."""
    _check_headers(data, label)


def _check_headers(data: bytes, label: str) -> _Headers:
    size = len(data)
    headers = read_file_headers(data, label)
    section_alignment, size_of_image = headers.section_alignment, headers.size_of_image
    if section_alignment == 0 or section_alignment & (section_alignment - 1):
        raise CorruptImageError(f"{label}: corrupt SectionAlignment {section_alignment:#x}")
    if size_of_image > MAX_SIZE_OF_IMAGE:
        raise CorruptImageError(f"{label}: SizeOfImage {size_of_image:#x} is above the limit of {MAX_SIZE_OF_IMAGE:#x}")
    sections = []
    for entry in headers.sections:
        name, raw_size, raw_offset = entry.name, entry.raw_size, entry.raw_offset
        if raw_size and raw_offset + raw_size > size:
            raise TruncatedImageError(
                f"{label}: truncated: section {name} data ends at {raw_offset + raw_size:#x}, file has {size:#x} bytes")
        section = Section(name, entry.rva, entry.virtual_size, raw_offset, raw_size, entry.characteristics)
        if section.end_rva > size_of_image:
            raise CorruptImageError(f"{label}: corrupt: section {name} ends past SizeOfImage")
        sections.append(section)
    sections.sort(key=lambda s: s.rva)
    # What the loader maps is the sections; a larger SizeOfImage would only cost memory (Image.memory).
    needed = _align_up(max([headers.size_of_headers, *(s.end_rva for s in sections)]), section_alignment)
    if size_of_image > needed:
        raise CorruptImageError(
            f"{label}: corrupt: SizeOfImage {size_of_image:#x} is larger than the sections need ({needed:#x})")
    for before, after in zip(sections, sections[1:]):
        if before.end_rva > after.rva:
            raise CorruptImageError(f"{label}: corrupt: sections {before.name} and {after.name} overlap")
    for index, (rva, length) in enumerate(headers.directories):
        if index == DIRECTORY_SECURITY or (rva == 0 and length == 0):
            continue
        if rva + length > size_of_image or length > size_of_image:
            raise CorruptImageError(
                f"{label}: corrupt data directory {index}: {rva:#x}+{length:#x} is outside the image")
    return _Headers(headers.machine, headers.timedatestamp, headers.checksum, size_of_image, tuple(sections), headers)


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


# ── building the model from LIEF ───────────────────────────────────────────


def _mapped(data: bytes, headers: _Headers) -> bytes:
    """The image as the loader maps it: headers, then each section's raw data at its RVA, zeros elsewhere."""
    size = headers.size_of_image
    head = min(len(data), size, headers.pe.size_of_headers)
    # one copy, joined from views of the file and zero gaps (a bytearray filled then frozen is two)
    view = memoryview(data)
    pieces: list[Any] = [view[:head]]
    at = head
    for section in headers.sections:  # sorted by RVA, not overlapping (_check_headers)
        length = min(section.raw_size, section.virtual_size or section.raw_size, size - section.rva)
        if length <= 0:
            continue
        if section.rva < at:  # over the headers: rare enough for the old way
            return _mapped_in_place(data, headers)
        pieces.append(bytes(section.rva - at))
        pieces.append(view[section.raw_offset:section.raw_offset + length])
        at = section.rva + length
    pieces.append(bytes(size - at))
    return b"".join(pieces)


def _mapped_in_place(data: bytes, headers: _Headers) -> bytes:
    memory = bytearray(headers.size_of_image)
    head = min(len(data), headers.size_of_image, headers.pe.size_of_headers)
    memory[:head] = data[:head]
    for section in headers.sections:
        length = min(section.raw_size, section.virtual_size or section.raw_size, headers.size_of_image - section.rva)
        memory[section.rva:section.rva + length] = data[section.raw_offset:section.raw_offset + length]
    return bytes(memory)


class _LiefDirectories:
    """The directories as LIEF parsed them."""

    def __init__(self, lief: Any, binary: Any, headers: _Headers, label: str, memory: bytes) -> None:
        self.lief, self.binary, self.headers, self.label, self.memory = lief, binary, headers, label, memory

    def load_config(self) -> dict[str, int]:
        return _load_config(self.binary)

    def imports(self) -> tuple[Import, ...]:
        return _imports(self.binary, self.label)

    def exports(self) -> tuple[Export, ...]:
        return _exports(self.binary)

    def relocations(self) -> tuple[int, ...]:
        dir64 = self.lief.PE.RelocationEntry.BASE_TYPES.DIR64
        return _relocations(self.binary, dir64, self.headers.size_of_image, self.label)

    def symbols(self) -> tuple[Symbol, ...]:
        storage = self.lief.COFF.Symbol.STORAGE_CLASS
        return _symbols(self.binary, self.headers.sections, {storage.EXTERNAL, storage.STATIC})

    def runtime_functions(self) -> tuple[RuntimeFunction, ...]:
        return _runtime_functions(self.binary, self.headers.sections, self.label, self.memory)

    def tls(self) -> Tls | None:
        return _tls(self.binary, self.headers.pe.image_base)


def _build(directories: Any, data: bytes, path: str | None, label: str, headers: _Headers, memory: bytes) -> Image:
    load_config = directories.load_config()
    if load_config.get("chpe_metadata_pointer"):
        raise UnsupportedArchitectureError(f"{label}: ARM64EC/ARM64X hybrid image; only PE32+ x86-64 is supported")

    code = hashlib.sha256()
    view = memoryview(memory)  # the sections hashed in place, not copied
    for section in headers.sections:
        if section.executable:
            code.update(view[section.rva:section.end_rva])
    identity = Identity(headers.machine, headers.timedatestamp, headers.size_of_image, headers.checksum,
                        code.hexdigest())
    entry = headers.pe.entry_rva
    imports = directories.imports()
    return Image(
        path=path,
        image_base=headers.pe.image_base,
        entry_rva=entry or None,
        identity=identity,
        sections=headers.sections,
        exports=directories.exports(),
        imports=imports,
        relocations=directories.relocations(),
        symbols=directories.symbols(),
        runtime_functions=directories.runtime_functions(),
        load_config=load_config,
        tls=directories.tls(),
        memory=memory,
        _iat={imp.iat_rva: imp for imp in imports},
    )


def _tls(binary: Any, image_base: int) -> Tls | None:
    if not binary.has_tls:
        return None
    tls = binary.tls
    callbacks = tuple(va - image_base for va in tls.callbacks)
    return Tls(bytes(tls.data_template), tls.sizeof_zero_fill, callbacks, int(tls.characteristics))


def _exports(binary: Any) -> tuple[Export, ...]:
    if not binary.has_exports:
        return ()
    out = []
    for entry in binary.get_export().entries:
        forwarder = None
        if entry.is_forwarded:
            info = entry.forward_information
            forwarder = f"{pe_name(info.library)}.{pe_name(info.function)}"
        out.append(Export(pe_name(entry.name) or None, entry.ordinal, entry.address, forwarder))
    return tuple(sorted(out, key=lambda e: (e.rva, e.ordinal)))


def _imports(binary: Any, label: str) -> tuple[Import, ...]:
    out = []
    for module in binary.imports:
        dll = pe_name(module.name)
        for entry in module.entries:
            iat_rva = entry.iat_address
            if entry.is_ordinal:
                out.append(Import(dll, None, entry.ordinal, iat_rva))
            else:
                out.append(Import(dll, pe_name(entry.name), None, iat_rva))
    return tuple(out)


def _relocations(binary: Any, dir64: Any, size_of_image: int, label: str) -> tuple[int, ...]:
    """RVAs of the 64-bit absolute addresses the loader rebases (IMAGE_REL_BASED_DIR64)."""
    out = []
    for block in binary.relocations:
        for entry in block.entries:
            if entry.type == dir64:
                rva = entry.address
                if rva + 8 > size_of_image:
                    raise CorruptImageError(f"{label}: corrupt base relocation at {rva:#x}")
                out.append(rva)
    out.sort()
    return tuple(out)


def _symbols(binary: Any, sections: tuple[Section, ...], defined_classes: set[Any]) -> tuple[Symbol, ...]:
    out: dict[tuple[str, int], Symbol] = {}
    # LIEF numbers sections from 1 in file order; our tuple is sorted by RVA.
    by_index = {index + 1: section for index, section in enumerate(_file_order(binary, sections))}
    for symbol in binary.symbols:
        section = by_index.get(symbol.section_idx)
        name = pe_name(symbol.name)
        if section is None or not name or name.startswith(".") or symbol.storage_class not in defined_classes:
            continue
        rva = section.rva + symbol.value
        out[(name, rva)] = Symbol(name, rva, bool(symbol.is_function))
    return tuple(sorted(out.values(), key=lambda s: (s.rva, s.name)))


def _file_order(binary: Any, sections: tuple[Section, ...]) -> list[Section]:
    by_rva = {s.rva: s for s in sections}
    return [by_rva[s.virtual_address] for s in binary.sections]


def _unwind(info: Any, rva: int, memory: bytes) -> UnwindInfo:
    handler = info.handler if info.handler is not None else None
    # LIEF 0.17's frame_reg_offset is the high nibble of the version/flags byte, not of the frame byte
    return UnwindInfo(rva, info.version, int(info.flags), info.sizeof_prologue, info.count_opcodes,
                      int(info.frame_reg), memory[rva + 3] >> 4, handler)


def _runtime_functions(binary: Any, sections: tuple[Section, ...], label: str,
                       memory: bytes) -> tuple[RuntimeFunction, ...]:
    """.pdata entries; chained entries (UNW_FLAG_CHAININFO) become fragments of their root."""
    roots: dict[int, tuple[int, UnwindInfo]] = {}
    fragments: dict[int, list[tuple[int, int, int]]] = {}
    executable = [(s.rva, s.end_rva) for s in sections if s.executable]
    for entry in binary.exceptions:
        begin, end = entry.rva_start, entry.rva_end
        if not (begin < end and any(low <= begin and end <= high for low, high in executable)):
            raise CorruptImageError(f"{label}: corrupt .pdata entry {begin:#x}-{end:#x}")
        info = entry.unwind_info
        if info is None:
            raise CorruptImageError(f"{label}: .pdata entry {begin:#x} has no readable unwind info")
        # each LIEF attribute read builds a new Python object: read each link of the chain once
        root, root_info, depth = entry, info, 0
        while depth < 32:
            chained = root_info.chained if root_info is not None else None
            if chained is None:
                break
            root, root_info = chained, chained.unwind_info
            depth += 1
        if root is entry:
            roots[begin] = (end, _unwind(info, entry.unwind_rva, memory))
        else:
            fragments.setdefault(root.rva_start, []).append((begin, end, entry.unwind_rva))
    return fold_chains(roots, fragments)


def fold_chains(roots: dict[int, tuple[int, UnwindInfo]],
                fragments: dict[int, list[tuple[int, int, int]]]) -> tuple[RuntimeFunction, ...]:
    """RuntimeFunctions from .pdata roots (begin -> end, unwind) and chained fragments by their root's begin
    ((begin, end, unwind RVA) each), sorted by begin. ``fragments`` is emptied."""
    out = []
    append, pop, new, make = out.append, fragments.pop, _new_object, _runtime_function
    s0, s1, s2, s3, s4 = _SET_RUNTIME
    for begin, (end, unwind) in sorted(roots.items()):
        chain = pop(begin, None)
        if chain is None:
            # most functions have no fragments: ``_runtime_function`` inline, the loop's one cost
            function = new(RuntimeFunction)
            s0(function, begin)
            s1(function, end)
            s2(function, unwind)
            s3(function, ())
            s4(function, ())
            append(function)
            continue
        own = sorted([r for r in chain if r[0] != begin])
        append(make(begin, end, unwind, tuple((b, e) for b, e, _ in own), tuple(u for _, _, u in own)))
    # fragments whose root has no .pdata entry of its own are kept as functions in their own right
    for ranges in fragments.values():
        for start, end, unwind_rva in ranges:
            append(make(start, end, unwind_info(unwind_rva, 0, 0, 0, 0, 0, 0, None)))
    if fragments:  # the roots came in order; only orphaned fragments need placing
        out.sort(key=lambda f: f.begin_rva)
    return tuple(out)


_LOAD_CONFIG_FIELDS = (
    "security_cookie", "guard_flags", "guard_cf_check_function_pointer", "guard_cf_function_table",
    "guard_cf_function_count", "chpe_metadata_pointer", "dynamic_value_reloc_table", "volatile_metadata_pointer",
)


def _load_config(binary: Any) -> dict[str, int]:
    config = binary.load_configuration if binary.has_configuration else None
    if config is None:
        return {}
    out = {}
    for name in _LOAD_CONFIG_FIELDS:
        value = getattr(config, name, None)
        if value is not None:
            out[name] = int(value)
    return out
