"""The compiled core's capstone entry points come from the library the Python binding loads."""

from __future__ import annotations

import os

import pytest

from hotpatch import x86


def test_the_core_opens_the_library_the_binding_loads() -> None:
    import capstone

    ours = x86._libcapstone()
    assert os.path.samefile(ours._name, capstone._cs._name)
    assert x86.capstone_symbol("cs_open", "test") > 0
    assert x86.capstone_symbol("cs_disasm_iter", "test") != x86.capstone_symbol("cs_open", "test")


def test_a_missing_entry_point_is_an_import_error() -> None:
    with pytest.raises(ImportError, match="libcapstone has no cs_no_such_function"):
        x86.capstone_symbol("cs_no_such_function", "test")
