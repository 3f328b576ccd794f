"""Function-by-function diff of a baseline image against a patched one.

``diff(baseline, patched)`` matches the functions (``matching``), decides for
each matched pair whether it is really changed (``pairing``: its code, what its
calls reach, the read-only data it reads), maps the data both versions
reference, and diffs data, imports, exports, TLS and the entry point
(``datadiff``, ``uncovered``), into one ``DiffResult``. The verdict is
``hotpatch.verdict``'s: ``decide(result)``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..analysis.functions import FunctionTable, discover
from ..collector import gc_paused
from ..pe.image import Image
from .datadiff import diff_data
from .matching import match_functions
from .pairing import Pairing
from .result import DiffResult
from .streams import InstructionStreams
from .uncovered import uncovered_changes

__all__ = ["diff"]


def diff(baseline: Image | FunctionTable | str | Path, patched: Image | FunctionTable | str | Path) -> DiffResult:
    """Diff two versions of one module (``hotpatch.verdict.rules.decide`` then says whether a hotpatch can
    carry the update)."""
    with gc_paused():
        return _diff(baseline, patched)


def _diff(baseline: Image | FunctionTable | str | Path, patched: Image | FunctionTable | str | Path) -> DiffResult:
    table_a, table_b = _tables(baseline, patched)
    streams = InstructionStreams(table_a, table_b)
    matches = match_functions(table_a, table_b, streams)
    function_map = {a: m.patched_rva for a, m in matches.items()}
    pairing = Pairing(table_a, table_b, function_map, streams)
    functions = pairing.classify(matches)
    data, data_map = diff_data(table_a, table_b, functions, function_map, pairing)
    data += uncovered_changes(table_a, table_b, function_map)
    return DiffResult(table_a, table_b, tuple(functions), tuple(data), function_map, data_map, streams)


def _tables(baseline: Image | FunctionTable | str | Path,
            patched: Image | FunctionTable | str | Path) -> tuple[FunctionTable, FunctionTable]:
    """Both sides loaded and analysed at once: the compiled core decodes without the GIL, so the patched
    image's analysis runs in a second thread while this one analyses the baseline."""
    if isinstance(baseline, FunctionTable) or isinstance(patched, FunctionTable):
        return _table(baseline), _table(patched)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotpatch-patched") as pool:
        other = pool.submit(_table, patched)
        table_a = _table(baseline)  # if this fails, its error is raised once the other thread is done
        return table_a, other.result()


def _table(source: Image | FunctionTable | str | Path) -> FunctionTable:
    if isinstance(source, FunctionTable):
        return source
    # the directory reader gives the model LIEF gives (tests/test_pe_headers.py holds them equal) at a third
    # of the CPU, and without LIEF's import
    image = source if isinstance(source, Image) else Image.load_fast(source)
    return discover(image)
