"""One call of a model: its arguments by the Windows x64 convention, read from the machine that runs it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn import x86_const as x86

from .addresses import ARGUMENT_REGISTERS
from .unwind import Context

if TYPE_CHECKING:
    from .machine import Machine, Stub

__all__ = ["ModelCall"]


class ModelCall:
    """One call of a model: its arguments by the Windows x64 convention, and the machine."""

    def __init__(self, machine: Machine, stub: Stub) -> None:
        self.machine = machine
        self.stub = stub
        self.rsp = machine.reg(x86.UC_X86_REG_RSP)

    def arg(self, index: int) -> int:
        """Argument ``index`` as an unsigned 64-bit value (rcx, rdx, r8, r9, then the stack)."""
        if index < 4:
            return self.machine.reg(ARGUMENT_REGISTERS[index])
        return self.machine.u64(self.rsp + 8 + 8 * index)

    def sarg(self, index: int) -> int:
        value = self.arg(index)
        return value - (1 << 64) if value >> 63 else value

    def arg32(self, index: int) -> int:
        return self.arg(index) & 0xFFFFFFFF

    def sarg32(self, index: int) -> int:
        value = self.arg32(index)
        return value - (1 << 32) if value >> 31 else value

    @property
    def return_address(self) -> int:
        return self.machine.u64(self.rsp)

    def caller_context(self) -> Context:
        """The registers as the caller will see them when this function returns (before rax is set)."""
        ctx = self.machine.cpu_context()
        ctx.rip = self.return_address
        ctx.rsp = self.rsp + 8
        return ctx

    @property
    def label(self) -> str:
        return f"{self.stub.dll}!{self.stub.name}"
