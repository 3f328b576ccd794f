"""Instructions, references and fingerprints of every function.

The work is done by the compiled core (``hotpatch.analysis._core``, Cython over
capstone's C API). ``hotpatch.analysis._reference`` is its pure-Python twin, used when
``HOTPATCH_PURE_PYTHON=1`` and by the tests as the oracle. If the compiled
core is missing we fail loudly instead of silently running 20 times slower.
"""

from __future__ import annotations

import importlib
import os
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING, Any

from ..collector import gc_paused
from ..errors import AnalysisError
from .refkinds import KIND_NAMES, TABLE_KIND_NAMES

if TYPE_CHECKING:
    from ..pe.image import Image

__all__ = [
    "AnalysisContext",
    "FunctionAnalysis",
    "JumpTable",
    "Reference",
    "backend",
    "decode",
    "diff_kernels",
    "fingerprint_all",
    "x86_numbers",
]


@dataclass(frozen=True)
class Reference:
    kind: int
    insn_rva: int
    operand_offset: int
    operand_size: int
    target_rva: int

    @property
    def kind_name(self) -> str:
        return KIND_NAMES[self.kind]


@dataclass(frozen=True)
class JumpTable:
    insn_rva: int
    table_rva: int
    entry_kind: int
    targets: tuple[int, ...]

    @property
    def entry_kind_name(self) -> str:
        return TABLE_KIND_NAMES[self.entry_kind]


@dataclass(frozen=True, slots=True)
class FunctionAnalysis:
    """Decoded view of one function: where its instructions start, what they reference (slots: a large image
    has tens of thousands, and discovery keeps every range it decoded until it is done)."""

    rva: int
    ranges: tuple[tuple[int, int], ...]
    insn_rvas: array = field(repr=False)
    #: (kind, insn_rva, operand_offset, operand_size, target) in instruction order: a list from the Python
    #: reference, a packed ``_core.RefList`` (same items, a tenth of the memory) from the compiled core
    raw_refs: Sequence[tuple[int, int, int, int, int]] = field(repr=False)
    raw_tables: list[tuple[int, int, int, tuple[int, ...]]] = field(repr=False)
    fingerprint: str = ""

    @property
    def instruction_count(self) -> int:
        return len(self.insn_rvas)

    @property
    def references(self) -> list[Reference]:
        return [Reference(*ref) for ref in self.raw_refs]

    @property
    def jump_tables(self) -> list[JumpTable]:
        return [JumpTable(*table) for table in self.raw_tables]

    def call_targets(self) -> Iterable[int]:
        from .refkinds import CALL_REL32

        return (ref[4] for ref in self.raw_refs if ref[0] == CALL_REL32)


