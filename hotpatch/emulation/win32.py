"""Models of kernel32 and ntdll: process and thread identity, time, locks, TLS, memory, modules.

The emulated process has one thread and nothing runs behind its back, so
locks are no-ops and waits succeed at once; time is a deterministic virtual
clock, so two runs of the same calls see the same values. Module functions
(LoadLibrary, GetModuleHandle, GetProcAddress) answer from the modules the
emulator has mapped and the model DLLs it knows: a DLL it knows nothing of
is "not found" (ERROR_MOD_NOT_FOUND), not loaded from disk.
"""

from __future__ import annotations

import struct
import zlib

from ..x86 import MASK64
from .addresses import TEB_TLS_SLOTS
from .loader import resolve_import
from .machine import ModelCall
from .models import family_of, model
from .space import GRANULE, USER_MAX, USER_MIN
from .stdio import emit

__all__: list[str] = []

K32 = ("kernel32",)
BOTH = ("kernel32", "ntdll")

ERROR_INVALID_HANDLE = 6
ERROR_INVALID_PARAMETER = 87
ERROR_INSUFFICIENT_BUFFER = 122
ERROR_MOD_NOT_FOUND = 126
ERROR_PROC_NOT_FOUND = 127
ERROR_ENVVAR_NOT_FOUND = 203
TLS_SLOTS = 64
STD_HANDLES = {0xFFFFFFF6: 0x10, 0xFFFFFFF5: 0x14, 0xFFFFFFF4: 0x18}  # STD_INPUT/OUTPUT/ERROR_HANDLE


# ── identity, errors, time ────────────────────────────────────────────────


@model("GetLastError", families=K32)
@model("RtlGetLastWin32Error", families=("ntdll",))
def _get_last_error(c: ModelCall) -> int:
    return c.machine.last_error()


@model("SetLastError", families=K32)
@model("RtlSetLastWin32Error", families=("ntdll",))
def _set_last_error(c: ModelCall) -> None:
    c.machine.set_last_error(c.arg32(0))


@model("GetCurrentProcessId", families=K32)
def _pid(c: ModelCall) -> int:
    return c.machine.guest_pid


@model("GetCurrentThreadId", families=K32)
def _tid(c: ModelCall) -> int:
    return c.machine.thread_id


@model("GetCurrentProcess", families=K32)
def _current_process(c: ModelCall) -> int:
    return MASK64  # (HANDLE)-1


@model("GetCurrentThread", families=K32)
def _current_thread(c: ModelCall) -> int:
    return MASK64 - 1  # (HANDLE)-2


def _tick(c: ModelCall) -> int:
    c.machine.clock_ms += 1
    return c.machine.clock_ms


@model("GetTickCount", families=K32)
def _get_tick_count(c: ModelCall) -> int:
    return _tick(c) & 0xFFFFFFFF


@model("GetTickCount64", families=K32)
def _get_tick_count64(c: ModelCall) -> int:
    return _tick(c)


@model("QueryPerformanceCounter", families=K32)
@model("RtlQueryPerformanceCounter", families=("ntdll",))
def _qpc(c: ModelCall) -> int:
    c.machine.put_u64(c.arg(0), _tick(c) * 10_000, c.label)  # 10 MHz
    return 1


@model("QueryPerformanceFrequency", families=K32)
@model("RtlQueryPerformanceFrequency", families=("ntdll",))
def _qpf(c: ModelCall) -> int:
    c.machine.put_u64(c.arg(0), 10_000_000, c.label)
    return 1


@model("GetSystemTimeAsFileTime", "GetSystemTimePreciseAsFileTime", families=K32)
def _system_time(c: ModelCall) -> None:
    c.machine.put_u64(c.arg(0), c.machine.guest_time + _tick(c) * 10_000, c.label)


@model("Sleep", "SleepEx", "SwitchToThread", families=K32)
def _sleep(c: ModelCall) -> int:
    c.machine.clock_ms += c.arg32(0) if c.stub.name != "SwitchToThread" else 0
    return 0


@model("IsDebuggerPresent", families=K32)
def _is_debugger_present(c: ModelCall) -> int:
    return 0


@model("IsProcessorFeaturePresent", families=K32)
def _processor_feature(c: ModelCall) -> int:
    # cmpxchg16b, MMX, SSE, SSE2, RDTSC, NX, SSE3, cmpxchg128, fastfail (int 0x29 stops the emulator)
    return 1 if c.arg32(0) in (2, 3, 6, 8, 10, 12, 13, 14, 23) else 0


@model("GetSystemInfo", "GetNativeSystemInfo", families=K32)
def _system_info(c: ModelCall) -> None:
    info = struct.pack("<HHIQQQIIIHH", 9, 0, 0x1000, USER_MIN, USER_MAX, 1, 1, 8664, GRANULE, 6, 0)
    c.machine.write(c.arg(0), info, c.label)


