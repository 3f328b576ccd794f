"""Benchmarks share the tests' session fixtures (tests/support/session.py: built DLLs, real binaries,
the Wine prefix, the agent), loaded as a plugin.

Benchmarks marked ``long`` (minutes each, such as the duckdb diff) are deselected, not skipped,
unless ``--run-long`` asks for them.
"""

import pytest

pytest_plugins = ["tests.support.session"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-long", action="store_true", help="also run the benchmarks marked long")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "long: a benchmark of minutes, run only with --run-long")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-long"):
        return
    long = [item for item in items if item.get_closest_marker("long")]
    if long:
        config.hook.pytest_deselected(items=long)
        items[:] = [item for item in items if not item.get_closest_marker("long")]
