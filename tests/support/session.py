"""The session fixtures the tests and the benchmarks share: built C fixtures, the Wine prefix, real
binaries, the agent. tests/conftest.py and benchmarks/conftest.py import them (pytest registers a
fixture by its name in a conftest's namespace)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotpatch.process.winehost import WineMissing, wine_command, wine_session
from tests.fixtures.build_fixtures import build_all
from tests.support.agents import agent_build
from tests.support.realbins import real_binary

ROOT = Path(__file__).resolve().parent.parent.parent


def fixtures_dir() -> Path:
    return Path(os.environ.get("HOTPATCH_FIXTURES") or ROOT / "build" / "fixtures")


@pytest.fixture(scope="session")
def built_fixtures() -> Path:
    out = fixtures_dir()
    build_all(out)
    return out


@pytest.fixture(scope="session")
def wine_prefix(built_fixtures: Path) -> Iterator[Path]:
    """The private Wine prefix of the test run (build/fixtures/wineprefix), its wineserver kept up."""
    try:
        wine_command()
    except WineMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    with wine_session(built_fixtures.resolve() / "wineprefix") as prefix:
        yield prefix


@pytest.fixture(scope="session")
def rust_pyd() -> Path:
    return real_binary("cryptography", "43.0.0", "cryptography/hazmat/bindings/_rust.pyd")


@pytest.fixture(scope="session")
def openblas_dll() -> Path:
    return real_binary("numpy", "2.1.0", "numpy.libs/libscipy_openblas64_-*.dll")


@pytest.fixture(scope="session")
def agent_exe() -> Path:
    return agent_build().build_agent(ROOT / "build" / "agent")
