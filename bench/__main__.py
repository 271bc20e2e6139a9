"""
``python -m bench``: notifyd against a naive LISTEN/NOTIFY pipeline, same
machine, same run, same load; writes ``docs/performance.md`` and
``bench/results.json``.

Phases (each server in turn, then the profile and the trigger cost):

1. start the server (notifyd: ``python -m notifyd serve``; naive:
   ``python -m bench.naive_server``) and client processes;
2. open the sessions (full: 10,000; quick: 1,000) and read the server's RSS
   before and after;
3. notifyd only: announcements to every session;
4. single-row ramp, then 100-row ramp, until a step fails;
5. session-open time (notifyd: a user with 100,000 messages);
6. notifyd once more under cProfile at its highest single-row step;
7. INSERT throughput with and without the triggers (no server running);
8. the push pipeline (``bench/phases/push.py``): what one single-row commit
   costs Postgres with each server's table and trigger, piece by piece; then
   pgbench writers at paced rates into each server with 1,000 and 10,000
   sessions, isolated messages, and the commit ceiling of notifyd's table
   with and without its triggers.

With matplotlib installed (the ``bench`` extra), PNG plots are written next
to the report and embedded in it.

This module reads the command line, measures the machine's floors, runs the
phases (``bench/run.py``) against a database (``bench/rig.py``) and writes
the results and the report (``bench/report/``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import report
from .control import ROOT, raise_nofile
from .measure import fanout_floor, loopback_send_cost, source_fingerprint
from .plan import make_plan
from .progress import elapsed, progress
from .report.plots import write_plots
from .rig import PG_SETTINGS, postgres
from .run import interrupt_on_sigterm, run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: shorter steps, one run per case, the push pipeline with 1,000 sessions only",
    )
    parser.add_argument(
        "--users", type=int, default=1000, help="online users messages go to (default 1000)"
    )
    parser.add_argument(
        "--dsn",
        help="use this PostgreSQL (superuser, scratch database: the bench TRUNCATEs the message "
        "tables) instead of an embedded one",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--report-only", action="store_true", help="re-render --out from --results")
    parser.add_argument(
        "--push-only",
        action="store_true",
        help="run only the push-pipeline phases; the other figures are kept from --results",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the child processes' logs")
    parser.add_argument(
        "--notifyd-env",
        action="append",
        default=[],
        metavar="NOTIFYD_X=VALUE",
        help="a setting for the notifyd server under test (repeatable), e.g. NOTIFYD_EVENT_LOOP=asyncio",
    )
    return parser


def _command(args: argparse.Namespace, notifyd_env: dict[str, str]) -> str:
    """
    The command line that reproduces this run, for the report.
    """
    return "python -m bench" + "".join(
        f" {a}"
        for a in (["--quick"] if args.quick else [])
        + (["--push-only"] if args.push_only else [])
        + ([f"--users {args.users}"] if args.users != 1000 else [])
        + [f"--notifyd-env {key}={value}" for key, value in notifyd_env.items()]
    )


def _resilience(results: Path) -> dict[str, Any]:
    """
    The soak's and the restart storm's results beside ``results``, when
    their runs have written them.
    """
    found: dict[str, Any] = {}
    for key, name in (("soak", "soak.json"), ("storm", "restart-storm.json")):
        path = results.parent / name
        if path.is_file():
            found[key] = json.loads(path.read_text())
    return found


def main() -> int:
    if sys.argv[1:2] == ["soak"]:
        from .soak.run import main as soak

        return soak(sys.argv[2:])
    if sys.argv[1:2] == ["scale"]:
        from .scale.run import main as scale

        return scale(sys.argv[2:])
    parser = _parser()
    args = parser.parse_args()
    if args.users < 100:
        parser.error("--users must be at least 100 (100-row statements go to distinct users)")
    if args.report_only:
        results = json.loads(args.results.read_text())
        args.out.write_text(
            report.render(results, write_plots(results, args.out), **_resilience(args.results))
        )
        return 0
    notifyd_env = dict(item.partition("=")[::2] for item in args.notifyd_env)
    if any(not key.startswith("NOTIFYD_") for key in notifyd_env):
        parser.error("--notifyd-env takes NOTIFYD_NAME=VALUE")
    if args.push_only and not args.results.is_file():
        parser.error(f"--push-only keeps the other figures of {args.results}, which does not exist")
    limit = raise_nofile()
    plan = make_plan(args.quick, args.users)
    if not args.push_only:
        floor = loopback_send_cost()
        fanout = fanout_floor(connections=plan.sessions, readers=plan.client_procs)
    source = source_fingerprint()
    command = _command(args, notifyd_env)
    logs = Path(tempfile.mkdtemp(prefix="notifyd-bench-"))
    progress(f"{plan.mode} run, logs in {logs}, RLIMIT_NOFILE {limit}")
    ok = False
    interrupt_on_sigterm()
    try:
        with postgres(args.dsn) as (dsn, pg_pid):
            results = asyncio.run(run(plan, dsn, pg_pid, logs, notifyd_env, args.push_only))
            results["push"]["measured"] = {
                "mode": plan.mode,
                "date": results["machine"]["date"],
                "command": command,
                "notifyd_env": notifyd_env,
                "load_average_at_start": results["machine"]["load_average_at_start"],
                "runtime_s": elapsed(),
                "notifyd_source": source,
            }
            if args.push_only:
                # The other phases' figures stay those of the run that made them.
                results = {**json.loads(args.results.read_text()), "push": results["push"]}
            else:
                results["machine"]["loopback_send"] = floor
                results["machine"]["fanout_floor"] = fanout
                results["notifyd_source"] = source
                if source_fingerprint() != source:
                    results["notifyd_source"]["changed_during_run"] = True
                    progress("warning: notifyd's sources changed during the run")
                results["command"] = command
                results["notifyd_env"] = notifyd_env
                results["runtime_s"] = elapsed()
                results["postgres"] = (
                    "external (--dsn)" if args.dsn else f"embedded, settings {PG_SETTINGS}"
                )
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1, default=str) + "\n")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                report.render(results, write_plots(results, args.out), **_resilience(args.results))
            )
            progress(f"done in {elapsed():.0f}s: {args.out} and {args.results}")
            ok = True
    except (KeyboardInterrupt, asyncio.CancelledError):
        progress("interrupted; cleaning up")
    finally:
        if ok and not args.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            progress(f"logs kept in {logs}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
