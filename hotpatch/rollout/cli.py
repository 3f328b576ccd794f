"""The ``hotpatch rollout`` command.

    hotpatch rollout PLAN [--db DB] [--scheduler ADDR] [--tls-ca-file CA --tls-cert CERT --tls-key KEY]
                          [--json] [--report FILE] [--no-live]
    hotpatch rollout status [ID] [--db DB] [--json]
    hotpatch rollout resume [ID] [--db DB] [--scheduler ADDR] [--json]
    hotpatch rollout abort [ID] [--db DB] [--scheduler ADDR] [--json]
    hotpatch rollout simulate [--plan PLAN] [--hosts N] [--groups G] [--window W] [--bad-share X]
                              [--vanish-share Y] [--json]

Exit codes: 0 completed (or aborted, or waiting for a window); 1 halted,
completed with failures, or refused (another orchestrator holds the
rollout); 2 bad plan or input (one line naming the field; nothing applied).
The database defaults to ``$HOTPATCH_STATE/rollouts.sqlite``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from ..apply.journal import default_state_dir
from ..errors import PlanError
from ..jsonio import print_answer
from .executor_sim import SimConfig, make_fleet, simulate, simulate_plan
from .plan import FailurePolicy, WaveSpec, load_plan
from .tls import TLS_FIELDS, parse_tls
from .view import LiveView, report_table

__all__ = ["add_rollout_commands"]

VERBS = ("status", "resume", "abort", "simulate")
EXIT = {"completed": 0, "aborted": 0, "waiting": 0, "running": 0}


def _emit(args: argparse.Namespace, document: dict[str, Any]) -> None:
    if getattr(args, "report", None):
        Path(args.report).write_text(json.dumps(document, indent=2, default=str) + "\n")
    if args.json:
        print_answer(document, (), True, default=str)
    else:
        Console(width=160).print(report_table(document))


#: the simulation's own settings when no plan is given (a plan brings its own)
SIM_DEFAULTS = {"window": "daily 01:00-05:00", "soak": 900.0, "max_in_flight": 5, "max_failed": 0}


def _simulate(args: argparse.Namespace) -> int:
    config = SimConfig(bad_share=args.bad_share, vanish_share=args.vanish_share, seed=args.seed,
                       check_window_left=not args.ignore_window_left)
    start_at = datetime(2026, 3, 2, tzinfo=UTC).timestamp()
    horizon = args.days * 86400
    if args.plan:
        for name in SIM_DEFAULTS:
            if getattr(args, name) is not None:
                raise PlanError(f"--{name.replace('_', '-')}: the plan sets it; leave it out with --plan")
        figures = simulate_plan(load_plan(args.plan), config, start=start_at, horizon=horizon, hosts=args.hosts,
                                groups=args.groups)
    else:
        given = {name: getattr(args, name) for name in SIM_DEFAULTS}
        settings = {name: default if given[name] is None else given[name] for name, default in SIM_DEFAULTS.items()}
        hosts = make_fleet(args.hosts or 10000, groups=args.groups, window=settings["window"])
        waves = (WaveSpec("canary", count=1), WaveSpec("ten percent", percent=10), WaveSpec("rest", rest=True))
        figures = simulate(hosts, waves, replace(config, soak=settings["soak"]), start=start_at, horizon=horizon,
                           max_in_flight=settings["max_in_flight"],
                           failure=FailurePolicy("host", settings["max_failed"]))
    print_answer(figures, (f"{key:>28}: {value}" for key, value in figures.items()), args.json)
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    if args.what == "simulate":
        return _simulate(args)
    # here, not at the top: Dask's import costs ~1 s and every other command's parser imports this module
    from .orchestrator import Options, abort, resume, start, status

    db = Path(args.db) if args.db else default_state_dir() / "rollouts.sqlite"
    if args.what == "status":
        _emit(args, status(args.rollout_id, db))
        return 0
    tls = parse_tls({name: getattr(args, f"tls_{name}") for name in TLS_FIELDS}, Path.cwd(), "--tls-")
    live = not args.json and not args.no_live and sys.stderr.isatty()
    view = LiveView() if live else None
    options = Options(db=db, scheduler=args.scheduler, on_change=view, tls=tls)
    with view if view is not None else contextlib.nullcontext():
        if args.what in ("resume", "abort"):
            rollout_id = args.rollout_id or _latest(db)
            final = (resume if args.what == "resume" else abort)(rollout_id, options)
        else:
            rollout_id, final = start(args.what, options)
    _emit(args, status(rollout_id, db))
    return EXIT.get(final, 1)


def _latest(db: Path) -> str:
    from .orchestrator import status

    return str(status(None, db)["id"])


def add_rollout_commands(subparsers: Any) -> None:
    """Register ``hotpatch rollout``."""
    rollout = subparsers.add_parser("rollout", help="roll a package out over a fleet in waves (Dask)",
                                    description=__doc__.split("\n\n")[1] if __doc__ else None,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    rollout.add_argument("what", metavar="PLAN|status|resume|abort|simulate",
                         help="a plan file (TOML) to start, or one of the verbs")
    rollout.add_argument("rollout_id", nargs="?", metavar="ID", help="the rollout (default: the latest)")
    rollout.add_argument("--db", help="the state database (default $HOTPATCH_STATE/rollouts.sqlite)")
    rollout.add_argument("--scheduler", help="Dask scheduler address (default: the plan's, else a local cluster)")
    rollout.add_argument("--tls-ca-file", dest="tls_ca_file", metavar="CA",
                         help="Dask TLS: the CA certificate (with --tls-cert and --tls-key; default: the plan's [tls])")
    rollout.add_argument("--tls-cert", dest="tls_cert", metavar="CERT", help="Dask TLS: the orchestrator's certificate")
    rollout.add_argument("--tls-key", dest="tls_key", metavar="KEY", help="Dask TLS: its private key")
    rollout.add_argument("--json", action="store_true")
    rollout.add_argument("--report", metavar="FILE", help="also write the final report (JSON) here")
    rollout.add_argument("--no-live", action="store_true", help="no live view")
    sim = rollout.add_argument_group("simulate")
    sim.add_argument("--plan", help="play this plan's waves, limits, soak, failure policy and inventory")
    sim.add_argument("--hosts", type=int, help="a made-up fleet of this many hosts (default 10000; with --plan: "
                     "instead of its inventory, with its default window)")
    sim.add_argument("--groups", type=int, default=50)
    sim.add_argument("--window", help=f"without --plan (default {SIM_DEFAULTS['window']!r})")
    sim.add_argument("--days", type=float, default=30)
    sim.add_argument("--soak", type=float, help="seconds, without --plan (default 900)")
    sim.add_argument("--max-in-flight", type=int, help="per group, without --plan (default 5)")
    sim.add_argument("--max-failed", type=int, help="without --plan (default 0)")
    sim.add_argument("--ignore-window-left", action="store_true",
                     help="start a host whenever its window is open, however little of it is left")
    sim.add_argument("--bad-share", type=float, default=0.0)
    sim.add_argument("--vanish-share", type=float, default=0.0)
    sim.add_argument("--seed", type=int, default=1)
    rollout.set_defaults(run=cmd_rollout)
