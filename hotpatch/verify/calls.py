"""Calling functions of an emulated image, the inputs-file format, and comparing two runs.

``call(backend, target, args)`` calls a function of an image mapped in an
``EmulatorBackend`` by the Windows x64 convention: integers go as they are,
byte buffers are copied to the emulated heap and passed by pointer, and read
back afterwards. The result holds rax, each buffer's final bytes, and the
memory the call changed in the modules' writable sections and in blocks
from ``allocate_near`` (where a hotpatch keeps its data).

``compare(a, b)`` finds the first difference between two lists of results
(the same calls run on two processes: baseline + package, and the patched
image) and says it in one sentence.

The inputs file (JSON, specified in docs/VERIFY.md)::

    {"calls": [{"function": "scale", "args": [10]},
               {"function": "0x1370", "args": ["-5", {"bytes": "00ff"}, {"buffer": 64}], "returns": "int32"}]}
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputsError
from ..x86 import MASK64

if TYPE_CHECKING:
    from ..apply.backend import Module
    from ..apply.emulator import EmulatorBackend

__all__ = [
    "DEFAULT_ARGUMENT_SETS",
    "RETURN_TYPES",
    "Address",
    "Buffer",
    "CallResult",
    "CallSpec",
    "Difference",
    "MemoryWrite",
    "call",
    "compare",
    "default_calls",
    "load_inputs",
    "parse_inputs",
    "resolve",
    "run_calls",
]

MAX_BUFFER = 16 * 1024 * 1024
MAX_CALLS = 10_000
MAX_ARGS = 16
#: How a return value is read from rax; "void" ignores it.
RETURN_TYPES = ("int64", "uint64", "int32", "uint32", "int16", "uint16", "int8", "uint8", "bool", "void")
#: Integer arguments ``default_calls`` tries: extra arguments are harmless in the x64 convention.
DEFAULT_ARGUMENT_SETS: tuple[tuple[int, ...], ...] = (
    (0, 0, 0, 0),
    (1, 2, 3, 4),
    (7, 5, 3, 1),
    (-3, 10, -100, 2),
    (100, 1000, 10, 0),
    (0x7FFFFFFF, -1, 0x10000, 65),
)
_INTEGER = re.compile(r"^[+-]?(0[xX][0-9a-fA-F]+|[0-9]+)$")


@dataclass(frozen=True)
class Buffer:
    """A byte buffer argument: copied into the emulated heap, passed by pointer, read back after the call."""

    data: bytes
    kind: str = "bytes"  # how it was written in the inputs: bytes, buffer, string, wstring

    def __repr__(self) -> str:
        return f"<{self.kind} of {len(self.data)} bytes>"


Argument = int | Buffer


@dataclass(frozen=True)
class Address:
    """A function given by its VA in the emulated process (code outside any image, such as a stub)."""

    va: int

    def __str__(self) -> str:
        return f"{self.va:#x}"


@dataclass(frozen=True)
class CallSpec:
    """One call: the function (export or symbol name, RVA, or Address), its arguments, how to read its result."""

    function: str | int | Address
    args: tuple[Argument, ...] = ()
    returns: str = "int64"
    module: str | None = None  # the image that holds the function; the first one loaded when None

    def __str__(self) -> str:
        name = f"{self.function:#x}" if isinstance(self.function, int) else str(self.function)
        shown = ", ".join(repr(a) if isinstance(a, Buffer) else str(a) for a in self.args)
        return f"{name}({shown})"


@dataclass(frozen=True)
class MemoryWrite:
    """A run of bytes a call wrote: where, what was there before, what is there now."""

    va: int
    before: bytes
    after: bytes
    module: str | None  # the image the bytes belong to, None for an allocation
    rva: int | None
    image_index: int | None  # position of that image in load order

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def __str__(self) -> str:
        where = f"{self.module}+{self.rva:#x}" if self.module is not None and self.rva is not None else f"{self.va:#x}"
        return f"{where}: {self.before.hex()} -> {self.after.hex()}"


@dataclass(frozen=True)
class CallResult:
    """What one call did."""

    call: CallSpec
    function_va: int
    rax: int
    buffers: tuple[bytes, ...]  # final contents of the Buffer arguments, in argument order
    writes: tuple[MemoryWrite, ...]

    @property
    def value(self) -> int | None:
        """rax read as ``call.returns`` says (None for void)."""
        return _typed(self.rax, self.call.returns)

    def to_json(self) -> dict[str, Any]:
        return {
            "function": str(self.call.function) if not isinstance(self.call.function, int)
            else f"{self.call.function:#x}",
            "va": f"{self.function_va:#x}",
            "returns": self.call.returns,
            "value": self.value,
            "rax": f"{self.rax:#x}",
            "buffers": [b.hex() for b in self.buffers],
            "writes": [{"va": f"{w.va:#x}", "module": w.module, "rva": None if w.rva is None else f"{w.rva:#x}",
                        "before": w.before.hex(), "after": w.after.hex()} for w in self.writes],
        }


def _typed(rax: int, returns: str) -> int | None:
    if returns == "void":
        return None
    if returns == "bool":
        return int(bool(rax & 0xFF))
    bits = int(returns.removeprefix("u").removeprefix("int"))
    value = rax & ((1 << bits) - 1)
    if not returns.startswith("u") and value >> (bits - 1):
        value -= 1 << bits
    return value


# ── the inputs file ───────────────────────────────────────────────────────


def load_inputs(path: str | Path) -> list[CallSpec]:
    """The calls of an inputs file (see docs/VERIFY.md)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputsError(f"{path}: cannot read the inputs file: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputsError(f"{path}: not JSON: {exc}") from None
    return parse_inputs(data, str(path))


def parse_inputs(data: Any, label: str = "inputs") -> list[CallSpec]:
    """The calls of an inputs document already parsed from JSON."""
    if not isinstance(data, dict) or not isinstance(data.get("calls"), list) or set(data) - {"calls"}:
        raise InputsError(f"{label}: expected an object with one key, \"calls\", holding a list")
    calls = data["calls"]
    if len(calls) > MAX_CALLS:
        raise InputsError(f"{label}: {len(calls)} calls, more than the limit of {MAX_CALLS}")
    return [_call_spec(raw, f"{label}: call {index}") for index, raw in enumerate(calls)]


def _call_spec(raw: Any, where: str) -> CallSpec:
    if not isinstance(raw, dict) or "function" not in raw or set(raw) - {"function", "args", "returns", "module"}:
        raise InputsError(f"{where}: expected an object with \"function\" and optionally \"args\", \"returns\", "
                          "\"module\"")
    function = raw["function"]
    if isinstance(function, bool) or not isinstance(function, (str, int)) or function == "":
        raise InputsError(f"{where}: \"function\" must be a name, an RVA string such as \"0x1370\", or an integer")
    if isinstance(function, str) and _INTEGER.match(function):
        function = _integer(function, where)
    if isinstance(function, int) and not 0 <= function < 1 << 32:
        raise InputsError(f"{where}: RVA {function} out of range")
    args = raw.get("args", [])
    if not isinstance(args, list) or len(args) > MAX_ARGS:
        raise InputsError(f"{where}: \"args\" must be a list of at most {MAX_ARGS} arguments")
    returns = raw.get("returns", "int64")
    if returns not in RETURN_TYPES:
        raise InputsError(f"{where}: \"returns\" must be one of {', '.join(RETURN_TYPES)}")
    module = raw.get("module")
    if module is not None and not isinstance(module, str):
        raise InputsError(f"{where}: \"module\" must be a module name")
    return CallSpec(function, tuple(_argument(a, f"{where}, argument {i}") for i, a in enumerate(args)), returns,
                    module)


def _integer(text: str, where: str) -> int:
    if not _INTEGER.match(text.strip()):
        raise InputsError(f"{where}: {text!r} is not an integer (decimal or 0x hex, optionally signed)")
    return int(text.strip(), 0)


def _argument(raw: Any, where: str) -> Argument:
    if isinstance(raw, bool):
        raise InputsError(f"{where}: use 0 or 1, not a JSON boolean")
    if isinstance(raw, int) or isinstance(raw, str):
        value = raw if isinstance(raw, int) else _integer(raw, where)
        if not -(1 << 63) <= value <= MASK64:
            raise InputsError(f"{where}: {value} does not fit in 64 bits")
        return value
    if isinstance(raw, dict) and len(raw) == 1:
        (kind, value), = raw.items()
        if kind == "bytes" and isinstance(value, str):
            try:
                data = bytes.fromhex(value)
            except ValueError:
                raise InputsError(f"{where}: \"bytes\" must be hex digits") from None
        elif kind == "buffer" and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            data = bytes(value)
        elif kind == "string" and isinstance(value, str):
            data = value.encode("utf-8") + b"\0"
        elif kind == "wstring" and isinstance(value, str):
            data = value.encode("utf-16-le") + b"\0\0"
        else:
            raise InputsError(f"{where}: unknown argument {json.dumps(raw)}")
        if len(data) > MAX_BUFFER:
            raise InputsError(f"{where}: buffer of {len(data)} bytes exceeds {MAX_BUFFER}")
        return Buffer(data, kind)
    raise InputsError(f"{where}: an argument is an integer, a string holding one, or one of "
                      "{\"bytes\": hex}, {\"buffer\": size}, {\"string\": text}, {\"wstring\": text}")


def default_calls(functions: Iterable[str], argument_sets: Sequence[tuple[int, ...]] = DEFAULT_ARGUMENT_SETS,
                  module: str | None = None) -> list[CallSpec]:
    """Each function called with each of ``argument_sets`` (what verify runs without an inputs file)."""
    return [CallSpec(name, args, module=module) for name in functions for args in argument_sets]


# ── calling ───────────────────────────────────────────────────────────────


def resolve(backend: EmulatorBackend, function: str | int | Address, module: str | None = None) -> int:
    """The VA of ``function`` (an RVA, an export name, or a COFF symbol name) in ``module``."""
    if isinstance(function, Address):
        return function.va
    target = backend.main_module() if module is None else _module(backend, module)
    image = backend.image_of(target)
    if isinstance(function, int):
        if not 0 <= function < target.size:
            raise InputsError(f"RVA {function:#x} is outside {target.name} ({target.size:#x} bytes)")
        return target.base_va + function
    for export in image.exports:
        if export.name == function and export.forwarder is None:
            return target.base_va + export.rva
    symbols = [s for s in image.symbols if s.name == function]
    if symbols:
        symbols.sort(key=lambda s: not s.is_function)
        return target.base_va + symbols[0].rva
    raise InputsError(f"{target.name} has no export or symbol named {function!r}")


def _module(backend: EmulatorBackend, name: str) -> Module:
    for candidate in backend.images():
        if candidate.name.lower() == name.lower():
            return candidate
    raise InputsError(f"no image named {name!r} is loaded in the emulator")


def call(
    backend: EmulatorBackend,
    target: str | int | Address | CallSpec,
    args: Sequence[Argument | bytes] = (),
    *,
    returns: str = "int64",
    module: str | None = None,
    timeout: float | None = None,
) -> CallResult:
    """Call ``target`` (a name, an RVA, an Address, or a whole CallSpec) with ``args``; ``bytes`` become buffers."""
    if isinstance(target, CallSpec):
        spec = target
    else:
        spec = CallSpec(target, tuple(Buffer(a) if isinstance(a, (bytes, bytearray)) else a for a in args),
                        returns, module)
    if spec.returns not in RETURN_TYPES:
        raise InputsError(f"unknown return type {spec.returns!r}")
    function_va = resolve(backend, spec.function, spec.module)
    pointers: list[tuple[int, int]] = []  # (VA, size) of each buffer
    words = []
    try:
        for argument in spec.args:
            if isinstance(argument, Buffer):
                va = backend.heap_allocate(argument.data)
                pointers.append((va, len(argument.data)))
                words.append(va)
            else:
                words.append(argument & MASK64)
        result = backend.run(function_va, words, timeout=timeout)
        buffers = tuple(backend.read(va, size) if size else b"" for va, size in pointers)
    finally:
        for va, _ in pointers:
            backend.heap_free(va, missing_ok=True)  # the callee may have freed it
    return CallResult(spec, function_va, result.rax, buffers, _writes(backend, result.writes))


def _writes(backend: EmulatorBackend, runs: Iterable[tuple[int, bytes, bytes]]) -> tuple[MemoryWrite, ...]:
    images = backend.images()
    out = []
    for va, before, after in runs:
        owner = next(((i, m) for i, m in enumerate(images) if m.contains(va)), None)
        if owner is None:
            out.append(MemoryWrite(va, before, after, None, None, None))
        else:
            index, module = owner
            out.append(MemoryWrite(va, before, after, module.name, va - module.base_va, index))
    return tuple(out)


def run_calls(backend: EmulatorBackend, calls: Iterable[CallSpec], *, timeout: float | None = None) -> list[CallResult]:
    """The calls one after the other in the same process (state carries over, as in a real one)."""
    return [call(backend, spec, timeout=timeout) for spec in calls]


# ── comparing two runs ────────────────────────────────────────────────────


@dataclass(frozen=True)
class Difference:
    """The first way two runs of the same calls disagree."""

    index: int  # the call, from 0
    kind: str  # "count", "return", "buffer" or "memory"
    message: str

    def __str__(self) -> str:
        return self.message


Translate = Callable[[int], "int | None"]


def compare(
    first: Sequence[CallResult],
    second: Sequence[CallResult],
    *,
    labels: tuple[str, str] = ("first", "second"),
    translate: Translate | None = None,
    translate_first: Translate | None = None,
) -> Difference | None:
    """The first difference between two runs of the same calls, or None when they agree.

    Per call, in order: the return value (as its ``returns`` type reads it),
    each buffer argument, then the bytes the call changed. Changed bytes are
    matched by image (in load order) and RVA, and by address outside images;
    when the two processes lay their data out differently (a hotpatch keeps
    new globals in its own allocation), ``translate`` maps an address of the
    second process to the first's (None: the byte has no counterpart and is
    not compared), and ``translate_first`` likewise filters the first's.
    """
    one, two = labels
    if len(first) != len(second):
        return Difference(min(len(first), len(second)), "count",
                          f"{one} made {len(first)} calls and {two} {len(second)}")
    for index, (a, b) in enumerate(zip(first, second)):
        where = f"call {index + 1}, {a.call}"
        if a.value != b.value:
            return Difference(index, "return", f"{where}: the return value differs: {one} {_show(a.value)}, "
                                               f"{two} {_show(b.value)}")
        for number, (x, y) in enumerate(zip(a.buffers, b.buffers), 1):
            if x != y:
                offset = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
                return Difference(index, "buffer", f"{where}: buffer argument {number} differs at offset {offset}: "
                                                   f"{one} {x[offset:offset + 16].hex(' ')}, "
                                                   f"{two} {y[offset:offset + 16].hex(' ')}")
        difference = _memory_difference(a, b, translate, translate_first)
        if difference is not None:
            key, mine, theirs, describe = difference
            return Difference(index, "memory", f"{where}: the memory it changed differs at {describe}: "
                                               f"{one} {_bytes(mine)}, {two} {_bytes(theirs)}")
    return None


def _show(value: int | None) -> str:
    return "nothing (void)" if value is None else f"{value} ({value & MASK64:#x})"


def _bytes(run: list[int | None]) -> str:
    if all(b is None for b in run):
        return "left it unchanged"
    return "set " + " ".join("--" if b is None else f"{b:02x}" for b in run)


Key = tuple[int, int]  # (image index or -1, RVA or VA)


def _changed(result: CallResult, translate: Translate | None) -> dict[Key, tuple[int, str]]:
    out: dict[Key, tuple[int, str]] = {}
    for write in result.writes:
        for offset, (old, new) in enumerate(zip(write.before, write.after)):
            if old == new:
                continue
            va = write.va + offset
            if translate is not None:
                mapped = translate(va)
                if mapped is None:
                    continue
                out[(-1, mapped)] = (new, f"{mapped:#x}")
            elif write.image_index is not None and write.rva is not None:
                out[(write.image_index, write.rva + offset)] = (new, f"{write.module}+{write.rva + offset:#x}")
            else:
                out[(-1, va)] = (new, f"{va:#x}")
    return out


def _memory_difference(a: CallResult, b: CallResult, translate: Translate | None,
                       translate_first: Translate | None = None
                       ) -> tuple[Key, list[int | None], list[int | None], str] | None:
    if translate_first is None and translate is not None:
        translate_first = lambda va: va  # noqa: E731
    mine = _changed(a, translate_first)
    theirs = _changed(b, translate)
    differing = {k for k in mine.keys() | theirs.keys() if mine.get(k, (None,))[0] != theirs.get(k, (None,))[0]}
    if not differing:
        return None
    first = min(differing)
    run = [first]
    while len(run) < 16 and (run[-1][0], run[-1][1] + 1) in differing:
        run.append((run[-1][0], run[-1][1] + 1))
    describe = (mine.get(first) or theirs[first])[1]
    return (first, [mine[k][0] if k in mine else None for k in run],
            [theirs[k][0] if k in theirs else None for k in run], f"{describe} ({len(run)} bytes)")
