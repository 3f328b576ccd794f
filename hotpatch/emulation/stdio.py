"""Models of C stdio output: stdout and stderr writes and the printf family.

What the guest prints is collected in ``Machine.output``; streams other than
stdout and stderr (files) are not modelled.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from ..errors import EmulationError
from ..x86 import MASK64
from .crt import FILE_SIZE, IOB
from .machine import ModelCall
from .models import model

__all__ = ["emit", "format_printf"]


def _stream(c: ModelCall, file: int) -> str:
    offset = file - (c.machine.crt_data + IOB)
    if offset in (FILE_SIZE, 2 * FILE_SIZE):
        return "stdout" if offset == FILE_SIZE else "stderr"
    raise EmulationError(f"{c.label} on FILE {file:#x}: only stdout and stderr are modelled")


def emit(c: ModelCall, data: bytes) -> None:
    c.machine.output.append(data)


@model("__iob_func")
def _iob_func(c: ModelCall) -> int:
    return c.machine.crt_data + IOB


@model("__acrt_iob_func")
def _acrt_iob_func(c: ModelCall) -> int:
    return c.machine.crt_data + IOB + FILE_SIZE * min(c.arg32(0), 2)


@model("fwrite")
def _fwrite(c: ModelCall) -> int:
    size, count = c.arg(1), c.arg(2)
    _stream(c, c.arg(3))
    if size and count:
        emit(c, c.machine.read(c.arg(0), size * count, c.label))
    return count


@model("fputs")
def _fputs(c: ModelCall) -> int:
    _stream(c, c.arg(1))
    emit(c, c.machine.cstring(c.arg(0), c.label))
    return 0


@model("puts")
def _puts(c: ModelCall) -> int:
    emit(c, c.machine.cstring(c.arg(0), c.label) + b"\n")
    return 0


@model("fputc", "putc")
def _fputc(c: ModelCall) -> int:
    _stream(c, c.arg(1))
    emit(c, bytes([c.arg32(0) & 0xFF]))
    return c.arg32(0) & 0xFF


@model("putchar")
def _putchar(c: ModelCall) -> int:
    emit(c, bytes([c.arg32(0) & 0xFF]))
    return c.arg32(0) & 0xFF


@model("fflush")
def _fflush(c: ModelCall) -> int:
    return 0


def format_printf(c: ModelCall, template: bytes, next_arg: Callable[[], int]) -> bytes:
    """printf formatting of the common conversions: d i u x X o c s p %, flags, width, precision, sizes."""
    out = bytearray()
    index = 0
    while index < len(template):
        char = template[index]
        if char != 0x25:  # '%'
            out.append(char)
            index += 1
            continue
        index += 1
        flags = ""
        while index < len(template) and chr(template[index]) in "-+ #0":
            flags += chr(template[index])
            index += 1
        width = ""
        if index < len(template) and template[index] == 0x2A:  # '*'
            width = str(next_arg() & 0xFFFFFFFF)
            index += 1
        while index < len(template) and chr(template[index]).isdigit():
            width += chr(template[index])
            index += 1
        precision = ""
        if index < len(template) and template[index] == 0x2E:  # '.'
            precision = "."
            index += 1
            if index < len(template) and template[index] == 0x2A:
                precision += str(next_arg() & 0xFFFFFFFF)
                index += 1
            while index < len(template) and chr(template[index]).isdigit():
                precision += chr(template[index])
                index += 1
        bits = 32
        for prefix, size in ((b"I64", 64), (b"I32", 32), (b"ll", 64), (b"l", 32), (b"hh", 8), (b"h", 16),
                             (b"z", 64), (b"j", 64), (b"t", 64), (b"I", 64)):
            if template.startswith(prefix, index):
                bits = size
                index += len(prefix)
                break
        if index >= len(template):
            break
        conversion = chr(template[index])
        index += 1
        spec = "%" + flags + width + precision
        if conversion == "%":
            out += b"%"
        elif conversion in "di":
            value = next_arg() & ((1 << bits) - 1)
            value -= (1 << bits) if value >> (bits - 1) else 0
            out += ((spec + "d") % value).encode()
        elif conversion in "uxXo":
            out += ((spec + conversion.replace("u", "d")) % (next_arg() & ((1 << bits) - 1))).encode()
        elif conversion == "c":
            out += ((spec + "c") % chr(next_arg() & 0xFF)).encode("latin-1")
        elif conversion == "s":
            pointer = next_arg()
            text = c.machine.cstring(pointer, c.label).decode("latin-1") if pointer else "(null)"
            out += ((spec + "s") % text).encode("latin-1")
        elif conversion == "p":
            out += f"{next_arg():016X}".encode()
        elif conversion in "fFeEgG":
            (value,) = struct.unpack("<d", next_arg().to_bytes(8, "little"))
            out += ((spec + conversion) % value).encode()
        else:
            raise EmulationError(f"{c.label}: printf conversion %{conversion} is not modelled")
    return bytes(out)


def _varargs(c: ModelCall, first: int) -> Callable[[], int]:
    position = [first]

    def next_arg() -> int:
        value = c.arg(position[0])
        position[0] += 1
        return value

    return next_arg


def _va_list(c: ModelCall, va_list: int) -> Callable[[], int]:
    position = [va_list]

    def next_arg() -> int:
        value = c.machine.u64(position[0], c.label)
        position[0] += 8
        return value

    return next_arg


def _print(c: ModelCall, format_index: int, args: Callable[[], int]) -> int:
    """printf and its kin: format argument ``format_index`` with ``args``, write it out, return its length."""
    text = format_printf(c, c.machine.cstring(c.arg(format_index), c.label), args)
    emit(c, text)
    return len(text)


@model("printf")
def _printf(c: ModelCall) -> int:
    return _print(c, 0, _varargs(c, 1))


@model("fprintf")
def _fprintf(c: ModelCall) -> int:
    _stream(c, c.arg(0))
    return _print(c, 1, _varargs(c, 2))


@model("vfprintf")
def _vfprintf(c: ModelCall) -> int:
    _stream(c, c.arg(0))
    return _print(c, 1, _va_list(c, c.arg(2)))


@model("vprintf")
def _vprintf(c: ModelCall) -> int:
    return _print(c, 0, _va_list(c, c.arg(1)))


@model("sprintf")
def _sprintf(c: ModelCall) -> int:
    text = format_printf(c, c.machine.cstring(c.arg(1), c.label), _varargs(c, 2))
    c.machine.write(c.arg(0), text + b"\0", c.label)
    return len(text)


@model("snprintf", "_snprintf")
def _snprintf(c: ModelCall) -> int:
    text = format_printf(c, c.machine.cstring(c.arg(2), c.label), _varargs(c, 3))
    return _bounded_store(c, c.arg(0), c.arg(1), text, c.stub.name == "_snprintf")


@model("vsnprintf", "_vsnprintf")
def _vsnprintf(c: ModelCall) -> int:
    text = format_printf(c, c.machine.cstring(c.arg(2), c.label), _va_list(c, c.arg(3)))
    return _bounded_store(c, c.arg(0), c.arg(1), text, c.stub.name == "_vsnprintf")


def _bounded_store(c: ModelCall, buffer: int, size: int, text: bytes, microsoft: bool) -> int:
    """C99 snprintf returns the full length; Microsoft's _snprintf returns -1 when it truncates."""
    if size:
        stored = text[: size - 1] + b"\0" if len(text) >= size else text + b"\0"
        if microsoft and len(text) >= size:
            stored = text[:size]
        c.machine.write(buffer, stored, c.label)
    if microsoft and len(text) >= size:
        return MASK64  # -1
    return len(text)
