"""The wheel `pip wheel .` builds is complete: it installs into a fresh venv and the commands run from it.

An editable install finds every module through the source tree, so a subpackage missing from the
wheel's package list would only show up for users of the wheel; this test builds one and uses it.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import hotpatch

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _run(argv: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HOTPATCH_PURE_PYTHON")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(work / "dist"),
                  str(ROOT)], cwd=work)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (work / "dist").glob("hotpatch-*.whl")
    venv.create(work / "venv", with_pip=True)
    python = work / "venv" / "bin" / "python"
    installed = _run([str(python), "-m", "pip", "install", "-q", str(wheel)], cwd=work)
    assert installed.returncode == 0, installed.stderr[-2000:]
    return python


def _source_modules() -> set[str]:
    return {info.name for info in pkgutil.walk_packages(hotpatch.__path__, "hotpatch.")}


def test_wheel_holds_every_module_of_the_source_tree(wheel_venv: Path, tmp_path: Path) -> None:
    code = ("import hotpatch, pkgutil, importlib, json\n"
            "names = sorted(i.name for i in pkgutil.walk_packages(hotpatch.__path__, 'hotpatch.'))\n"
            "for n in names:\n"
            "    importlib.import_module(n)\n"
            "print(hotpatch.__file__)\n"
            "print(json.dumps(names))\n")
    listed = _run([str(wheel_venv), "-c", code], cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-2000:]
    location, names = listed.stdout.strip().splitlines()
    assert not Path(location).resolve().is_relative_to(ROOT), "the wheel's package was not the one imported"
    import json

    assert _source_modules() <= set(json.loads(names))


def test_commands_run_from_the_wheel(wheel_venv: Path, built_fixtures: Path, tmp_path: Path) -> None:
    hotpatch_exe = wheel_venv.parent / "hotpatch"
    case = built_fixtures.resolve() / "body_change"
    version = _run([str(hotpatch_exe), "--version"], cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("hotpatch ")
    info = _run([str(hotpatch_exe), "info", str(case / "baseline.dll"), "--json"], cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    package = tmp_path / "fix.hpk"
    build = _run([str(hotpatch_exe), "build", str(case / "baseline.dll"), str(case / "patched.dll"),
                  "-o", str(package)], cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    inspect = _run([str(hotpatch_exe), "inspect", str(package), "--json"], cwd=tmp_path)
    assert inspect.returncode == 0 and '"sites"' in inspect.stdout, inspect.stderr
    agent = wheel_venv.parent.parent / "lib"
    assert list(agent.glob("python3*/site-packages/hotpatch/bin/hotpatch-agent.exe")), "the agent is not in the wheel"
