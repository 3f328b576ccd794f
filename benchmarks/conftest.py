"""Benchmarks share the tests' fixtures (built DLLs, real binaries, the Wine prefix, the agent)."""

from tests.conftest import agent_exe, built_fixtures, openblas_dll, rust_pyd, wine_prefix  # noqa: F401
