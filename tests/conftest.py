"""Shared test setup: built fixtures, real binaries, and no silent skips."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hotpatch.apply.agent import AgentClient, AgentProcessBackend
from hotpatch.apply.backend import Module
from hotpatch.process.winehost import WineMissing, wine_command, wine_session
from tests.fixtures.build_fixtures import build_all
from tests.fixtures.cases import Case, load_cases
from tests.support.realbins import real_binary

if TYPE_CHECKING:
    from tests.test_agent import Host

ROOT = Path(__file__).resolve().parent.parent


def fixtures_dir() -> Path:
    return Path(os.environ.get("HOTPATCH_FIXTURES") or ROOT / "build" / "fixtures")


@pytest.fixture(scope="session")
def built_fixtures() -> Path:
    out = fixtures_dir()
    build_all(out)
    return out


@pytest.fixture(scope="session")
def cases(built_fixtures: Path) -> list[Case]:
    return load_cases(built_fixtures)


@pytest.fixture(scope="session")
def wine_prefix(built_fixtures: Path) -> Iterator[Path]:
    """The private Wine prefix of the test run (build/fixtures/wineprefix), its wineserver kept up."""
    try:
        wine_command()
    except WineMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    with wine_session(built_fixtures.resolve() / "wineprefix") as prefix:
        yield prefix


@pytest.fixture(scope="session", autouse=True)
def trust_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private trust store holding the test signing key (tests/support/signing.py), for every test and the
    processes they start; this machine's own trusted keys never take part."""
    from hotpatch.package.trust import ENV_TRUST_DIR, TrustStore
    from tests.support.signing import PUBLIC_KEY

    path = tmp_path_factory.mktemp("trust") / "trusted-keys"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_TRUST_DIR, str(path))
        TrustStore.default().add(PUBLIC_KEY.hex(), "hotpatch tests")
        yield path


@pytest.fixture(scope="session")
def rust_pyd() -> Path:
    return real_binary("cryptography", "43.0.0", "cryptography/hazmat/bindings/_rust.pyd")


@pytest.fixture(scope="session")
def openblas_dll() -> Path:
    return real_binary("numpy", "2.1.0", "numpy.libs/libscipy_openblas64_-*.dll")


# Fixtures whose use puts a test in a layer (pyproject.toml lists the markers).
_LAYER_FIXTURES = {
    "wine": {"wine_prefix", "agent", "target", "module", "host"},
    "realbins": {"rust_pyd", "openblas_dll", "real_pair", "real_binaries"},
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with the layers its fixtures imply, so `-m "not wine"` needs no bookkeeping."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for marker, fixtures in _LAYER_FIXTURES.items():
            if names & fixtures:
                item.add_marker(marker)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test is not a passing test: the run fails if anything was skipped."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and reporter.stats.get("skipped") and exitstatus == 0:
        session.exitstatus = 1


# ── the native agent and a target process (tests/test_agent.py, tests/test_apply_live.py) ──


@pytest.fixture(scope="session")
def agent_exe() -> Path:
    from tests.test_agent import _agent_build

    return _agent_build().build_agent(ROOT / "build" / "agent")


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


@pytest.fixture(scope="module")
def live_agent(agent_exe: Path, wine_prefix: Path) -> Iterator[LiveAgent]:
    running = LiveAgent(agent_exe, wine_prefix)
    yield running
    running.close()


@pytest.fixture
def agent(live_agent: LiveAgent) -> AgentClient:
    return live_agent.healthy()


@pytest.fixture(scope="module")
def dll(built_fixtures: Path) -> Path:
    """The DLL the module's ``host`` fixture runs (each test module defines its own host)."""
    return built_fixtures.resolve() / "body_change" / "baseline.dll"


@pytest.fixture
def target(live_agent: LiveAgent, host: Host) -> AgentProcessBackend:
    return live_agent.backend(host.pid)


@pytest.fixture
def module(target: AgentProcessBackend, dll: Path) -> Module:
    (found,) = [m for m in target.modules() if m.name.lower() == dll.name]
    return found