@model("EncodePointer", "DecodePointer", "EncodeSystemPointer", "DecodeSystemPointer", families=K32)
@model("RtlEncodePointer", "RtlDecodePointer", families=("ntdll",))
def _identity_pointer(c: ModelCall) -> int:
    return c.arg(0)


@model("GetEnvironmentVariableA", "GetEnvironmentVariableW", families=K32)
def _get_environment_variable(c: ModelCall) -> int:
    c.machine.set_last_error(ERROR_ENVVAR_NOT_FOUND)
    return 0


# ── locks, waits and handles: one thread, nothing to wait for ─────────────


@model("InitializeCriticalSection", "EnterCriticalSection", "LeaveCriticalSection", "DeleteCriticalSection",
       "InitializeSRWLock", "AcquireSRWLockExclusive", "AcquireSRWLockShared", "ReleaseSRWLockExclusive",
       "ReleaseSRWLockShared", "InitializeConditionVariable", "WakeConditionVariable",
       "WakeAllConditionVariable", families=K32)
@model("RtlInitializeCriticalSection", "RtlEnterCriticalSection", "RtlLeaveCriticalSection",
       "RtlDeleteCriticalSection", families=("ntdll",))
def _no_op(c: ModelCall) -> int:
    return 0


@model("InitializeCriticalSectionAndSpinCount", "InitializeCriticalSectionEx", "TryEnterCriticalSection",
       "TryAcquireSRWLockExclusive", "TryAcquireSRWLockShared", "DisableThreadLibraryCalls", "FreeLibrary",
       "CloseHandle", "SetEvent", "ResetEvent", "ReleaseMutex", families=K32)
def _true(c: ModelCall) -> int:
    return 1


@model("CreateSemaphoreA", "CreateSemaphoreW", "CreateSemaphoreExA", "CreateSemaphoreExW", "CreateEventA",
       "CreateEventW", "CreateEventExA", "CreateEventExW", "CreateMutexA", "CreateMutexW", families=K32)
def _new_handle(c: ModelCall) -> int:
    return c.machine.new_handle()


@model("ReleaseSemaphore", families=K32)
def _release_semaphore(c: ModelCall) -> int:
    if c.arg(2):
        c.machine.put_u32(c.arg(2), 0, c.label)
    return 1


@model("WaitForSingleObject", "WaitForSingleObjectEx", "WaitForMultipleObjects", families=K32)
def _wait(c: ModelCall) -> int:
    return 0  # WAIT_OBJECT_0: with one thread, what it waits for is never held by anyone else


# ── TLS and FLS ───────────────────────────────────────────────────────────


def _slots(c: ModelCall, key: str) -> set[int]:
    used = c.machine.state.setdefault(key, set())
    assert isinstance(used, set)
    return used


@model("TlsAlloc", families=K32)
def _tls_alloc(c: ModelCall) -> int:
    used = _slots(c, "tls")
    for index in range(TLS_SLOTS):
        if index not in used:
            used.add(index)
            c.machine.poke(c.machine.teb + TEB_TLS_SLOTS + 8 * index, bytes(8))
            return index
    return 0xFFFFFFFF  # TLS_OUT_OF_INDEXES


@model("TlsFree", families=K32)
def _tls_free(c: ModelCall) -> int:
    used = _slots(c, "tls")
    if c.arg32(0) not in used:
        c.machine.set_last_error(ERROR_INVALID_PARAMETER)
        return 0
    used.discard(c.arg32(0))
    return 1


def _tls_slot_va(c: ModelCall) -> int | None:
    """Where the TEB keeps the slot the first argument names; None (last error set) for a bad index."""
    index = c.arg32(0)
    if index >= TLS_SLOTS:
        c.machine.set_last_error(ERROR_INVALID_PARAMETER)
        return None
    return c.machine.teb + TEB_TLS_SLOTS + 8 * index


@model("TlsGetValue", families=K32)
def _tls_get(c: ModelCall) -> int:
    va = _tls_slot_va(c)
    if va is None:
        return 0
    c.machine.set_last_error(0)
    return c.machine.u64(va)


@model("TlsSetValue", families=K32)
def _tls_set(c: ModelCall) -> int:
    va = _tls_slot_va(c)
    if va is None:
        return 0
    c.machine.poke(va, c.arg(1).to_bytes(8, "little"))
    return 1


def _fls(c: ModelCall) -> dict[int, int]:
    values = c.machine.state.setdefault("fls", {})
    assert isinstance(values, dict)
    return values


@model("FlsAlloc", families=K32)
def _fls_alloc(c: ModelCall) -> int:
    values = _fls(c)
    index = next(i for i in range(len(values) + 1) if i not in values)
    values[index] = 0
    return index


