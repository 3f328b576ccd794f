"""CPU faults of the emulated process as Windows sees them: the NTSTATUS each raises in the guest, and the
emulator's own one-line description, raised when no guest handler takes it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from unicorn import (
    UC_ERR_INSN_INVALID,
    UC_MEM_FETCH_PROT,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_READ_PROT,
    UC_MEM_READ_UNMAPPED,
    UC_MEM_WRITE_PROT,
    UC_MEM_WRITE_UNMAPPED,
    UcError,
)

from ..errors import EmulationError, EmulationFaultError

__all__ = ["STATUS_ACCESS_VIOLATION", "STATUS_ILLEGAL_INSTRUCTION", "CpuException", "cpu_exception",
           "interrupt_exception"]

#: a VA -> "module+offset" text; a VA -> its instruction's text
Describe = Callable[[int], str]

_ACCESS = {
    UC_MEM_READ_UNMAPPED: ("read", "unmapped"),
    UC_MEM_WRITE_UNMAPPED: ("write", "unmapped"),
    UC_MEM_FETCH_UNMAPPED: ("execution", "unmapped"),
    UC_MEM_READ_PROT: ("read", "protected"),
    UC_MEM_WRITE_PROT: ("write", "protected"),
    UC_MEM_FETCH_PROT: ("execution", "protected"),
}
_INTERRUPTS = {0: "integer division by zero (#DE)", 1: "debug trap (#DB)", 3: "breakpoint (int3)",
               4: "overflow (#OF)", 5: "bound range exceeded (#BR)", 6: "invalid opcode (#UD)",
               13: "general protection fault (#GP)", 14: "page fault (#PF)", 0x29: "__fastfail (int 0x29)"}


STATUS_ACCESS_VIOLATION = 0xC0000005
STATUS_ILLEGAL_INSTRUCTION = 0xC000001D
_INTERRUPT_STATUS = {0: 0xC0000094, 3: 0x80000003, 4: 0xC0000095, 6: STATUS_ILLEGAL_INSTRUCTION,
                     13: 0xC0000096}  # #DE, int3, #OF, #UD, #GP (privileged instruction)


@dataclass(frozen=True)
class CpuException:
    status: int | None  # the NTSTATUS it raises in the guest; None: not an exception Windows would dispatch
    parameters: list[int]
    rip: int
    error: EmulationError  # raised when no handler takes it


def interrupt_exception(number: int, rip: int, describe: Describe, instruction_at: Describe) -> CpuException:
    """The exception a CPU interrupt stands for (status None: one Windows would not dispatch)."""
    if number == 3:
        rip -= 1  # the CPU reports int3 after the instruction; Windows reports the instruction
    what = _INTERRUPTS.get(number, f"CPU exception {number}")
    instruction = instruction_at(rip)
    error = EmulationFaultError(f"{what} at {describe(rip)}: {instruction}", rip=rip, instruction=instruction)
    return CpuException(_INTERRUPT_STATUS.get(number), [], rip, error)


def cpu_exception(exc: UcError, fault: tuple[int, int, int, int] | None, rip: int, describe: Describe,
                  instruction_at: Describe) -> CpuException:
    """The exception a failed emu_start stands for; ``fault`` is what the invalid-memory hook saw, if anything."""
    if fault is not None:
        access, address, size, rip = fault
        kind, state = _ACCESS.get(access, ("access", "invalid"))
        parameters = [{"read": 0, "write": 1, "execution": 8}.get(kind, 0), address]
        if kind == "execution":
            error = EmulationFaultError(f"execution of {state} memory at {address:#x}", rip=rip, va=address)
        else:
            instruction = instruction_at(rip)
            error = EmulationFaultError(
                f"{kind} of {size} bytes at {address:#x} ({state}) by the instruction at "
                f"{describe(rip)}: {instruction}", rip=rip, va=address, instruction=instruction)
        return CpuException(STATUS_ACCESS_VIOLATION, parameters, rip, error)
    instruction = instruction_at(rip)
    if exc.errno == UC_ERR_INSN_INVALID:
        error = EmulationFaultError(f"invalid instruction at {describe(rip)}: {instruction}", rip=rip,
                                    instruction=instruction)
        return CpuException(STATUS_ILLEGAL_INSTRUCTION, [], rip, error)
    error = EmulationFaultError(f"CPU stopped at {describe(rip)} ({exc}): {instruction}", rip=rip,
                                instruction=instruction)
    return CpuException(None, [], rip, error)

