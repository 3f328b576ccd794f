"""The diff: ground truth of every fixture case, zero-change invariants, real pairs, the JSON contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hotpatch import Image, discover
from hotpatch.diff.compare import diff
from hotpatch.verdict.rules import REASON_KINDS, decide
from tests.fixtures.cases import Case, load_cases
from tests.support.realbins import real_binary

ROOT = Path(__file__).resolve().parent.parent


def _names(result: object, status: str, case: Case) -> list[str]:
    """Functions with ``status``, named through the unstripped builds (stripping does not move code)."""
    baseline_names = {s.rva: s.name for s in Image.load(case.baseline).symbols}
    patched_names = {s.rva: s.name for s in Image.load(case.patched).symbols}
    out = []
    for entry in result.by_status(status):  # type: ignore[attr-defined]
        if entry.baseline is not None:
            out.append(baseline_names.get(entry.baseline.rva, hex(entry.baseline.rva)))
        else:
            out.append(patched_names.get(entry.patched.rva, hex(entry.patched.rva)))
    return sorted(out)


def _case_ids() -> list[str]:
    return [c.name for c in load_cases(ROOT / "build" / "fixtures")]


@pytest.mark.parametrize("stripped", [False, True], ids=["symbols", "stripped"])
@pytest.mark.parametrize("name", _case_ids())
def test_fixture_ground_truth(cases: list[Case], name: str, stripped: bool) -> None:
    case = next(c for c in cases if c.name == name)
    result = diff(case.dll("baseline", stripped), case.dll("patched", stripped))
    assert _names(result, "changed", case) == sorted(case.changed)
    assert _names(result, "added", case) == sorted(case.added)
    assert _names(result, "removed", case) == sorted(case.removed)
    assert decide(result).status == case.verdict
    assert sorted({r.kind for r in decide(result).reasons}) == sorted(set(case.reasons))


def test_every_reason_kind_is_documented() -> None:
    text = (ROOT / "docs" / "CLI.md").read_text()
    for kind in REASON_KINDS:
        assert f"`{kind}`" in text, kind


def test_self_diff_is_zero_changes(built_fixtures: Path) -> None:
    for dll in sorted(built_fixtures.glob("*/baseline*.dll")):
        table = discover(Image.load(dll))
        result = diff(table, table)
        summary = result.summary()
        assert summary["changed"] == summary["added"] == summary["removed"] == 0, dll
        assert decide(result).status == "HOTPATCH"
        assert not [d for d in result.data if d.kind != "load_config_change"]


def test_reordered_build_is_zero_changes(built_fixtures: Path, tmp_path: Path) -> None:
    first, second = built_fixtures / "reorder" / "a.dll", built_fixtures / "reorder" / "b.dll"
    stripped = []
    for dll in (first, second):
        out = tmp_path / dll.name
        subprocess.run(["x86_64-w64-mingw32-strip", "-o", str(out), str(dll)], check=True)
        stripped.append(out)
    for a, b in ((first, second), tuple(stripped)):
        result = diff(a, b)
        moved = [f for f in result.functions if f.baseline and f.patched and f.baseline.rva != f.patched.rva]
        assert moved, "the reordered build must move functions"
        summary = result.summary()
        assert summary["changed"] == summary["added"] == summary["removed"] == 0, [
            (f.status, f.name, f.changes) for f in result.functions if f.status != "unchanged"]
        assert decide(result).status == "HOTPATCH", decide(result)


def test_inlined_change_marks_callers_changed(cases: list[Case]) -> None:
    case = next(c for c in cases if c.name == "inlined_helper")
    result = diff(case.baseline, case.patched)
    changed = {e.name: e for e in result.by_status("changed")}
    assert set(case.changed) <= set(changed)
    assert all("code" in changed[name].changes for name in case.changed)


def test_no_redirect_where_a_call_returns_inside_it(cases: list[Case]) -> None:
    """call_at_entry: rel32 would fit in the 9 bytes of invoke(), but its first call returns to invoke+2."""
    from hotpatch.verdict.redirect import obstacles, possible_strategies
    from hotpatch.verdict.strategy import Strategy

    case = next(c for c in cases if c.name == "call_at_entry")
    result = diff(case.baseline, case.patched)
    invoke = next(e.baseline for e in result.by_status("changed") if e.name == "invoke")
    assert possible_strategies(result.baseline, invoke) == []
    assert obstacles(result.baseline, invoke)[Strategy.REL32_JMP] == "a call returns inside its 5 bytes"
    [reason] = decide(result).reasons
    assert reason.kind == "function_too_short" and "rel32_jmp: a call returns inside" in reason.message


def test_layout_change_can_be_overridden_and_is_recorded(cases: list[Case]) -> None:
    case = next(c for c in cases if c.name == "struct_field_insert")
    blocked = diff(case.baseline, case.patched)
    assert [r.kind for r in decide(blocked).reasons] == ["data_layout_change"]
    assert "allocation size" in decide(blocked).reasons[0].message
    allowed = decide(diff(case.baseline, case.patched), allow_layout_change=True)
    assert allowed.status == "HOTPATCH"
    assert [r.kind for r in allowed.overridden] == ["data_layout_change"]


def test_cli_json_contract(cases: list[Case], tmp_path: Path) -> None:
    case = next(c for c in cases if c.name == "changed_init_global")
    out = tmp_path / "diff.json"
    result = subprocess.run([sys.executable, "-m", "hotpatch.cli", "diff", str(case.baseline), str(case.patched),
                             "--json", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert json.loads(out.read_text()) == document
    assert document["schema"] == "hotpatch.diff/1"
    assert set(document) >= {"baseline", "patched", "summary", "functions", "data", "verdict"}
    assert set(document["baseline"]) == {"path", "identity"}
    for entry in document["functions"]:
        assert entry["status"] in ("unchanged", "changed", "added", "removed")
        assert entry["match"] in (None, "name", "fingerprint", "callgraph", "similarity")
        for side in ("baseline", "patched"):
            assert entry[side] is None or set(entry[side]) == {"name", "rva", "size"}
    assert document["verdict"]["status"] == "NEW_BASELINE"
    reason = document["verdict"]["reasons"][0]
    assert reason["kind"] == "changed_writable_data" and reason["message"] and reason["subject"]


@pytest.mark.parametrize("chunk", [1, 3, 2048])
def test_streamed_json_is_the_whole_documents_bytes(cases: list[Case], chunk: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``diff --json`` encodes the function entries a chunk at a time: the bytes are those of the whole document,
    whatever the chunk size (one entry, several, all), and with no entries at all."""
    from hotpatch import jsonio
    from hotpatch.verdict.rules import diff_document

    monkeypatch.setattr(jsonio, "_CHUNK", chunk)
    case = next(c for c in cases if c.name == "many_functions")
    result = diff(case.baseline, case.patched)
    verdict = decide(result)
    document = diff_document(result, verdict, functions=False)
    assert document["functions"] == [] and len(result.functions) > 3 * chunk or chunk == 2048
    whole = jsonio.dumps(diff_document(result, verdict))
    assert b"".join(jsonio.dumps_streamed(document, "functions", result.function_entries())) == whole
    empty = {**document, "functions": []}
    assert b"".join(jsonio.dumps_streamed(document, "functions", iter(()))) == jsonio.dumps(empty)


