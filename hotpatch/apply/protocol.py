"""The agent's wire protocol: frames, opcodes, statuses, payload codecs, errors.

Everything here is pure data handling (no processes), so it can be tested and
reused on its own; docs/AGENT.md is the reference it implements. A frame is a
12-byte little-endian header followed by the payload::

    request: u32 payload_length, u16 opcode, u16 version, u32 request_id
    reply:   u32 payload_length, u16 opcode, u16 status,  u32 request_id

A reply with a non-zero status carries the error payload decoded by
``ErrorInfo.decode`` and is turned into a ``BackendError`` subclass by
``error_for``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ..errors import (
    AgentProtocolError,
    BackendError,
    BusyError,
    BytesMismatchError,
    ProcessGoneError,
    RemoteTimeoutError,
    Win32Error,
)

__all__ = [
    "HEADER",
    "MAX_FRAME",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "ErrorInfo",
    "Opcode",
    "PayloadReader",
    "Reply",
    "Status",
    "encode_frame",
    "error_for",
]

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<IHHI")
MAX_FRAME = 64 * 1024 * 1024
MAX_PAYLOAD = MAX_FRAME - HEADER.size


class Opcode(enum.IntEnum):
    HELLO = 0x01
    LIST_PROCESSES = 0x02
    LIST_MODULES = 0x03
    PROCESS_INFO = 0x04
    OPEN = 0x05
    CLOSE = 0x06
    READ = 0x07
    WRITE = 0x08
    QUERY = 0x09
    ALLOC_NEAR = 0x0A
    FREE = 0x0B
    PROTECT = 0x0C
    FLUSH = 0x0D
    THREADS = 0x0E
    THREAD_CONTEXTS = 0x0F
    REMOTE_CALL = 0x10
    COMMIT = 0x11
    FLOOR = 0x12


class Status(enum.IntEnum):
    OK = 0
    BAD_FRAME = 1
    BAD_VERSION = 2
    UNKNOWN_OPCODE = 3
    BAD_PAYLOAD = 4
    WIN32 = 5
    NO_PROCESS = 6
    BAD_HANDLE = 7
    BUSY = 8
    MISMATCH = 9
    TIMEOUT = 10
    NO_SPACE = 11
    LIMIT = 12
    ROLLBACK_FAILED = 13


# Names for the GetLastError() codes the agent's calls commonly return.
WIN32_NAMES = {
    5: "ERROR_ACCESS_DENIED",
    6: "ERROR_INVALID_HANDLE",
    8: "ERROR_NOT_ENOUGH_MEMORY",
    87: "ERROR_INVALID_PARAMETER",
    299: "ERROR_PARTIAL_COPY",
    487: "ERROR_INVALID_ADDRESS",
    998: "ERROR_NOACCESS",
}


def encode_frame(opcode: int, payload: bytes, request_id: int, version: int = PROTOCOL_VERSION) -> bytes:
    """One request frame: header then payload."""
    return HEADER.pack(len(payload), opcode, version, request_id) + payload


class PayloadReader:
    """Reads little-endian fields from a reply payload; a short payload is a protocol error."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise AgentProtocolError(f"agent reply truncated: wanted {size} bytes at offset {self.pos}")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "little")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "little")

    def string(self) -> str:
        return self.take(self.u16()).decode("utf-8", "replace")

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise AgentProtocolError(f"agent reply has {len(self.data) - self.pos} unexpected trailing bytes")


@dataclass(frozen=True)
class ErrorInfo:
    """The payload of a failed reply."""

    win32_error: int
    thread_id: int
    va: int
    call: str
    message: str
    data: bytes

    @classmethod
    def decode(cls, payload: bytes) -> ErrorInfo:
        r = PayloadReader(payload)
        win32_error, thread_id, va = r.u32(), r.u32(), r.u64()
        call, message = r.string(), r.string()
        data = r.take(r.u16())
        r.end()
        return cls(win32_error, thread_id, va, call, message, data)


@dataclass(frozen=True)
class Reply:
    """One reply frame as received."""

    opcode: int
    status: int
    request_id: int
    payload: bytes

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    def error(self) -> ErrorInfo:
        return ErrorInfo.decode(self.payload)


def _status_name(status: int) -> str:
    try:
        return Status(status).name
    except ValueError:
        return f"status {status}"


def error_for(reply: Reply, pid: int | None = None) -> BackendError:
    """The exception a failed reply stands for."""
    try:
        info = reply.error()
    except AgentProtocolError as exc:
        return AgentProtocolError(f"agent replied {_status_name(reply.status)} with a malformed error payload: {exc}")
    status = reply.status
    if status == Status.WIN32:
        name = WIN32_NAMES.get(info.win32_error, "")
        code = f"{info.win32_error} ({name})" if name else str(info.win32_error)
        return Win32Error(f"{info.call} failed with error {code}: {info.message}", info.call, info.win32_error)
    if status == Status.NO_PROCESS:
        return ProcessGoneError(info.message, pid)
    if status == Status.BUSY:
        return BusyError(f"busy: {info.message}", info.thread_id, info.va)
    if status == Status.MISMATCH:
        return BytesMismatchError(f"{info.message} (found {info.data.hex()})", info.va, info.data)
    if status == Status.TIMEOUT:
        return RemoteTimeoutError(info.message, info.thread_id)
    if status in (Status.BAD_FRAME, Status.BAD_VERSION, Status.UNKNOWN_OPCODE, Status.BAD_PAYLOAD):
        return AgentProtocolError(f"agent refused the request ({_status_name(status)}): {info.message}")
    detail = f" [{info.call} error {info.win32_error}]" if info.call else ""
    return BackendError(f"agent: {_status_name(status)}: {info.message}{detail}")
