"""hotpatch-agent.exe for the live tests: its build (native/agent/build.py) and an agent restarted when it died."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from hotpatch.apply.agent import AgentClient, AgentProcessBackend

ROOT = Path(__file__).resolve().parent.parent.parent


def agent_build() -> ModuleType:
    """native/agent/build.py, loaded from the checkout (it is a build script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("agent_build", ROOT / "native" / "agent" / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LiveAgent:
    """One test module's agent, started again when a test left it dead.

    A request that times out stops the agent (AgentClient kills it): without a
    restart every later test of the module would fail on the same dead pipe, so
    one slow test would read as dozens of failures.
    """

    def __init__(self, exe: Path, prefix: Path) -> None:
        self.exe, self.prefix = exe, prefix
        self.client = AgentClient.start(exe, prefix=prefix, timeout=60)
        self.backends: dict[int, AgentProcessBackend] = {}
        self.restarts = 0

    def healthy(self) -> AgentClient:
        if not self.client.running:
            self.client.close()
            self.client = AgentClient.start(self.exe, prefix=self.prefix, timeout=60)
            self.backends.clear()
            self.restarts += 1
        return self.client

    def backend(self, pid: int) -> AgentProcessBackend:
        client = self.healthy()
        if pid not in self.backends:
            self.backends[pid] = client.open(pid)
        return self.backends[pid]

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.client.close()