def _slot_setters(cls: type, names: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(cls.__dict__[name].__set__ for name in names)


_new_object = object.__new__
_SET_RVA, _SET_RANGES, _SET_INSN_RVAS, _SET_RAW_REFS, _SET_RAW_TABLES, _SET_FINGERPRINT = _slot_setters(
    FunctionAnalysis, ("rva", "ranges", "insn_rvas", "raw_refs", "raw_tables", "fingerprint"))


def _analysis(rva: int, ranges: tuple[tuple[int, int], ...], insn_rvas: array,
              raw_refs: Sequence[tuple[int, int, int, int, int]],
              raw_tables: list[tuple[int, int, int, tuple[int, ...]]], fingerprint: str = "") -> FunctionAnalysis:
    """``FunctionAnalysis(...)`` with its slots filled through their descriptors: the frozen dataclass's
    ``__init__`` looks each attribute up by name through ``object.__setattr__``, and discovery makes a few
    hundred thousand of them on a large image (about 0.3 us of 0.7 saved each)."""
    analysis = _new_object(FunctionAnalysis)
    _SET_RVA(analysis, rva)
    _SET_RANGES(analysis, ranges)
    _SET_INSN_RVAS(analysis, insn_rvas)
    _SET_RAW_REFS(analysis, raw_refs)
    _SET_RAW_TABLES(analysis, raw_tables)
    _SET_FINGERPRINT(analysis, fingerprint)
    return analysis


@dataclass(frozen=True, eq=False)
class AnalysisContext:
    """What the core needs from an image, in flat form."""

    memory: bytes
    image_base: int
    relocations: array
    #: IAT slot RVA -> b"dll!name"
    iat: dict[int, bytes]
    #: (begin, end, b"X" | b"W" | b"R") for each section
    regions: tuple[tuple[int, int, bytes], ...]
    #: lowest section RVA: image-relative displacements below it are not addresses
    first_section_rva: int

    @cached_property
    def iat_order(self) -> array:
        """The IAT slot RVAs sorted (``array("I")``), made once: the decoder bisects them in every batch."""
        return array("I", sorted(self.iat))

    @classmethod
    def from_image(cls, image: Image) -> AnalysisContext:
        regions = tuple(
            (s.rva, s.end_rva, b"X" if s.executable else b"W" if s.writable else b"R") for s in image.sections
        )
        return cls(
            memory=image.memory,
            image_base=image.image_base,
            relocations=array("I", image.relocations),
            iat={imp.iat_rva: imp.label.encode() for imp in image.imports},
            regions=regions,
            first_section_rva=min(s.rva for s in image.sections),
        )


# ── backend selection (msgpack style, but never silent) ─────────────────────


def _load_backend() -> ModuleType:
    if os.environ.get("HOTPATCH_PURE_PYTHON") == "1":
        return importlib.import_module("hotpatch.analysis._reference")
    try:
        # the core takes libcapstone's entry points through hotpatch.x86.capstone_symbol, which opens the library
        return importlib.import_module("hotpatch.analysis._core")
    except ImportError as exc:
        raise AnalysisError(
            f"the compiled analysis core hotpatch.analysis._core is not available ({exc}); reinstall with "
            "'pip install .' or set HOTPATCH_PURE_PYTHON=1 to use the slow reference"
        ) from None


_backend: ModuleType | None = None


def backend() -> ModuleType:
    """The analysis implementation in use (``.IMPLEMENTATION`` is "cython" or "python")."""
    global _backend
    if _backend is None:
        _backend = _load_backend()
    return _backend


_x86_numbers: Any = None


def x86_numbers() -> Any:
    """capstone's x86 numbers by their names in ``capstone.x86_const`` (``x86_numbers().X86_REG_RCX``): the
    compiled core's, from the header it is built against, so that capstone's Python binding (its import sets
    up every architecture, about 0.04 s) is imported only where its own decoder is used; with the Python core,
    the binding's."""
    global _x86_numbers
    if _x86_numbers is None:
        numbers = getattr(backend(), "X86_NUMBERS", None)
        if numbers is None:
            from capstone import x86_const

            _x86_numbers = x86_const
        else:
            _x86_numbers = SimpleNamespace(**numbers)
    return _x86_numbers


@cache  # asked per changed function by the verdict: the lookup is made once per implementation
def kernels_for(impl: Any, compiled: str, twin: str, what: str) -> ModuleType:
    """The kernels that go with an analysis implementation: the module ``compiled`` with the compiled core, its
    pure-Python ``twin`` with the Python one (the twins agree); ``what`` names them in the error when the compiled
    module did not build."""
    if getattr(impl, "IMPLEMENTATION", None) != "cython":
        return importlib.import_module(twin)
    try:
        return importlib.import_module(compiled)
    except ImportError as exc:
        raise AnalysisError(f"the compiled {what} {compiled} did not load ({exc}); "
                            "reinstall with 'pip install .'") from None


def diff_kernels(impl: Any = None) -> ModuleType:
    """The diff kernels that go with an analysis implementation: compiled with compiled, Python with Python."""
    return kernels_for(impl or backend(), "hotpatch.diff._diffcore", "hotpatch.diff._diffreference", "diff kernels")


def decode(
    ctx: AnalysisContext, items: list[tuple[int, tuple[tuple[int, int], ...]]], impl: Any = None
) -> list[FunctionAnalysis]:
    """Decode each ``(rva, ranges)`` item (no fingerprints yet)."""
    impl = impl or backend()
    with gc_paused():
        return impl.decode(ctx, items, FunctionAnalysis)  # type: ignore[no-any-return]


def fingerprint_all(
    ctx: AnalysisContext, decoded: list[FunctionAnalysis], function_starts: array, impl: Any = None
) -> list[FunctionAnalysis]:
    """The same analyses with their fingerprints, given the final set of function starts."""
    impl = impl or backend()
    return impl.fingerprinted(ctx, decoded, function_starts, FunctionAnalysis)  # type: ignore[no-any-return]
