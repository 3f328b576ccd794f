"""Models of the C runtime: memory and string functions, the heap, errno and locale, CRT startup.

The string and memory functions are also exported by ntdll.dll, as on
Windows. ``abort``, ``exit`` and ``_amsg_exit`` end the call with an error,
because the process would end there. Stdio output is in ``stdio``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from ..errors import EmulationError
from ..x86 import MASK64
from .machine import ModelCall
from .models import code_model, model

__all__: list[str] = []

BOTH = ("crt", "ntdll")
ENOMEM = 12
EINVAL = 22

# Places inside the machine's CRT data page.
ERRNO = 0x000
DOSERRNO = 0x004
IOB = 0x100  # three FILE objects (msvcrt's FILE is 0x30 bytes)
FILE_SIZE = 0x30
LCONV = 0x200
LCONV_STRINGS = 0x300
STRERROR = 0x400


def _result32(value: int) -> int:
    return value & 0xFFFFFFFF if value >= 0 else (value & MASK64)


# ── memory and strings ────────────────────────────────────────────────────


@model("memcpy", "memmove", families=BOTH)
@model("RtlMoveMemory", "RtlCopyMemory", families=("ntdll", "kernel32"))
def _memcpy(c: ModelCall) -> int:
    dst, src, size = c.arg(0), c.arg(1), c.arg(2)
    if size:
        c.machine.write(dst, c.machine.read(src, size, c.label), c.label)
    return dst


@model("memset", families=BOTH)
def _memset(c: ModelCall) -> int:
    dst, value, size = c.arg(0), c.arg(1) & 0xFF, c.arg(2)
    if size:
        c.machine.write(dst, bytes([value]) * size, c.label)
    return dst


@model("RtlFillMemory", families=("ntdll", "kernel32"))
def _fill_memory(c: ModelCall) -> None:
    dst, size, value = c.arg(0), c.arg(1), c.arg(2) & 0xFF
    if size:
        c.machine.write(dst, bytes([value]) * size, c.label)


@model("RtlZeroMemory", "RtlSecureZeroMemory", families=("ntdll", "kernel32"))
def _zero_memory(c: ModelCall) -> None:
    dst, size = c.arg(0), c.arg(1)
    if size:
        c.machine.write(dst, bytes(size), c.label)


def _compare(a: bytes, b: bytes) -> int:
    for x, y in zip(a, b):
        if x != y:
            return -1 if x < y else 1
    return 0 if len(a) == len(b) else (-1 if len(a) < len(b) else 1)


@model("memcmp", families=BOTH)
def _memcmp(c: ModelCall) -> int:
    size = c.arg(2)
    if not size:
        return 0
    return _result32(_compare(c.machine.read(c.arg(0), size, c.label), c.machine.read(c.arg(1), size, c.label)))


@model("RtlCompareMemory", families=("ntdll", "kernel32"))
def _rtl_compare_memory(c: ModelCall) -> int:
    size = c.arg(2)
    a, b = c.machine.read(c.arg(0), size, c.label), c.machine.read(c.arg(1), size, c.label)
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return size


@model("memchr", families=BOTH)
def _memchr(c: ModelCall) -> int:
    start, value, size = c.arg(0), c.arg(1) & 0xFF, c.arg(2)
    index = c.machine.read(start, size, c.label).find(bytes([value])) if size else -1
    return start + index if index >= 0 else 0


@model("strlen", families=BOTH)
def _strlen(c: ModelCall) -> int:
    return len(c.machine.cstring(c.arg(0), c.label))


@model("strnlen", families=BOTH)
def _strnlen(c: ModelCall) -> int:
    return len(c.machine.cstring(c.arg(0), c.label, limit=c.arg(1)) if c.arg(1) else b"")


@model("wcslen", families=BOTH)
def _wcslen(c: ModelCall) -> int:
    return len(c.machine.wstring(c.arg(0), c.label).encode("utf-16-le")) // 2


@model("strcmp", families=BOTH)
def _strcmp(c: ModelCall) -> int:
    return _result32(_compare(c.machine.cstring(c.arg(0), c.label), c.machine.cstring(c.arg(1), c.label)))


@model("strncmp", families=BOTH)
def _strncmp(c: ModelCall) -> int:
    limit = c.arg(2)
    if not limit:
        return 0
    a = _bounded(c, c.arg(0), limit)
    b = _bounded(c, c.arg(1), limit)
    return _result32(_compare(a, b))


def _bounded(c: ModelCall, va: int, limit: int) -> bytes:
    """At most ``limit`` bytes of the string at ``va`` (reads stop at its terminator)."""
    out = bytearray()
    while len(out) < limit:
        byte = c.machine.read(va + len(out), 1, c.label)
        if byte == b"\0":
            break
        out += byte
    return bytes(out)


@model("_stricmp", "_strcmpi", families=BOTH)
@model("lstrcmpiA", families=("kernel32",))
def _stricmp(c: ModelCall) -> int:
    a = c.machine.cstring(c.arg(0), c.label).lower()
    b = c.machine.cstring(c.arg(1), c.label).lower()
    return _result32(_compare(a, b))


@model("lstrcmpA", families=("kernel32",))
def _lstrcmp(c: ModelCall) -> int:
    return _result32(_compare(c.machine.cstring(c.arg(0), c.label), c.machine.cstring(c.arg(1), c.label)))


@model("strcpy", families=BOTH)
def _strcpy(c: ModelCall) -> int:
    dst = c.arg(0)
    c.machine.write(dst, c.machine.cstring(c.arg(1), c.label) + b"\0", c.label)
    return dst


@model("strncpy", families=BOTH)
def _strncpy(c: ModelCall) -> int:
    dst, limit = c.arg(0), c.arg(2)
    if limit:
        text = _bounded(c, c.arg(1), limit)
        c.machine.write(dst, text + bytes(limit - len(text)), c.label)
    return dst


@model("strcat", families=BOTH)
def _strcat(c: ModelCall) -> int:
    dst = c.arg(0)
    end = dst + len(c.machine.cstring(dst, c.label))
    c.machine.write(end, c.machine.cstring(c.arg(1), c.label) + b"\0", c.label)
    return dst


@model("strchr", "strrchr", families=BOTH)
def _strchr(c: ModelCall) -> int:
    """The first (strchr) or last (strrchr) place of a byte in a string, its terminator included."""
    start, value = c.arg(0), bytes([c.arg(1) & 0xFF])
    text = c.machine.cstring(start, c.label) + b"\0"
    index = text.rfind(value) if c.stub.name == "strrchr" else text.find(value)
    return start + index if index >= 0 else 0


@model("strstr", families=BOTH)
def _strstr(c: ModelCall) -> int:
    start = c.arg(0)
    index = c.machine.cstring(start, c.label).find(c.machine.cstring(c.arg(1), c.label))
    return start + index if index >= 0 else 0


@model("tolower", families=BOTH)
def _tolower(c: ModelCall) -> int:
    value = c.arg32(0)
    return value + 32 if 0x41 <= value <= 0x5A else value


@model("toupper", families=BOTH)
def _toupper(c: ModelCall) -> int:
    value = c.arg32(0)
    return value - 32 if 0x61 <= value <= 0x7A else value


def _ctype(test: Callable[[int], bool]) -> Callable[[ModelCall], int]:
    def run(c: ModelCall) -> int:
        value = c.arg32(0)
        return 1 if value < 128 and test(value) else 0

    return run


for _name, _test in {
    "isdigit": lambda v: 0x30 <= v <= 0x39,
    "isspace": lambda v: v in (9, 10, 11, 12, 13, 32),
    "isalpha": lambda v: chr(v).isalpha(),
    "isalnum": lambda v: chr(v).isalnum(),
    "isupper": lambda v: 0x41 <= v <= 0x5A,
    "islower": lambda v: 0x61 <= v <= 0x7A,
    "isxdigit": lambda v: chr(v) in "0123456789abcdefABCDEF",
    "isprint": lambda v: 0x20 <= v < 0x7F,
}.items():
    model(_name, families=BOTH)(_ctype(_test))


@model("abs", "labs", families=BOTH)
def _abs(c: ModelCall) -> int:
    return _result32(abs(c.sarg32(0)))


@model("llabs", "_abs64", families=BOTH)
def _llabs(c: ModelCall) -> int:
    return abs(c.sarg(0)) & MASK64


# ── the heap ──────────────────────────────────────────────────────────────


def _set_errno(c: ModelCall, value: int) -> None:
    c.machine.poke(c.machine.crt_data + ERRNO, value.to_bytes(4, "little"))


def allocate(c: ModelCall, size: int, zero: bool = False) -> int:
    """A heap block for a model; 0 (and errno ENOMEM) when the heap is exhausted."""
    va = c.machine.heap.allocate(size)
    if va is None:
        _set_errno(c, ENOMEM)
        return 0
    if zero and size:
        c.machine.poke(va, bytes(size))
    return va


def release(c: ModelCall, va: int) -> None:
    if va and not c.machine.heap.release(va):
        caller = c.machine.describe(c.return_address)
        raise EmulationError(f"{c.label}({va:#x}) from {caller}: not a live block of the emulated heap")


def reallocate(c: ModelCall, va: int, size: int) -> int:
    if not va:
        return allocate(c, size)
    old = c.machine.heap.block_size(va)
    if old is None:
        caller = c.machine.describe(c.return_address)
        raise EmulationError(f"{c.label}({va:#x}) from {caller}: not a live block of the emulated heap")
    new = allocate(c, size)
    if new:
        keep = min(old, size)
        if keep:
            c.machine.poke(new, c.machine.read(va, keep, c.label))
        c.machine.heap.release(va)
    return new


@model("malloc")
def _malloc(c: ModelCall) -> int:
    return allocate(c, c.arg(0))


@model("calloc")
def _calloc(c: ModelCall) -> int:
    count, size = c.arg(0), c.arg(1)
    if count and size > MASK64 // count:
        _set_errno(c, ENOMEM)
        return 0
    return allocate(c, count * size, zero=True)


@model("free")
def _free(c: ModelCall) -> None:
    release(c, c.arg(0))


@model("realloc")
def _realloc(c: ModelCall) -> int:
    va, size = c.arg(0), c.arg(1)
    if va and not size:
        release(c, va)
        return 0
    return reallocate(c, va, size)


@model("_recalloc")
def _recalloc(c: ModelCall) -> int:
    va, count, size = c.arg(0), c.arg(1), c.arg(2)
    old = c.machine.heap.block_size(va) if va else 0
    new = reallocate(c, va, count * size)
    if new and old is not None and count * size > old:
        c.machine.poke(new + old, bytes(count * size - old))
    return new


@model("_msize")
def _msize(c: ModelCall) -> int:
    size = c.machine.heap.block_size(c.arg(0))
    return MASK64 if size is None else size


@model("_aligned_malloc")
def _aligned_malloc(c: ModelCall) -> int:
    size, alignment = c.arg(0), max(c.arg(1), 16)
    if alignment & (alignment - 1):
        _set_errno(c, EINVAL)
        return 0
    raw = allocate(c, size + alignment + 8)
    if not raw:
        return 0
    aligned = (raw + 8 + alignment - 1) & ~(alignment - 1)
    c.machine.poke(aligned - 8, raw.to_bytes(8, "little"))
    return aligned


@model("_aligned_free")
def _aligned_free(c: ModelCall) -> None:
    if c.arg(0):
        release(c, c.machine.u64(c.arg(0) - 8, c.label))


# ── errno, locale, startup ────────────────────────────────────────────────


@model("_errno")
def _errno(c: ModelCall) -> int:
    return c.machine.crt_data + ERRNO


@model("__doserrno")
def _doserrno(c: ModelCall) -> int:
    return c.machine.crt_data + DOSERRNO


@model("___mb_cur_max_func")
def _mb_cur_max(c: ModelCall) -> int:
    return 1


@model("___lc_codepage_func")
def _lc_codepage(c: ModelCall) -> int:
    return 0  # the "C" locale


@model("localeconv")
def _localeconv(c: ModelCall) -> int:
    data = c.machine.crt_data
    strings = data + LCONV_STRINGS
    c.machine.poke(strings, b".\0\0")
    # decimal_point, then the other char* fields pointing at ""; then the char fields (CHAR_MAX)
    c.machine.poke(data + LCONV, struct.pack("<QQQ", strings, strings + 1, strings + 1)
                   + struct.pack("<7Q", *([strings + 1] * 7)) + b"\x7f" * 8)
    return data + LCONV


FILETIME_UNIX_EPOCH = 116444736000000000  # 1970-01-01 in 100 ns units since 1601


@model("_time64", "_time32", "time")
def _time(c: ModelCall) -> int:
    # the machine's deterministic clock (GetSystemTimeAsFileTime's), so both of verify's processes agree
    c.machine.clock_ms += 1
    seconds = (c.machine.guest_time + c.machine.clock_ms * 10_000 - FILETIME_UNIX_EPOCH) // 10_000_000
    if c.arg(0):
        c.machine.write(c.arg(0), seconds.to_bytes(4 if c.stub.name == "_time32" else 8, "little"), c.label)
    return seconds


@model("getenv")
def _getenv(c: ModelCall) -> int:
    return 0  # the emulated process has no environment


@model("strerror")
def _strerror(c: ModelCall) -> int:
    text = f"error {c.sarg32(0)}".encode() + b"\0"
    c.machine.poke(c.machine.crt_data + STRERROR, text)
    return c.machine.crt_data + STRERROR


@model("_lock", "_unlock", "_lock_locales", "_unlock_locales", "_cexit", "_c_exit", "__set_app_type",
       "_set_app_type", "__setusermatherr", "_fpreset", "_configure_narrow_argv", "_set_invalid_parameter_handler",
       "_setmode")
def _nothing(c: ModelCall) -> int:
    return 0


def _ends_process(what: str) -> Callable[[ModelCall], None]:
    def run(c: ModelCall) -> None:
        caller = c.machine.describe(c.return_address)
        detail = f"({c.sarg32(0)})" if what != "abort" else "()"
        raise EmulationError(f"{what}{detail} called from {caller}: the process would end here")

    return run


for _name in ("abort", "exit", "_exit", "_amsg_exit", "quick_exit", "_Exit"):
    model(_name)(_ends_process(_name))


@model("_assert", "_wassert")
def _assert(c: ModelCall) -> None:
    if c.stub.name == "_assert":
        expression = c.machine.cstring(c.arg(0), c.label).decode("utf-8", "replace")
        source = c.machine.cstring(c.arg(1), c.label).decode("utf-8", "replace")
    else:
        expression, source = c.machine.wstring(c.arg(0), c.label), c.machine.wstring(c.arg(1), c.label)
    raise EmulationError(f"assertion failed: {expression} ({source}:{c.arg32(2)})")


# Exit-time callbacks are accepted and never run: the emulated process does not exit.
@model("atexit", "_crt_atexit", "_crt_at_quick_exit", "_register_onexit_function", "_initialize_onexit_table",
       "_execute_onexit_table")
def _atexit(c: ModelCall) -> int:
    return 0


@model("_onexit", "__dllonexit")
def _onexit(c: ModelCall) -> int:
    return c.arg(0)  # success is the function itself


# _initterm(begin, end): call every non-null function pointer in [begin, end). _initterm_e: the same for
# int (*)(void), stopping at the first non-zero result, which it returns.
_INITTERM = """
    push rsi
    push rdi
    sub rsp, 0x28
    mov rsi, rcx
    mov rdi, rdx
again:
    cmp rsi, rdi
    jae finish
    mov rax, qword ptr [rsi]
    test rax, rax
    je skip
    call rax
{after_call}skip:
    add rsi, 8
    jmp again
finish:
{at_finish}    add rsp, 0x28
    pop rdi
    pop rsi
    ret
"""
code_model("_initterm", _INITTERM.format(after_call="", at_finish=""))
code_model("_initterm_e", _INITTERM.format(after_call="    test eax, eax\n    jne done\n",
                                            at_finish="    xor eax, eax\ndone:\n"))
