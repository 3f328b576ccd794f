"""Release trains over real wheels: numpy 2.1.0 -> 2.1.3 and cryptography 43.0.0 -> 43.0.3.

Each release is every native module of the win_amd64 wheel (numpy: every
.pyd and the OpenBLAS DLL, whose file name carries a hash, so its module key
drops it). The manifests are written next to the output (they name files in
the wheel cache, so they are not part of the project). Run as a script to
run both trains and redraw their calendars into docs/::

    python tests/support/realtrains.py [--out build/trains] [--docs docs]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__:
    from .realbins import ensure_wheel
else:  # run as a script: tests/support/ is sys.path[0], the project root is two folders up
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.support.realbins import ensure_wheel

__all__ = ["SERIES", "main", "write_manifest"]

#: (version, PyPI release date) of each series
SERIES: dict[str, tuple[tuple[str, str], ...]] = {
    "numpy": (("2.1.0", "2024-08-18"), ("2.1.1", "2024-09-03"), ("2.1.2", "2024-10-05"), ("2.1.3", "2024-11-02")),
    "cryptography": (("43.0.0", "2024-07-20"), ("43.0.1", "2024-09-03"), ("43.0.3", "2024-10-18")),
}
_HASHED_DLL = re.compile(r"^(?P<stem>.+?)-[0-9a-f]{32}\.dll$")


def _modules(root: Path, name: str) -> dict[str, Path]:
    """Module key -> file: every .pyd, and for numpy the OpenBLAS DLL under a key without its hash."""
    out = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*.pyd"))}
    if name == "numpy":
        for dll in sorted((root / "numpy.libs").glob("libscipy_openblas64_-*.dll")):
            match = _HASHED_DLL.match(dll.name)
            assert match, dll.name
            out[f"numpy.libs/{match['stem']}.dll"] = dll
    return out


def write_manifest(name: str, folder: Path) -> Path:
    """Download the series' wheels if needed and write its train manifest into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"# {name}: every native module of the win_amd64 wheels (tests/support/realtrains.py)", "",
             "[train]", f'name = "{name}"', "", "[policy]", f'first_baseline = "{SERIES[name][0][0]}"',
             "cadence_months = 3", ""]
    for version, date in SERIES[name]:
        lines += ["[[release]]", f'name = "{version}"', f"date = {date}", "[release.modules]"]
        for key, path in _modules(ensure_wheel(name, version), name).items():
            lines.append(f'"{key}" = "{path.resolve().as_posix()}"')
        lines.append("")
    manifest = folder / f"{name}.toml"
    manifest.write_text("\n".join(lines))
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    from hotpatch.train import load_manifest, run_train
    from hotpatch.train.cli import print_train

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/trains"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--series", choices=sorted(SERIES), action="append")
    args = parser.parse_args(argv)
    for name in args.series or sorted(SERIES):
        manifest = write_manifest(name, args.out)
        result = run_train(load_manifest(manifest), args.out / name)
        print_train(result)
        shutil.copyfile(args.out / name / "calendar.svg", args.docs / f"train-{name}.svg")
        print(f"calendar: {args.docs / f'train-{name}.svg'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
