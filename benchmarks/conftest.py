"""Benchmarks share the tests' fixtures (built DLLs, real binaries)."""

from tests.conftest import built_fixtures, openblas_dll, rust_pyd  # noqa: F401
