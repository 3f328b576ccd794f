"""Start-up: --version and this module's own commands load none of the other command modules."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hotpatch.cli.commands import _OWN_COMMANDS, build_parser

_PROBE = """
import contextlib, io, sys
from hotpatch.cli.commands import main
with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
    main(sys.argv[1:])
heavy = sorted(m for m in ("distributed", "numpy", "lief", "capstone", "hotpatch.rollout", "hotpatch.apply")
               if m in sys.modules)
print(",".join(heavy))
"""


def _loaded(*argv: str) -> str:
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120)
    return done.stdout.strip()


def test_version_loads_no_heavy_module() -> None:
    assert _loaded("--version") == ""


def test_help_still_lists_every_command() -> None:
    full = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    own = build_parser(own_only=True)._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(own) == _OWN_COMMANDS
    assert {"apply", "rollout", "train", "batch", "report", "trust"} <= set(full)


def test_info_and_functions_load_no_lief(built_fixtures) -> None:  # type: ignore[no-untyped-def]
    dll = str(built_fixtures / "body_change" / "baseline.dll")
    # both read the image with hotpatch.pe (Image.load_fast): LIEF's import alone would be most of their cost;
    # the compiled core opens libcapstone itself, without the binding's import (a third of a small DLL's run)
    assert _loaded("info", dll, "--json") == ""
    assert _loaded("functions", dll, "--json") == ""


def test_diff_and_verdict_modules_load_no_capstone_binding() -> None:
    # the verdict takes capstone's numbers from the compiled core; the binding's import (every architecture's
    # constants, 0.04 s) waits for the code that decodes with it (a GCC image's clobbers, the Python twins)
    probe = ("import sys, hotpatch.diff.compare, hotpatch.verdict.rules, hotpatch.verdict.ownership, "
             "hotpatch.verdict.clobbers; print('capstone' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.realbins
def test_diff_of_msvc_images_loads_no_capstone_binding() -> None:
    from tests.support.realbins import real_binary

    pair = [str(real_binary("pyzmq", version, "zmq/backend/cython/_zmq*.pyd")) for version in ("26.0.2", "26.0.3")]
    probe = _PROBE.replace("redirect_stdout(io.StringIO())", "redirect_stdout(io.StringIO()) as out").replace(
        'print(",".join(heavy))', 'print(",".join(heavy), "functions" in out.getvalue())')
    done = subprocess.run([sys.executable, "-c", probe, "diff", *pair, "--json"], capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.strip() == "True", done.stderr  # the diff was written, and no heavy module loaded


def test_commands_outside_rollout_do_not_import_dask() -> None:
    # every command's parser is built from every module; only `rollout` (and batch's cluster) may load Dask
    for argv in (("apply", "--help"), ("status", "--help"), ("rollback", "--help"), ("build", "--help")):
        assert "distributed" not in _loaded(*argv).split(","), argv


def test_one_shot_commands_run_with_the_collector_paused(monkeypatch, built_fixtures) -> None:  # type: ignore[no-untyped-def]
    """The analysis commands run with the cyclic collector paused (a full collection walks both images'
    tables: a second of the duckdb diff); the long-running ones (apply's agent loop, rollouts) keep it."""
    import gc

    from hotpatch.cli import commands

    seen: dict[str, bool] = {}

    def probe(name: str):  # type: ignore[no-untyped-def]
        def run(args) -> int:  # type: ignore[no-untyped-def]
            seen[name] = gc.isenabled()
            return 0
        return run

    monkeypatch.setattr(commands, "cmd_info", probe("info"))
    dll = str(built_fixtures / "body_change" / "baseline.dll")
    assert gc.isenabled()
    assert commands.main(["info", dll]) == 0
    assert seen["info"] is False and gc.isenabled()
    parser = commands.build_parser()
    args = parser.parse_args(["trust", "list"])
    monkeypatch.setattr(commands, "build_parser", lambda own_only=False: _Fixed(args, probe("trust")))
    assert commands.main(["trust", "list"]) == 0
    assert seen["trust"] is True


class _Fixed:
    """A parser that returns one namespace, with its command swapped for a probe."""

    def __init__(self, args, run) -> None:  # type: ignore[no-untyped-def]
        args.run = run
        self.args = args

    def parse_args(self, argv):  # type: ignore[no-untyped-def]
        return self.args


_LEAVE_PROBE = """
import atexit, sys
from hotpatch.cli.commands import main
atexit.register(lambda: sys.stderr.write("interpreter teardown ran\\n"))
sys.argv = ["hotpatch", *sys.argv[1:]]
sys.exit(main())
"""


def test_one_shot_commands_leave_without_teardown_and_with_every_output_written(built_fixtures, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A one-shot command run from the command line ends through os._exit once its output is flushed (the
    interpreter's teardown would free both images' tables object by object): its stdout, the JSON it wrote
    with --out and the package it built are complete; called as a function, main returns."""
    import json

    from hotpatch.package.format import loads

    case = built_fixtures / "body_change"
    baseline, patched = str(case / "baseline.dll"), str(case / "patched.dll")
    out, package = tmp_path / "diff.json", tmp_path / "patch.hpk"
    diff = subprocess.run([sys.executable, "-c", _LEAVE_PROBE, "diff", baseline, patched, "--json", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert diff.returncode == 0, diff.stderr
    assert "teardown" not in diff.stderr  # the atexit handler never ran: the process left through os._exit
    assert json.loads(diff.stdout) == json.loads(out.read_text())
    assert json.loads(diff.stdout)["functions"]
    build = subprocess.run([sys.executable, "-c", _LEAVE_PROBE, "build", baseline, patched, "-o", str(package),
                            "--json"], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0 and "teardown" not in build.stderr, build.stderr
    assert json.loads(build.stdout) and loads(package.read_bytes()).sites
    # in-process callers (tests, the demo) get the exit code back, with the interpreter left running
    called = subprocess.run([sys.executable, "-c", _LEAVE_PROBE.replace("main()", f"main({['info', baseline]!r})")],
                            capture_output=True, text=True, timeout=300)
    assert called.returncode == 0 and "interpreter teardown ran" in called.stderr, called.stderr