@model("FlsGetValue", families=K32)
def _fls_get(c: ModelCall) -> int:
    return _fls(c).get(c.arg32(0), 0)


@model("FlsSetValue", families=K32)
def _fls_set(c: ModelCall) -> int:
    _fls(c)[c.arg32(0)] = c.arg(1)
    return 1


@model("FlsFree", families=K32)
def _fls_free(c: ModelCall) -> int:
    return 1 if _fls(c).pop(c.arg32(0), None) is not None else 0


# ── strings ───────────────────────────────────────────────────────────────


@model("lstrlenA", families=K32)
def _lstrlen_a(c: ModelCall) -> int:
    return len(c.machine.cstring(c.arg(0), c.label)) if c.arg(0) else 0


@model("lstrlenW", families=K32)
def _lstrlen_w(c: ModelCall) -> int:
    return len(c.machine.wstring(c.arg(0), c.label).encode("utf-16-le")) // 2 if c.arg(0) else 0


def _codec(code_page: int) -> str:
    return "utf-8" if code_page == 65001 else "latin-1"


@model("MultiByteToWideChar", families=K32)
def _multi_byte_to_wide_char(c: ModelCall) -> int:
    source, length, target, capacity = c.arg(2), c.sarg32(3), c.arg(4), c.arg32(5)
    raw = c.machine.cstring(source, c.label) + b"\0" if length < 0 else c.machine.read(source, length, c.label)
    encoded = raw.decode(_codec(c.arg32(0)), "replace").encode("utf-16-le")
    units = len(encoded) // 2
    if capacity == 0:
        return units
    if capacity < units:
        c.machine.set_last_error(ERROR_INSUFFICIENT_BUFFER)
        return 0
    c.machine.write(target, encoded, c.label)
    return units


@model("WideCharToMultiByte", families=K32)
def _wide_char_to_multi_byte(c: ModelCall) -> int:
    source, length, target, capacity = c.arg(2), c.sarg32(3), c.arg(4), c.arg32(5)
    if length < 0:
        text = c.machine.wstring(source, c.label) + "\0"
    else:
        text = c.machine.read(source, 2 * length, c.label).decode("utf-16-le", "replace")
    encoded = text.encode(_codec(c.arg32(0)), "replace")
    if capacity == 0:
        return len(encoded)
    if capacity < len(encoded):
        c.machine.set_last_error(ERROR_INSUFFICIENT_BUFFER)
        return 0
    c.machine.write(target, encoded, c.label)
    return len(encoded)


# ── output ────────────────────────────────────────────────────────────────


@model("OutputDebugStringA", families=K32)
def _output_debug_string_a(c: ModelCall) -> None:
    emit(c, c.machine.cstring(c.arg(0), c.label))


@model("OutputDebugStringW", families=K32)
def _output_debug_string_w(c: ModelCall) -> None:
    emit(c, c.machine.wstring(c.arg(0), c.label).encode())


@model("GetStdHandle", families=K32)
def _get_std_handle(c: ModelCall) -> int:
    return STD_HANDLES.get(c.arg32(0), MASK64)


@model("WriteFile", "WriteConsoleA", families=K32)
def _write_file(c: ModelCall) -> int:
    handle, buffer, size, written = c.arg(0), c.arg(1), c.arg32(2), c.arg(3)
    if handle not in (STD_HANDLES[0xFFFFFFF5], STD_HANDLES[0xFFFFFFF4]):
        c.machine.set_last_error(ERROR_INVALID_HANDLE)
        return 0
    emit(c, c.machine.read(buffer, size, c.label))
    if written:
        c.machine.put_u32(written, size, c.label)
    return 1


# ── modules ───────────────────────────────────────────────────────────────


def _name_argument(c: ModelCall, index: int) -> str:
    if c.stub.name.endswith("W"):
        return c.machine.wstring(c.arg(index), c.label)
    return c.machine.cstring(c.arg(index), c.label).decode("latin-1")


def _module_base(c: ModelCall, name: str, load: bool) -> int:
    base_name = name.replace("/", "\\").rsplit("\\", 1)[-1]
    module = c.machine.module_named(base_name)
    if module is None and load and family_of(base_name if "." in base_name else base_name + ".dll"):
        module = c.machine.model_dll(base_name if "." in base_name else base_name + ".dll")
    if module is None:
        c.machine.set_last_error(ERROR_MOD_NOT_FOUND)
        return 0
    return module.base


@model("LoadLibraryA", "LoadLibraryW", "LoadLibraryExA", "LoadLibraryExW", families=K32)
def _load_library(c: ModelCall) -> int:
    return _module_base(c, _name_argument(c, 0), load=True)