def test_alignments_are_kept_packed_and_read_back_the_same(cases: list[Case]) -> None:
    case = next(c for c in cases if c.name == "body_change")
    result = diff(case.baseline, case.patched)
    streams = result.streams
    assert streams is not None
    changed = [f for f in result.functions if f.baseline is not None and f.patched is not None]
    assert changed
    for entry in changed:
        fresh = streams.kernels.aligned_indices(streams.tokens(streams.baseline, entry.baseline),
                                                streams.tokens(streams.patched, entry.patched))
        assert streams.aligned(entry.baseline, entry.patched) == [tuple(pair) for pair in fresh]
        assert streams.aligned(entry.baseline, entry.patched) == [tuple(pair) for pair in fresh]  # from the cache


def test_cli_bad_input_exits_2(tmp_path: Path, cases: list[Case]) -> None:
    bogus = tmp_path / "bogus.dll"
    bogus.write_bytes(b"not a PE at all")
    result = subprocess.run([sys.executable, "-m", "hotpatch.cli", "diff", str(bogus), str(cases[0].patched)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


REAL_PAIRS = [
    ("cryptography", "43.0.0", "43.0.1", "cryptography/hazmat/bindings/_rust.pyd"),
    ("numpy", "2.1.0", "2.1.1", "numpy.libs/libscipy_openblas64_-*.dll"),
    ("numpy", "2.1.0", "2.1.1", "numpy/_core/_multiarray_umath.*.pyd"),
    ("numpy", "2.1.0", "2.1.1", "numpy/_core/_simd.*.pyd"),
    ("numpy", "2.1.0", "2.1.1", "numpy/random/_generator.*.pyd"),
]


@pytest.mark.parametrize("dist,old,new,pattern", REAL_PAIRS, ids=[p[3].split("/")[-1] for p in REAL_PAIRS])
def test_real_pairs_account_for_every_function(dist: str, old: str, new: str, pattern: str) -> None:
    baseline = discover(Image.load(real_binary(dist, old, pattern)))
    patched = discover(Image.load(real_binary(dist, new, pattern)))
    result = diff(baseline, patched)
    seen_a = [e.baseline.rva for e in result.functions if e.baseline is not None]
    seen_b = [e.patched.rva for e in result.functions if e.patched is not None]
    assert sorted(seen_a) == sorted(f.rva for f in baseline)
    assert sorted(seen_b) == sorted(f.rva for f in patched)
    assert len(set(seen_a)) == len(seen_a) and len(set(seen_b)) == len(seen_b)
    self_diff = diff(baseline, baseline).summary()
    assert self_diff["changed"] == self_diff["added"] == self_diff["removed"] == 0
