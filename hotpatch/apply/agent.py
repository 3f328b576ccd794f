"""Driving hotpatch-agent.exe: the client process and the backend for one target.

``AgentClient`` starts the agent (directly on Windows, under Wine elsewhere,
in the same WINEPREFIX as the targets), sends framed requests with their own
ids, and waits for each reply with a timeout, watching for the agent's death.
``AgentProcessBackend`` is the ``ProcessBackend`` of one process opened
through a client. Failures arrive as ``BackendError`` subclasses (see
hotpatch.apply.protocol.error_for): a Win32 failure names its call and error
code, a pid that is gone raises ``ProcessGoneError``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import queue
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..errors import AgentProtocolError, BackendError
from ..process.win32mem import Region
from .backend import REL32_REACH, CommitReport, CommitWrite, Module, ProcessBackend, ThreadSnapshot, ThreadState
from .protocol import (
    HEADER,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Opcode,
    PayloadReader,
    Reply,
    encode_frame,
    error_for,
)

__all__ = [
    "AGENT_NAME",
    "AgentClient",
    "AgentHello",
    "AgentProcessBackend",
    "ProcessEntry",
    "ProcessInfo",
    "agent_path",
]

AGENT_NAME = "hotpatch-agent.exe"
DEFAULT_TIMEOUT = 30.0
_REMOTE_CALL_NO_WAIT = 1
_FREEZE_PER_THREAD = 1
# A read larger than this is split, so one reply never nears the frame limit.
_READ_CHUNK = 16 * 1024 * 1024
#: seconds to wait for the exit code and the last stderr of an agent that went away
_ENDED_WAIT = 2.0


def agent_path() -> Path:
    """The agent binary: $HOTPATCH_AGENT, else the one packaged in hotpatch/bin, else build/agent/."""
    override = os.environ.get("HOTPATCH_AGENT")
    if override:
        path = Path(override)
        if not path.is_file():
            raise BackendError(f"HOTPATCH_AGENT names {path}, which does not exist")
        return path
    package = Path(__file__).resolve().parent.parent
    candidates = [package / "bin" / AGENT_NAME, package.parent / "build" / "agent" / AGENT_NAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise BackendError(
        f"{AGENT_NAME} not found (looked in {', '.join(str(c) for c in candidates)}); "
        "build it with `python native/agent/build.py --out build/agent` (needs x86_64-w64-mingw32-gcc) "
        "or set HOTPATCH_AGENT"
    )


@dataclass(frozen=True)
class AgentHello:
    protocol_version: int
    pointer_size: int
    max_frame: int
    agent_pid: int
    debug_privilege: bool
    agent_version: str


@dataclass(frozen=True)
class ProcessEntry:
    pid: int
    parent_pid: int
    threads: int
    name: str


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    start_time: int  # FILETIME: 100 ns units since 1601
    image_path: str


class _EndedSilently(AgentProtocolError):
    """The agent ended before its hello reply without writing anything: Wine did not start it."""


def _commit_report(payload: bytes) -> CommitReport:
    r = PayloadReader(payload)
    pause_ns, total_ns, attempts, threads, flags = r.u64(), r.u64(), r.u32(), r.u32(), r.u32()
    r.end()
    return CommitReport(pause_ns / 1000, total_ns / 1000, attempts, bool(flags & 1), threads, bool(flags & 2))


class AgentClient:
    """One running agent and the request/reply exchange with it."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT):
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._replies: queue.Queue[Reply | BaseException | None] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=50)
        try:
            self._proc = subprocess.Popen(
                list(argv),
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise BackendError(f"cannot start the agent ({argv[0]}): {exc}") from exc
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._stdout_seen = False
        self._killed = False
        threading.Thread(target=self._read_replies, args=(self._proc.stdout,), daemon=True).start()
        self._stderr_reader = threading.Thread(target=self._read_stderr, args=(self._proc.stderr,), daemon=True)
        self._stderr_reader.start()
        try:
            self.hello = self._hello()
        except AgentProtocolError as exc:
            if self._ended_silently():
                self.close()
                raise _EndedSilently(str(exc)) from exc
            raise

    @classmethod
    def start(
        cls, agent: Path | None = None, *, prefix: Path | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> AgentClient:
        """Start the agent: natively on Windows, else under Wine with ``prefix`` (see hotpatch.process.winehost)."""
        agent = Path(agent) if agent is not None else agent_path()
        if sys.platform == "win32":
            return cls([str(agent)], timeout=timeout)
        from ..process import winehost

        argv, env = [*winehost.wine_command(), str(agent)], winehost.wine_env(prefix)
        for attempt in range(1, winehost.START_ATTEMPTS + 1):
            try:
                return cls(argv, env=env, timeout=timeout)
            except _EndedSilently:
                # Wine ended it before it ran (winehost.ended_silently): start it once more. Never an agent
                # that wrote anything: its failure is its own.
                if attempt == winehost.START_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    # -- plumbing ------------------------------------------------------------

    def _read_replies(self, stream: IO[bytes]) -> None:
        try:
            while True:
                header = stream.read(HEADER.size)
                self._stdout_seen = self._stdout_seen or bool(header)
                if len(header) < HEADER.size:
                    break
                length, opcode, status, request_id = HEADER.unpack(header)
                if length > MAX_PAYLOAD:
                    raise AgentProtocolError(f"agent sent a reply of {length} bytes, above the frame limit")
                payload = stream.read(length)
                if len(payload) < length:
                    break
                self._replies.put(Reply(opcode, status, request_id, payload))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            self._replies.put(exc)
        self._replies.put(None)

    def _read_stderr(self, stream: IO[bytes]) -> None:
        for line in stream:
            self._stderr.append(line.decode("utf-8", "replace").rstrip())

    def _ended_silently(self) -> bool:
        """The agent exited (not stopped by us) without writing a byte to stdout or stderr."""
        try:
            self._proc.wait(timeout=_ENDED_WAIT)
        except subprocess.TimeoutExpired:
            return False
        self._stderr_reader.join(timeout=_ENDED_WAIT)
        return not self._killed and not self._stdout_seen and not self._stderr

    def _died(self, what: str) -> AgentProtocolError:
        # the exit code and the last of stderr belong in the message: give them a moment to arrive
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=_ENDED_WAIT)
        self._stderr_reader.join(timeout=_ENDED_WAIT)
        code = self._proc.poll()
        tail = "\n".join(self._stderr)
        state = f"exited with code {code}" if code is not None else "closed its output"
        return AgentProtocolError(f"agent {state} {what}" + (f"; its stderr:\n{tail}" if tail else ""))

    def _wait_reply(self, request_id: int, timeout: float) -> Reply:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._killed = True
                self._proc.kill()
                raise AgentProtocolError(f"agent did not answer request {request_id} within {timeout:g} s; stopped it")
            try:
                item = self._replies.get(timeout=min(left, 0.2))
            except queue.Empty:
                if self._proc.poll() is not None and self._replies.empty():
                    # Give the reader a moment to deliver what the agent wrote before exiting.
                    try:
                        item = self._replies.get(timeout=0.2)
                    except queue.Empty:
                        raise self._died(f"while request {request_id} was pending") from None
                else:
                    continue
            if item is None:
                self._replies.put(None)  # keep the end visible to later callers
                raise self._died(f"while request {request_id} was pending")
            if isinstance(item, BaseException):
                self._replies.put(None)
                raise AgentProtocolError(f"reading the agent's reply failed: {item}") from item
            if item.request_id != request_id:
                raise AgentProtocolError(f"agent answered request {item.request_id}, expected {request_id}")
            return item

    def exchange(self, frame: bytes, request_id: int, timeout: float | None = None) -> Reply:
        """Send raw frame bytes and return the reply to ``request_id`` as it is (errors not raised)."""
        with self._lock:
            stdin = self._proc.stdin
            assert stdin is not None
            try:
                stdin.write(frame)
                stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                raise self._died(f"before request {request_id} was sent") from None
            return self._wait_reply(request_id, self.timeout if timeout is None else timeout)

    def next_request_id(self) -> int:
        return next(self._ids) & 0xFFFFFFFF

    def request(self, opcode: int, payload: bytes = b"", timeout: float | None = None, pid: int | None = None) -> bytes:
        """One request; the reply payload, or the reply's error raised."""
        if len(payload) > MAX_PAYLOAD:
            raise BackendError(f"request of {len(payload)} bytes exceeds the agent's frame limit")
        request_id = self.next_request_id()
        reply = self.exchange(encode_frame(opcode, payload, request_id), request_id, timeout)
        if reply.opcode != opcode:
            raise AgentProtocolError(f"agent answered opcode {reply.opcode:#x} to {opcode:#x}")
        if not reply.ok:
            raise error_for(reply, pid)
        return reply.payload

    def close(self) -> None:
        """Close the agent's stdin (it exits when it sees the end) and reap it."""
        if self._proc.poll() is None:
            try:
                if self._proc.stdin:
                    self._proc.stdin.close()
            except OSError:
                pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        elif self._proc.stdin:
            try:
                self._proc.stdin.close()
            except OSError:
                pass

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests not tied to an open process ------------------------------

    def _hello(self) -> AgentHello:
        r = PayloadReader(self.request(Opcode.HELLO))
        hello = AgentHello(r.u16(), r.u16(), r.u32(), r.u32(), bool(r.u32() & 1), r.string())
        r.end()
        if hello.protocol_version != PROTOCOL_VERSION:
            raise AgentProtocolError(f"agent speaks protocol {hello.protocol_version}, not {PROTOCOL_VERSION}")
        return hello

    def list_processes(self) -> list[ProcessEntry]:
        r = PayloadReader(self.request(Opcode.LIST_PROCESSES))
        entries = [ProcessEntry(r.u32(), r.u32(), r.u32(), r.string()) for _ in range(r.u32())]
        r.end()
        return entries

    def list_modules(self, pid: int) -> list[Module]:
        r = PayloadReader(self.request(Opcode.LIST_MODULES, struct.pack("<I", pid), pid=pid))
        modules = []
        for _ in range(r.u32()):
            base_va, size = r.u64(), r.u32()
            name, path = r.string(), r.string()
            modules.append(Module(name, path, base_va, size))
        r.end()
        return modules

    def processes(self, module_name: str | None = None) -> Iterator[tuple[ProcessEntry, list[Module]]]:
        """(process, its modules) for every process but the agent's; with ``module_name``, only the processes
        that hold it, with just that module."""
        wanted = module_name.lower() if module_name else None
        for entry in self.list_processes():
            if entry.pid in (0, self.hello.agent_pid):
                continue
            try:
                modules = self.list_modules(entry.pid)
            except BackendError:
                continue  # gone meanwhile, or not ours to see
            if wanted is None:
                yield entry, modules
            else:
                named = [m for m in modules if m.name.lower() == wanted]
                if named:
                    yield entry, named

    def pids_with_module(self, module_name: str) -> list[int]:
        """The processes (but the agent) that have loaded ``module_name`` (any case)."""
        return [entry.pid for entry, _ in self.processes(module_name)]

    def process_info(self, pid: int) -> ProcessInfo:
        r = PayloadReader(self.request(Opcode.PROCESS_INFO, struct.pack("<I", pid), pid=pid))
        info = ProcessInfo(pid, r.u64(), r.string())
        r.end()
        return info

    def threads(self, pid: int) -> list[int]:
        r = PayloadReader(self.request(Opcode.THREADS, struct.pack("<I", pid), pid=pid))
        ids = [r.u32() for _ in range(r.u32())]
        r.end()
        return ids

    def open(self, pid: int, per_thread: bool = False) -> AgentProcessBackend:
        return AgentProcessBackend(self, pid, per_thread)


class AgentProcessBackend(ProcessBackend):
    """The ProcessBackend of one process, through an agent's open handle.

    Freezes suspend the whole process in one call (NtSuspendProcess); with
    ``per_thread`` each thread is suspended on its own (SuspendThread), as
    Detours does, which costs one call per thread.
    """

    def __init__(self, client: AgentClient, pid: int, per_thread: bool = False) -> None:
        self.client = client
        self.pid = pid
        self.freeze_flags = _FREEZE_PER_THREAD if per_thread else 0
        r = PayloadReader(client.request(Opcode.OPEN, struct.pack("<I", pid), pid=pid))
        self.handle, self.start_time = r.u32(), r.u64()
        r.end()
        self._closed = False

    def _request(
        self, opcode: Opcode, fmt: str, *fields: int, tail: bytes = b"", timeout: float | None = None
    ) -> bytes:
        if self._closed:
            raise BackendError(f"process {self.pid}: backend already closed")
        payload = struct.pack("<I" + fmt, self.handle, *fields) + tail
        return self.client.request(opcode, payload, timeout=timeout, pid=self.pid)

    def modules(self) -> list[Module]:
        return self.client.list_modules(self.pid)

    def read(self, va: int, size: int) -> bytes:
        if size <= 0:
            raise ValueError("read size must be positive")
        chunks = []
        for offset in range(0, size, _READ_CHUNK):
            want = min(_READ_CHUNK, size - offset)
            chunks.append(self._request(Opcode.READ, "IQ", want, va + offset))
        return b"".join(chunks)

    def write(self, va: int, data: bytes) -> None:
        if not data:
            raise ValueError("nothing to write")
        for offset in range(0, len(data), _READ_CHUNK):
            self._request(Opcode.WRITE, "Q", va + offset, tail=bytes(data[offset : offset + _READ_CHUNK]))

    def query(self, va: int) -> Region:
        r = PayloadReader(self._request(Opcode.QUERY, "Q", va))
        region = Region(
            base_va=r.u64(),
            allocation_base_va=r.u64(),
            size=r.u64(),
            allocation_protect=r.u32(),
            state=r.u32(),
            protect=r.u32(),
            type=r.u32(),
        )
        r.end()
        return region

    def allocate_near(self, va: int, size: int, protect: int, reach: int = REL32_REACH) -> int:
        r = PayloadReader(self._request(Opcode.ALLOC_NEAR, "IQQQ", protect, va, size, reach))
        allocated = r.u64()
        r.end()
        return allocated

    def free(self, va: int) -> None:
        self._request(Opcode.FREE, "Q", va)

    def protect(self, va: int, size: int, protect: int) -> int:
        r = PayloadReader(self._request(Opcode.PROTECT, "IQQ", protect, va, size))
        old = r.u32()
        r.end()
        return old

    def flush(self, va: int, size: int) -> None:
        self._request(Opcode.FLUSH, "QQ", va, size)

    def remote_call(self, function_va: int, arg: int, timeout: float = 10.0, wait: bool = True) -> int:
        timeout_ms = max(1, int(timeout * 1000))
        flags = 0 if wait else _REMOTE_CALL_NO_WAIT
        r = PayloadReader(
            self._request(
                Opcode.REMOTE_CALL,
                "IIQQ",
                flags,
                timeout_ms,
                function_va,
                arg & 0xFFFFFFFFFFFFFFFF,
                timeout=timeout + self.client.timeout,
            )
        )
        thread_id, exit_code = r.u32(), r.u32()
        r.end()
        return exit_code if wait else thread_id

    def commit(self, writes: Sequence[CommitWrite], max_attempts: int = 50, retry_sleep_ms: int = 2) -> CommitReport:
        if not writes:
            raise ValueError("a commit needs at least one write")
        body = bytearray()
        for w in writes:
            body += struct.pack("<QHBB", w.va, len(w.new), 1 if w.no_suspend else 0, 0)
            body += w.expected + w.new
        payload = self._request(
            Opcode.COMMIT, "IIII", self.freeze_flags, max_attempts, retry_sleep_ms, len(writes), tail=bytes(body)
        )
        return _commit_report(payload)

    def suspend_resume_floor(self) -> CommitReport:
        return _commit_report(self._request(Opcode.FLOOR, "I", self.freeze_flags))

    def thread_contexts(self, watch_va: int = 0, watch_size: int = 0) -> ThreadSnapshot:
        r = PayloadReader(self._request(Opcode.THREAD_CONTEXTS, "IQQ", self.freeze_flags, watch_va, watch_size))
        pause_ns = r.u64()
        threads = []
        for _ in range(r.u32()):
            thread_id, hits, rip, rsp, stack_base = r.u32(), r.u32(), r.u64(), r.u64(), r.u64()
            threads.append(ThreadState(thread_id, rip, rsp, stack_base, hits))
        r.end()
        return ThreadSnapshot(pause_ns / 1000, tuple(threads))

    def process_start_time(self) -> int:
        return self.client.process_info(self.pid).start_time

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.client.running:
            self.client.request(Opcode.CLOSE, struct.pack("<I", self.handle), pid=self.pid)
