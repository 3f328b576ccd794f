"""Shared test setup: the session fixtures (tests/support/session.py), the live agent and its target,
test layers by fixture, and no silent skips."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch.apply.agent import AgentClient, AgentProcessBackend
from hotpatch.apply.backend import Module
from tests.fixtures.cases import Case, load_cases
from tests.support.agents import LiveAgent
from tests.support.hosts import Host

# built_fixtures, wine_prefix, agent_exe, rust_pyd, openblas_dll: shared with benchmarks/conftest.py
pytest_plugins = ["tests.support.session"]


@pytest.fixture(scope="session")
def cases(built_fixtures: Path) -> list[Case]:
    return load_cases(built_fixtures)


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
