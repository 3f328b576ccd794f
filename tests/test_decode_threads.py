"""The compiled decode without the GIL: packed references, two threads, and a diff's two sides at once."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

from hotpatch import Image, discover
from hotpatch.analysis import _core as core
from hotpatch.analysis.api import AnalysisContext
from hotpatch.diff.compare import diff


def _items(table) -> list:  # type: ignore[no-untyped-def]
    return [(a.rva, a.ranges) for a in table.analyses]


def test_packed_references_read_as_the_list_of_tuples(built_fixtures: Path) -> None:
    table = discover(Image.load(built_fixtures / "switch_table" / "baseline.dll"))
    refs = max((a.raw_refs for a in table.analyses), key=len)
    assert isinstance(refs, core.RefList) and len(refs) > 3
    as_list = list(refs)
    assert all(isinstance(ref, tuple) and len(ref) == 5 for ref in as_list)
    assert refs == as_list and as_list == refs and not refs != as_list
    assert refs[-1] == as_list[-1] and refs[1:3] == as_list[1:3] and repr(refs) == repr(as_list)
    changed = [*as_list[:-1], (*as_list[-1][:4], as_list[-1][4] + 1)]
    assert refs != changed and changed != refs
    assert pickle.loads(pickle.dumps(refs)) == refs


def test_decode_in_two_threads_equals_one_after_the_other(built_fixtures: Path) -> None:
    images = [Image.load(built_fixtures / case / "baseline.dll") for case in ("cpp_exception", "many_functions")]
    jobs = [(AnalysisContext.from_image(image), _items(discover(image))) for image in images]
    alone = [core.decode(ctx, items) for ctx, items in jobs]
    together: list = [None, None]
    start = threading.Barrier(2)

    def run(index: int) -> None:
        start.wait()
        together[index] = [core.decode(*jobs[index]) for _ in range(3)]

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(2):
        assert all(result == alone[index] for result in together[index])
    assert sum(len(refs) for _, refs, _ in alone[1]) > 100


def test_diff_of_paths_equals_diff_of_tables(built_fixtures: Path) -> None:
    for case in ("switch_table", "new_callee", "removed_function"):
        baseline, patched = built_fixtures / case / "baseline.dll", built_fixtures / case / "patched.dll"
        threaded = diff(str(baseline), str(patched))  # both sides analysed at once
        sequential = diff(discover(Image.load(baseline)), discover(Image.load(patched)))
        assert threaded.to_json() == sequential.to_json()