@model("GetModuleHandleA", "GetModuleHandleW", families=K32)
def _get_module_handle(c: ModelCall) -> int:
    if not c.arg(0):
        images = c.machine.images
        return images[0].base if images else 0
    return _module_base(c, _name_argument(c, 0), load=False)


@model("GetModuleHandleExA", "GetModuleHandleExW", families=K32)
def _get_module_handle_ex(c: ModelCall) -> int:
    flags, out = c.arg32(0), c.arg(2)
    if flags & 4:  # GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS
        module = c.machine.module_at(c.arg(1))
        base = module.base if module else 0
    elif not c.arg(1):
        base = c.machine.images[0].base if c.machine.images else 0
    else:
        base = _module_base(c, _name_argument(c, 1), load=False)
    if out:
        c.machine.put_u64(out, base, c.label)
    if not base:
        c.machine.set_last_error(ERROR_MOD_NOT_FOUND)
    return 1 if base else 0


@model("GetModuleFileNameA", "GetModuleFileNameW", families=K32)
def _get_module_file_name(c: ModelCall) -> int:
    handle, buffer, capacity = c.arg(0), c.arg(1), c.arg32(2)
    module = c.machine.module_at(handle) if handle else (c.machine.images[0] if c.machine.images else None)
    if module is None:
        c.machine.set_last_error(ERROR_MOD_NOT_FOUND)
        return 0
    path = "C:\\emulated\\" + module.name
    wide = c.stub.name.endswith("W")
    count = min(len(path), capacity - 1) if capacity else 0
    if capacity:
        text = path[:count] + "\0"
        c.machine.write(buffer, text.encode("utf-16-le") if wide else text.encode("latin-1"), c.label)
    if count < len(path):
        c.machine.set_last_error(ERROR_INSUFFICIENT_BUFFER)
        return capacity
    return count


@model("GetProcAddress", families=K32)
def _get_proc_address(c: ModelCall) -> int:
    module = c.machine.module_at(c.arg(0))
    name_or_ordinal = c.arg(1)
    if module is None or module.base != c.arg(0):
        c.machine.set_last_error(ERROR_INVALID_HANDLE)
        return 0
    if module.model is not None:
        if name_or_ordinal >> 16:
            name = c.machine.cstring(name_or_ordinal, c.label).decode("latin-1")
            # only what the model DLL exports: code that checks for NULL then takes its fallback
            if name in module.model.exports:
                return module.base + module.model.exports[name]
    elif module.image is not None:
        for export in module.image.exports:
            if (name_or_ordinal >> 16 and export.name
                    and export.name == c.machine.cstring(name_or_ordinal, c.label).decode("latin-1")) or (
                    not name_or_ordinal >> 16 and export.ordinal == name_or_ordinal):
                if export.forwarder:
                    return resolve_import(c.machine, module.name, module.name, export.name, export.ordinal)
                return module.base + export.rva
    c.machine.set_last_error(ERROR_PROC_NOT_FOUND)
    return 0


# ── ntdll odds and ends ───────────────────────────────────────────────────


@model("RtlComputeCrc32", families=("ntdll",))
def _rtl_compute_crc32(c: ModelCall) -> int:
    data = c.machine.read(c.arg(1), c.arg32(2), c.label) if c.arg32(2) else b""
    return zlib.crc32(data, c.arg32(0))


@model("_InterlockedIncrement", "InterlockedIncrement", families=K32)
def _interlocked_increment(c: ModelCall) -> int:
    value = (c.machine.u32(c.arg(0), c.label) + 1) & 0xFFFFFFFF
    c.machine.put_u32(c.arg(0), value, c.label)
    return value


@model("_InterlockedDecrement", "InterlockedDecrement", families=K32)
def _interlocked_decrement(c: ModelCall) -> int:
    value = (c.machine.u32(c.arg(0), c.label) - 1) & 0xFFFFFFFF
    c.machine.put_u32(c.arg(0), value, c.label)
    return value


@model("InterlockedExchange", families=K32)
def _interlocked_exchange(c: ModelCall) -> int:
    old = c.machine.u32(c.arg(0), c.label)
    c.machine.put_u32(c.arg(0), c.arg32(1), c.label)
    return old


@model("InterlockedCompareExchange", families=K32)
def _interlocked_compare_exchange(c: ModelCall) -> int:
    old = c.machine.u32(c.arg(0), c.label)
    if old == c.arg32(2):
        c.machine.put_u32(c.arg(0), c.arg32(1), c.label)
    return old


@model("InitializeSListHead", families=K32)
@model("RtlInitializeSListHead", families=("ntdll",))
def _initialize_slist_head(c: ModelCall) -> None:
    c.machine.write(c.arg(0), bytes(16), c.label)
