"""HTML reports: what the page holds for a diff, a build, a batch; self-contained; bad input refused."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest

from hotpatch.batch import Job, run_job
from hotpatch.cli.commands import main
from hotpatch.diff.compare import diff
from hotpatch.package.model import Strategy
from hotpatch.report import function_rows, image_info  # the JSON views still live here
from hotpatch.report.diffpage import diff_page
from hotpatch.report.html import ReportPage, render
from hotpatch.report.sources import load_page
from hotpatch.verdict.rules import decide, diff_document


def _row_text(cell: list | None) -> str:
    return "" if cell is None else "".join(token[1] for token in cell[1])


def _assert_self_contained(page_html: str) -> None:
    assert not re.search(r"<(script|img|link|iframe)[^>]+(src|href)=", page_html)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page_html)
    assert "@import" not in page_html


def test_json_views_are_still_importable_from_hotpatch_report(built_fixtures: Path) -> None:
    from hotpatch.analysis.functions import discover
    from hotpatch.pe.image import Image

    table = discover(Image.load(built_fixtures / "body_change" / "baseline.dll"))
    assert image_info(table.image, table)["schema"] == "hotpatch.info/1"
    assert len(function_rows(table)) == len(table)


def test_diff_report_puts_the_verdict_first_and_links_each_reason_to_its_function(built_fixtures: Path) -> None:
    case = built_fixtures / "struct_field_insert"
    result = diff(case / "baseline.dll", case / "patched.dll")
    page = render(ReportPage("t", diff=diff_page(result, decide(result))))
    _assert_self_contained(page)
    body = page[page.index("<body>"):]
    assert body.index("NEW_BASELINE") < body.index("Data changes") < body.index("Functions (")
    (reason,) = decide(result).reasons
    link = re.search(r'<a href="#(fn-\d+)" class="reason-link">([^<]*)</a>', page)
    assert link is not None and link.group(2) == reason.subject
    assert re.search(rf'<details class="fn blocking" id="{link.group(1)}">\s*<summary>.*{reason.subject}', page)


def test_side_by_side_rows_show_names_not_addresses_and_mark_what_changed(built_fixtures: Path) -> None:
    case = built_fixtures / "struct_field_insert"
    result = diff(case / "baseline.dll", case / "patched.dll")
    page = diff_page(result, decide(result))
    anchor = next(f["anchor"] for f in page.functions if f["name"] == "account_get")
    rows = page.details[anchor]["rows"]
    texts = [(state, _row_text(left), _row_text(right)) for state, left, right in rows if isinstance(state, str)]
    # the allocation grew from 0x18 to 0x20 bytes: a changed row; the call to malloc is by name on both sides
    assert ("changed", "mov ecx, 0x18", "mov ecx, 0x20") in texts
    assert ("same", "call malloc", "call malloc") in texts
    assert any(state == "same" and "[the_account]" in left for state, left, _ in texts)
    assert any(state == "deleted" for state, _, _ in texts) and any(state == "inserted" for state, _, _ in texts)
    base = result.baseline.image.image_base
    for _, left, right in texts:
        for text in (left, right):
            for value in re.findall(r"0x[0-9a-f]+", text):
                assert int(value, 16) < base, f"an address left in {text!r}"


def test_a_call_to_another_listed_function_links_to_it(built_fixtures: Path) -> None:
    case = built_fixtures / "new_callee"
    result = diff(case / "baseline.dll", case / "patched.dll")
    page = diff_page(result, decide(result))
    anchors = {f["anchor"] for f in page.functions}
    links = [token[2] for entry in page.details.values() for _, left, right in entry["rows"]
             for cell in (left, right) if cell for token in cell[1] if token[0] == "ref" and len(token) == 3]
    assert links and {link[1:] for link in links} <= anchors


def test_diff_json_alone_lists_functions_and_says_disassembly_needs_the_images(tmp_path: Path,
                                                                              built_fixtures: Path) -> None:
    case = built_fixtures / "short_function"
    result = diff(case / "baseline.dll", case / "patched.dll")
    document = diff_document(result, decide(result))
    document["baseline"]["path"] = document["patched"]["path"] = str(tmp_path / "gone.dll")
    (tmp_path / "diff.json").write_text(json.dumps(document))
    page = render(load_page(tmp_path / "diff.json"))
    assert "NEW_BASELINE" in page and "function_too_short" in page
    assert "listed without their disassembly" in page and 'id="rows-' not in page
    assert 'href="#fn-0" class="reason-link">flag</a>' in page


def test_build_report_shows_sites_strategies_and_every_fixup(tmp_path: Path, built_fixtures: Path) -> None:
    case = built_fixtures / "new_callee"
    package = tmp_path / "x.hpk"
    assert main(["build", str(case / "baseline.dll"), str(case / "patched.dll"), "-o", str(package)]) == 0
    out = tmp_path / "build.html"
    assert main(["report", str(package), "--baseline", str(case / "baseline.dll"), "--patched",
                 str(case / "patched.dll"), "-o", str(out)]) == 0
    page = out.read_text()
    _assert_self_contained(page)
    assert "Patch sites" in page and "every fixup" in page and "new code of" in page
    strategies = set(re.findall(r'<td><span class="kind">(\w+)</span></td>\s*<td>[^<]*</td><td class="num">', page))
    assert strategies and strategies <= {s.name.lower() for s in Strategy}
    # the site of a changed function links to its side-by-side view
    assert re.search(r'<tr id="site-0"><td><a href="#fn-\d+">', page)


def test_build_json_reports_the_package_it_wrote_or_the_reasons_it_refused(
        tmp_path: Path, built_fixtures: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for case, code in (("new_callee", 0), ("short_function", 3)):
        capsys.readouterr()
        assert main(["build", str(built_fixtures / case / "baseline.dll"), str(built_fixtures / case / "patched.dll"),
                     "-o", str(tmp_path / f"{case}.hpk"), "--json"]) == code
        (tmp_path / f"{case}.json").write_text(capsys.readouterr().out)
        out = tmp_path / f"{case}.html"
        assert main(["report", str(tmp_path / f"{case}.json"), "-o", str(out)]) == 0
        page = out.read_text()
        verdict = re.search(r'id="verdict">\s*<strong>(\w+)</strong>', page)
        assert verdict is not None
        if code == 0:
            assert verdict.group(1) == "HOTPATCH" and "Patch sites (1)" in page and "every fixup" in page
        else:
            assert verdict.group(1) == "NEW_BASELINE" and "function_too_short" in page and "Patch sites" not in page


def test_batch_report_has_the_summary_and_three_inline_svg_plots(tmp_path: Path, built_fixtures: Path) -> None:
    from hotpatch.batch.store import ResultStore

    store = ResultStore(tmp_path / "results.jsonl")
    for case in ("body_change", "short_function", "struct_field_insert"):
        store.append(run_job(Job.from_json({"baseline": str(built_fixtures / case / "baseline.dll"),
                                            "patched": str(built_fixtures / case / "patched.dll"), "name": case})))
    store.append(run_job(Job.from_json({"baseline": "/nonexistent.dll", "patched": "/nonexistent.dll",
                                        "name": "missing"})))
    out = tmp_path / "batch.html"
    assert main(["report", str(tmp_path), "-o", str(out)]) == 0
    page = out.read_text()
    _assert_self_contained(page)
    verdict = re.search(r'<div class="verdict[^"]*" id="verdict">(.*?)</div>', page, re.S)
    assert verdict is not None
    assert " ".join(verdict.group(1).split()) == ("<strong>4 jobs</strong> 1 HOTPATCH, 2 NEW_BASELINE, 1 failed: "
                                                   "33% hotpatchable")
    assert len(re.findall(r'<figure id="plot-[\w-]+"><svg', page)) == 3
    assert "function_too_short" in page and "data_layout_change" in page
    assert html.escape("No such file") in page


def test_report_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, built_fixtures: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    case = built_fixtures / "body_change"
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "other.json").write_text('{"schema": "hotpatch.info/1"}')
    result = diff(case / "baseline.dll", case / "patched.dll")
    document = diff_document(result, decide(result))
    (tmp_path / "diff.json").write_text(json.dumps(document))
    out = tmp_path / "out.html"
    for args in ([str(tmp_path / "text.json")], [str(tmp_path / "other.json")], [str(tmp_path / "missing.json")],
                 [], [str(tmp_path / "diff.json"), "--baseline", str(built_fixtures / "new_string" / "baseline.dll")],
                 [str(tmp_path)]):
        capsys.readouterr()
        assert main(["report", *args, "-o", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("hotpatch: error: ") and err.count("\n") == 1, err
        assert not out.exists()


def test_train_report_puts_each_release_on_its_day_of_the_calendar(tmp_path: Path) -> None:
    releases = [("1.0", "2024-01-10", "planned_baseline"), ("1.1", "2024-02-14", "hotpatch"),
                ("1.2", "2024-03-01", "unplanned_baseline")]
    document = {"schema": "hotpatch.train/1", "train": "demo", "figures": {"restarts": 2},
                "releases": [{"index": i, "name": n, "date": d, "kind": k, "package_bytes": 100 * i,
                              "reasons": [{"module": "core", "kind": "tls_change", "subject": "s", "message": "m"}]
                              if k == "unplanned_baseline" else []}
                             for i, (n, d, k) in enumerate(releases)]}
    (tmp_path / "train.json").write_text(json.dumps(document))
    (tmp_path / "calendar.svg").write_text('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" '
                                           'id="drawn-by-train"></svg>')
    out = tmp_path / "train.html"
    assert main(["report", str(tmp_path / "train.json"), "-o", str(out)]) == 0
    page = out.read_text()
    _assert_self_contained(page)
    months = re.findall(r"<h3>(\w+ \d+)</h3>", page)
    assert months == ["January 2024", "February 2024", "March 2024"]
    # February 2024 starts on a Thursday: three blank cells, then day 14 carries the hotpatch
    february = page.split("<h3>February 2024</h3>")[1].split("</div>\n", 1)[0] + page.split(
        "<h3>February 2024</h3>")[1].split("<h3>")[0]
    cells = re.findall(r'<div class="([^"]*)" title="[^"]*">([^<]*)</div>', february)
    assert [c for c, _ in cells[:3]] == ["blank"] * 3
    assert cells[3 + 13] == ("hotpatch", "14 1.1")
    assert "core: tls_change" in page and 'id="drawn-by-train"' in page
    verdict = re.search(r'id="verdict">(.*?)</div>', page, re.S)
    assert verdict is not None and " ".join(verdict.group(1).split()) == (
        "<strong>3 releases</strong> 1 hotpatches, 2 baselines (1 unplanned), 2 restarts")


def test_inline_rows_cannot_end_their_script_early(built_fixtures: Path) -> None:
    case = built_fixtures / "new_string"
    result = diff(case / "baseline.dll", case / "patched.dll")
    page = diff_page(result, decide(result))
    anchor = next(iter(page.details))
    page.details[anchor]["rows"].append(["changed", ["+0", [["ref", "'</script><b id=\"x\">'"]]], None])
    text = render(ReportPage("t", diff=page))
    script = re.search(rf'<script type="application/json" id="rows-{anchor}">(.*?)</script>', text, re.S)
    assert script is not None and json.loads(script.group(1))["rows"][-1][1][1][0][1] == "'</script><b id=\"x\">'"
    assert '<b id="x">' not in text
