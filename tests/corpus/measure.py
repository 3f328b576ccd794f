"""Run the product on every fix of the corpus: verdict, package, emulator, live apply and rollback.

    python -m tests.corpus.measure [--doc docs/CORPUS.md] [--only NAME]

For each fix (the step before it is the baseline, its own step the patched DLL):

1. the probes' values on both DLLs, from host.exe under Wine (the probe DLL
   imports the library, host.exe loads that step's DLL first with --load);
2. ``hotpatch diff``'s verdict and reasons;
3. when the verdict is HOTPATCH: ``hotpatch build``; ``hotpatch verify`` with the
   fix's emulator calls (tests/corpus/<lib>/<fix>.toml, ``verify``; calls naming a
   module go to the probe DLL, mapped beside the step with ``--with``); then a host
   running the step before with threads calling every probe, ``hotpatch apply``
   to it, the probes' values switching to the patched DLL's, ``hotpatch rollback``,
   and the values switching back.

The table goes to docs/CORPUS.md (``--doc``); tests/test_corpus.py asserts on the
same outcomes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from hotpatch.apply.emulator import EmulatorBackend
from hotpatch.diff.compare import diff
from hotpatch.errors import HotpatchError
from hotpatch.process.winehost import windows_path, wine_command, wine_env, wine_session
from hotpatch.verdict.rules import decide
from hotpatch.verify.calls import load_inputs, parse_inputs, run_calls
from tests.corpus.build import BuiltLibrary, build_corpus, default_out, host_exe
from tests.corpus.model import Fix

__all__ = ["Outcome", "Probes", "hotpatch_cli", "judge", "live_switch", "measure_fix", "probe_values"]

ROOT = Path(__file__).resolve().parents[2]
HOTPATCH = Path(sys.executable).with_name("hotpatch")
HOST_TIMEOUT = 120  # Wine under load starts slowly; an iteration of every probe is quick
SWITCH_TIMEOUT = 60
Probes = dict[str, int | None]  # probe -> value (None: the threads saw more than one value)


@dataclass
class Outcome:
    """What the product did with one fix."""

    fix: Fix
    verdict: str = ""
    reasons: tuple[str, ...] = ()
    before: Probes = field(default_factory=dict)
    after: Probes = field(default_factory=dict)
    build: str = "-"
    verify: str = "-"
    live: str = "-"
    rollback: str = "-"
    seconds: float = 0.0
    recorded_changes: tuple[str, ...] | None = None  # changed probes, when read back without their values

    @property
    def changed_probes(self) -> list[str]:
        """Probes whose stable value differs between the step before and this one."""
        if self.recorded_changes is not None:
            return list(self.recorded_changes)
        return sorted(p for p, v in self.after.items()
                      if v is not None and self.before.get(p) is not None and self.before[p] != v)

    @property
    def unsafe(self) -> bool:
        return self.fix.expected == "NEW_BASELINE" and self.verdict == "HOTPATCH"

    def to_json(self) -> dict[str, object]:
        return {"fix": self.fix.id, "cve": self.fix.cve, "expected": self.fix.expected, "verdict": self.verdict,
                "reasons": list(self.reasons), "build": self.build, "verify": self.verify, "live": self.live,
                "rollback": self.rollback, "changed_probes": self.changed_probes, "seconds": round(self.seconds, 1),
                "before": self.before, "after": self.after}


# ── the host ───────────────────────────────────────────────────────────────


def _host_argv(out: Path, probe: Path, step: Path, calls: list[str], *options: str) -> list[str]:
    return [*wine_command(), str(host_exe(out)), windows_path(probe), "--load", windows_path(step), *options, *calls]


#: threads and iterations of the run that decides each probe's value on a step: enough calls that a probe
#: whose value depends on the process (an unfixed libpng step reading out of bounds or freed memory) shows
#: more than one value here, rather than one by chance, then waited for in vain in the live run
PROBE_THREADS, PROBE_ITERATIONS = 4, 12


def probe_values(out: Path, prefix: Path, built: BuiltLibrary, step: Path) -> Probes:
    """Every probe's value on ``step``, called once and then by ``PROBE_THREADS`` threads
    ``PROBE_ITERATIONS`` times each; None for a probe the calls saw more than one value of."""
    probes = _probe_names(built)
    argv = _host_argv(out, built.probe, step, probes, "--threads", str(PROBE_THREADS),
                      "--iterations", str(PROBE_ITERATIONS))
    from tests.support.hosts import run_to_end  # once more if Wine ended the start without any output

    proc = run_to_end(argv, wine_env(prefix), timeout=HOST_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"host.exe on {step} exited with {proc.returncode}: {proc.stderr.strip()[-500:]}")
    values: Probes = {}
    for line in proc.stdout.splitlines():
        kind, *rest = line.split()
        if kind == "result":
            values[rest[0]] = int(rest[1])
        elif kind == "observed" and {int(v) for v in rest[1:] if v != "..."} - {values.get(rest[0])}:
            values[rest[0]] = None  # another value from another thread: not a stable observation
    return values


def _probe_names(built: BuiltLibrary) -> list[str]:
    text = built.library.probe_source.read_text()
    return [line.split("(")[0].split()[-1] for line in text.splitlines() if line.startswith("PROBE ")]


# ── the product ────────────────────────────────────────────────────────────


def judge(base: Path, patched: Path) -> tuple[str, tuple[str, ...]]:
    """The verdict and its reasons (``kind: subject``)."""
    verdict = decide(diff(base, patched))
    return verdict.status, tuple(f"{r.kind}: {r.subject}" for r in verdict.reasons)


def hotpatch_cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 600) -> tuple[int, str]:
    """Run the ``hotpatch`` command; its exit code and its output (stdout, then stderr).

    apply and rollback go through ``python -m hotpatch.apply.cli``, the same handlers on their own: the
    ``hotpatch`` command registers every group for them, and the rollout group's Dask import costs about
    10 s of CPU per call on this machine, twice per live run."""
    command = [sys.executable, "-m", "hotpatch.apply.cli"] if argv[0] in ("apply", "rollback") else [str(HOTPATCH)]
    proc = subprocess.run([*command, *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _verify_inputs(fix: Fix, base: Path, where: Path) -> Path | None:
    """The fix's emulator calls as a `hotpatch verify --inputs` file, each "$k" replaced by call k's value.

    An API that hands out a handle (luaL_newstate's lua_State) cannot be driven by
    calls with constant arguments; but the emulator is deterministic (docs/VERIFY.md),
    so the value a call returns on the baseline is the one both of verify's processes
    see when they make the same calls, as long as the calls before it are unchanged code.
    """
    if not fix.verify:
        return None
    def ref(arg: object) -> bool:
        return isinstance(arg, str) and arg.startswith("$")

    # calls up to the last one that takes a value run on the baseline, to learn the values
    needed = max((i for i, c in enumerate(fix.verify) if any(map(ref, c.get("args", ())))), default=0)
    calls: list[dict] = []
    values: list[int | None] = []
    if needed:  # an emulated process only when a call takes an earlier one's value
        backend = EmulatorBackend.load_process(base, _companions(fix, base))
        try:
            for raw in fix.verify[:needed]:
                calls.append({**raw, "args": [values[int(a[1:])] if ref(a) else a for a in raw.get("args", ())]})
                (result,) = run_calls(backend, parse_inputs({"calls": [calls[-1]]}))
                values.append(result.value)
        finally:
            backend.close()
    calls += [{**raw, "args": [values[int(a[1:])] if ref(a) else a for a in raw.get("args", ())]}
              for raw in fix.verify[needed:]]
    inputs = where / f"{fix.name}.inputs.json"
    inputs.write_text(json.dumps({"calls": calls}, indent=1))
    return inputs


def _companions(fix: Fix, base: Path) -> list[Path]:
    """The probe DLL when one of the fix's calls names a module (a probe): build.py puts the steps at
    <out>/<library>/<step>/<dll> and the probe DLL, which imports the step, at <out>/probes/<library>.dll."""
    if not any("module" in call for call in fix.verify):
        return []
    return [base.parents[2] / "probes" / f"{fix.library}.dll"]


def build_and_verify(fix: Fix, base: Path, patched: Path, where: Path) -> tuple[Path | None, str, str]:
    """``hotpatch build`` then ``hotpatch verify``; the package and a word on each."""
    where.mkdir(parents=True, exist_ok=True)
    package = where / f"{fix.name}.hpk"
    code, text = hotpatch_cli("build", str(base), str(patched), "-o", str(package), "--cve", fix.cve)
    if code != 0:
        return None, f"failed (exit {code}): {text.splitlines()[-1] if text else ''}", "-"
    try:
        inputs = _verify_inputs(fix, base, where)
    except HotpatchError as exc:  # a call that hands out the handle reaches something the emulator lacks
        return package, "ok", f"cannot: {exc}"
    if inputs is None:
        return package, "ok", f"not run: {fix.verify_note or 'no emulator calls reach the fix'}"
    companions = [arg for probe in _companions(fix, base) for arg in ("--with", str(probe))]
    code, text = hotpatch_cli("verify", str(package), "--baseline", str(base), "--patched", str(patched),
                              "--inputs", str(inputs), "--json", *companions)
    if code == 0:
        return package, "ok", f"equal ({len(fix.verify)} calls; {_baseline_alone(fix, base, inputs, json.loads(text))})"
    try:  # --json: the report, whose first difference is one sentence (docs/VERIFY.md)
        difference = json.loads(text)["first_difference"]["message"]
    except (ValueError, KeyError, TypeError):  # not a report: verify stopped (an emulator error, bad input)
        return package, "ok", f"cannot (exit {code}): {text.splitlines()[-1] if text else ''}"
    return package, "ok", f"differs (exit {code}): {difference}"


def _baseline_alone(fix: Fix, base: Path, inputs: Path, report: dict) -> str:
    """Whether the calls reach what the fix changes: the baseline without the package, against the patched
    return values verify saw (an unfixed step may also fault in the emulator, the CVE's own memory error)."""
    backend = EmulatorBackend.load_process(base, _companions(fix, base))
    try:
        results = run_calls(backend, load_inputs(inputs))
    except HotpatchError as exc:
        return f"the baseline alone stops: {str(exc)[:160]}"
    finally:
        backend.close()
    differing = [row["call"] for row, result in zip(report["calls"], results) if result.value != row["patched"]]
    if not differing:
        return "the baseline alone computes the same"
    return f"the baseline alone differs in {len(differing)}: {', '.join(differing)}"


class _RunningHost:
    """host.exe on a step with threads calling every probe until stdin closes; its lines kept."""

    def __init__(self, out: Path, prefix: Path, built: BuiltLibrary, step: Path) -> None:
        from tests.support.hosts import Host  # the fixtures' reader of host.exe's output

        self.calls = _probe_names(built)
        extra = ("--load", windows_path(step))
        self.host = Host(prefix, built.probe, self.calls, threads=4, extra=extra)

    def wait_for(self, values: Probes, timeout: float = SWITCH_TIMEOUT, unlike: Probes | None = None) -> bool:
        """Until one interval saw only ``values`` for every stable probe, and, for each probe of ``unlike``
        whose value here is None (the step's output varies), an interval with anything but that value."""
        wanted = {p: v for p, v in values.items() if v is not None}
        varying = {p: v for p, v in (unlike or {}).items() if v is not None and values.get(p) is None}
        deadline = time.monotonic() + timeout
        mark = self.host.mark()
        while time.monotonic() < deadline and not self.ended:
            seen = self._observed(mark)
            if all((p, (v,)) in seen for p, v in wanted.items()) and \
                    all(any(q == p and got != (v,) for q, got in seen) for p, v in varying.items()):
                return True
            time.sleep(0.1)
        return False

    def _observed(self, start: int) -> set[tuple[str, tuple[int, ...] | None]]:
        """(probe, values of one interval) since line ``start``; None for an interval with too many values."""
        out: set[tuple[str, tuple[int, ...] | None]] = set()
        for line in self.host.lines[start:]:
            kind, *rest = line.split() or [""]
            if kind == "observed":
                out.add((rest[0], None if "..." in rest else tuple(int(v) for v in rest[1:])))
        return out

    @property
    def ended(self) -> bool:
        """The host's output has ended: it exited (or died) by itself."""
        return self.host.proc.poll() is not None or self.host.lines[-1:] == ["<eof>"]

    def stop(self) -> tuple[int, str]:
        """Its exit code and the end of what it wrote (stdout's last lines, then stderr's)."""
        code, stderr = self.host.stop()
        tail = [line for line in self.host.lines[-4:] if line != "<eof>"]
        return code, " | ".join([*tail, *stderr.strip().splitlines()[-3:]])[-400:]


def live_switch(out: Path, prefix: Path, built: BuiltLibrary, base: Path, package: Path,
                before: Probes, after: Probes) -> tuple[str, str]:
    """Apply ``package`` to a running multi-threaded host and roll it back; a word on each."""
    # a state directory of its own: Wine reuses small pids, and a journal left by an earlier host must not
    # meet this one
    state = tempfile.mkdtemp(prefix="state-", dir=package.parent)
    env = {"HOTPATCH_STATE": state, "HOTPATCH_WINEPREFIX": str(prefix)}
    # Only the probes the fix changes are waited for: the others keep their value. A probe whose value on
    # the step before depends on the process (the unfixed code reads out of bounds or freed memory) and is
    # stable after the fix switches too: to the fixed value, then back to anything else.
    changed = sorted(p for p in after if after[p] is not None and before.get(p, 0) != after[p] and p in before)
    before = {p: before[p] for p in changed}
    after = {p: after[p] for p in changed}
    try:
        running = _RunningHost(out, prefix, built, base)
    except AssertionError as exc:  # host.exe did not start (its output is in the message)
        return f"host did not start: {str(exc)[:200]}", "-"
    try:
        live, back = _apply_and_rollback(running, package, env, before, after)
    finally:
        # The host ends only when its stdin closes: one that ended before has died, whatever its exit code (a
        # Wine process whose wineserver went away, e.g. `wineserver -k` of another session, exits with 0).
        died = running.ended
        code, output = running.stop()
    if code != 0 or died:  # a host that died is the run's failure, whatever the commands said: never retried
        note = f"host {'died' if died else 'exited'} with {code}: {output}"
        if back == "-":
            live = f"{live}; {note}"
        else:
            back = f"{back}; {note}"
    return live, back


def _apply_and_rollback(running: _RunningHost, package: Path, env: dict[str, str],
                        before: Probes, after: Probes) -> tuple[str, str]:
    if not running.wait_for(before, unlike=after):
        return "host never showed the baseline's values", "-"
    pid = str(running.host.pid)
    code, text = hotpatch_cli("apply", str(package), "--pid", pid, "--allow-unsigned", env=env)
    if code != 0:
        return f"apply failed (exit {code}): {text.splitlines()[-1] if text else ''}", "-"
    switched = running.wait_for(after)
    changed = ", ".join(after)
    live = (f"switched ({changed})" if changed else "applied (no probe output changes)") if switched \
        else "applied, but the probes never showed the patched values"
    code, text = hotpatch_cli("rollback", "--pid", pid, env=env)
    if code != 0:
        return live, f"rollback failed (exit {code}): {text.splitlines()[-1] if text else ''}"
    back = ("switched back" if changed else "rolled back") if running.wait_for(before, unlike=after) \
        else "rolled back, but the probes never showed the baseline's values again"
    return live, back


def measure_fix(out: Path, prefix: Path, built: BuiltLibrary, fix: Fix, values: dict[Path, Probes]) -> Outcome:
    start = time.monotonic()
    base, patched = built.pair(fix)
    outcome = Outcome(fix, before=values[base], after=values[patched])
    outcome.verdict, outcome.reasons = judge(base, patched)
    if outcome.verdict == "HOTPATCH":
        package, outcome.build, outcome.verify = build_and_verify(fix, base, patched, out / "packages" / fix.library)
        if package is not None:
            outcome.live, outcome.rollback = live_switch(out, prefix, built, base, package,
                                                         outcome.before, outcome.after)
    outcome.seconds = time.monotonic() - start
    return outcome


def measure_all(out: Path | None = None, only: str | None = None) -> tuple[list[Outcome], dict[str, float]]:
    out = (out or default_out()).resolve()
    times: dict[str, float] = {}
    start = time.monotonic()
    libraries = build_corpus(out)
    times["build"] = time.monotonic() - start
    outcomes = []
    # the test suite's prefix (tests/conftest.py): one Wine prefix to set up, not two
    fixtures = Path(os.environ.get("HOTPATCH_FIXTURES") or ROOT / "build" / "fixtures")
    with wine_session(fixtures.resolve() / "wineprefix") as prefix:
        start = time.monotonic()
        for built in libraries:
            fixes = [f for f in built.library.fixes if only in (None, f.name, f.library)]
            if not fixes:
                continue
            values = {step: probe_values(out, prefix, built, step) for step in built.steps}
            for fix in fixes:
                outcomes.append(measure_fix(out, prefix, built, fix, values))
                print(json.dumps(outcomes[-1].to_json()), file=sys.stderr, flush=True)
        times["run"] = time.monotonic() - start
    return outcomes, times


def verdicts_only(out: Path | None = None) -> list[dict[str, object]]:
    """Each fix's verdict and reasons, with whichever ``hotpatch`` is imported (e.g. another branch's)."""
    rows = []
    for built in build_corpus(out):
        for fix in built.library.fixes:
            verdict, reasons = judge(*built.pair(fix))
            rows.append({"fix": fix.id, "expected": fix.expected, "verdict": verdict, "reasons": list(reasons)})
    return rows


def main(argv: list[str] | None = None) -> int:
    from tests.corpus.report import write_doc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="build directory (default build/corpus)")
    parser.add_argument("--doc", type=Path, default=None, help="write the table there (docs/CORPUS.md)")
    parser.add_argument("--json", type=Path, default=None, help="write the outcomes as JSON there")
    parser.add_argument("--only", help="one fix or one library")
    parser.add_argument("--verdicts-only", action="store_true",
                        help="only the verdicts, as JSON (--json): see tests.corpus.report --compare")
    args = parser.parse_args(argv)
    if args.verdicts_only:
        rows = verdicts_only(args.out)
        text = json.dumps({"hotpatch": str(Path(diff.__code__.co_filename).parent), "verdicts": rows}, indent=1)
        if args.json:
            args.json.write_text(text)
        print(text)
        return 0
    outcomes, times = measure_all(args.out, args.only)
    if args.json:
        args.json.write_text(json.dumps({"outcomes": [o.to_json() for o in outcomes], "times": times}, indent=1))
    if args.doc:
        write_doc(args.doc, outcomes, times)
    print(f"build {times['build']:.0f} s, run {times['run']:.0f} s", file=sys.stderr)
    return 1 if any(o.unsafe for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
