"""
``python -m bench scale``: how far one notifyd and one database go. Two
phases on an embedded PostgreSQL (``track_commit_timestamp`` on):

1. sessions: 100,000 sessions (``--sessions``) on one notifyd process,
   opened from several client processes and loopback source addresses; RSS
   per session, time to open them, CPU while idle, an announcement to all
   of them, commit-to-receipt latency at ``--rate`` commits/s;
2. instances: 0, 1, 2 and 4 notifyd processes on the database (and, where
   this notifyd has them, the same reading from a streaming standby, and
   one process with that many workers) at ``--rate`` commits/s; Postgres
   CPU per committed message.

The figures go into ``bench/results.json`` under ``scale`` (the other
figures there, and a phase not run, are kept; each phase says which run it
comes from) and ``docs/performance.md`` is re-rendered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg

from notifyd.db import schema_sql
from notifyd.demo.embedded import EmbeddedPostgres
from notifyd.settings import Settings

from ..accounting import commit_clock
from ..control import ROOT, raise_nofile
from ..measure import machine, source_fingerprint
from ..phases.push import seed_table
from ..plan import NOTIFYD_TABLE, make_plan
from ..progress import elapsed, progress
from ..report import render
from ..report.plots import write_plots
from ..rig import PG_SETTINGS, Rig, postmaster_pid
from ..run import interrupt_on_sigterm
from .instances import InstancesPlan, Variant, instances_phase
from .sessions import SessionsPlan, sessions_phase

__all__ = ["main"]

PHASES = ("sessions", "instances")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=PHASES, help="run one phase; the other's figures are kept")
    p.add_argument("--sessions", type=int, default=100_000, help="(default 100000)")
    p.add_argument("--client-procs", type=int, default=4, help="client processes (default 4)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="NOTIFYD_WORKERS of the instance holding the sessions (default 1: one process)",
    )
    p.add_argument("--stages", type=int, default=4, help="sessions open in N steps (default 4)")
    p.add_argument(
        "--concurrency", type=int, default=50, help="handshakes in flight per client process (50)"
    )
    p.add_argument("--idle-s", type=float, default=60.0, help="idle window (default 60 s)")
    p.add_argument("--rate", type=int, default=1000, help="commits/s (default 1000)")
    p.add_argument("--reps", type=int, default=3, help="runs per case (default 3)")
    p.add_argument(
        "--instances", default="0,1,2,4", help="instance counts, 0 = the writes alone (0,1,2,4)"
    )
    p.add_argument("--instance-users", type=int, default=1000, help="(default 1000)")
    p.add_argument("--seconds", type=float, default=10.0, help="per paced run (default 10)")
    p.add_argument("--no-replica", action="store_true", help="skip the standby variant")
    p.add_argument(
        "--deployments",
        help="only these (instances, instances-reads-on-a-standby, workers), kept beside the "
        "figures of all",
    )
    p.add_argument(
        "--notifyd-env",
        action="append",
        default=[],
        metavar="NOTIFYD_X=VALUE",
        help="a setting for every notifyd under test (repeatable)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results.json")
    p.add_argument("--keep-logs", action="store_true")
    return p


def _variants(standby_dsn: str | None) -> list[Variant]:
    """
    The deployments this notifyd can be measured in.
    """
    fields = Settings.model_fields
    variants = [Variant("instances")]
    if standby_dsn is not None and "read_dsn" in fields:
        variants.append(
            Variant("instances, reads on a standby", replica=True,
                    settings={"NOTIFYD_READ_DSN": standby_dsn})
        )  # fmt: skip
    if "workers" in fields:
        variants.append(Variant("workers", workers=True))
    return variants


async def _scale(
    args: argparse.Namespace, primary: EmbeddedPostgres, standby: EmbeddedPostgres | None,
    logs: Path, notifyd_env: dict[str, str], limit: int,
) -> dict[str, Any]:  # fmt: skip
    plan = replace(
        make_plan(False, 1000), sessions=args.sessions, pipeline_s=args.seconds,
        announcements=3, calm_budget_s=60.0,
    )  # fmt: skip
    rig = Rig(plan, primary.dsn, postmaster_pid(primary), logs, notifyd_env)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    loop.add_signal_handler(signal.SIGTERM, main.cancel)
    result: dict[str, Any] = {}
    try:
        rig.admin = await asyncpg.connect(primary.dsn)
        await rig.db.execute(schema_sql())
        await rig.db.execute(f"TRUNCATE {NOTIFYD_TABLE}, t_message_event, t_message_receipt")
        await seed_table(rig)
        clock = await commit_clock(rig.db)
        result["postgres"] = await rig.db.fetchval("SHOW server_version")
        if args.only in (None, "sessions"):
            sessions = SessionsPlan(
                sessions=args.sessions, limit=limit, workers=args.workers,
                client_procs=args.client_procs, stages=args.stages,
                concurrency=args.concurrency, idle_s=args.idle_s, rate=args.rate, reps=args.reps,
            )  # fmt: skip
            load0 = os.getloadavg()
            # One process and one instance of workers are kept side by side.
            key = "sessions" if args.workers == 1 else "sessions_workers"
            result[key] = await sessions_phase(rig, sessions, clock)
            result[key]["load_average"] = [round(x, 2) for x in (*load0, *os.getloadavg())]
        if args.only in (None, "instances"):
            counts = tuple(int(x) for x in args.instances.split(","))
            instances = InstancesPlan(
                counts=counts, rate=args.rate, users=args.instance_users, reps=args.reps,
                seconds=args.seconds,
            )  # fmt: skip
            variants = _variants(None if standby is None else standby.dsn)
            # A run of only some deployments is kept beside the run of all.
            key = "instances"
            if args.deployments:
                wanted = args.deployments.split(",")
                variants = [v for v in variants if v.slug in wanted]
                key = "instances_" + "_".join(v.slug for v in variants)
            progress(f"instances {counts} at {args.rate}/s: {', '.join(v.name for v in variants)}")
            load0 = os.getloadavg()
            result[key] = await instances_phase(
                rig,
                instances,
                variants,
                clock,
                None if standby is None else postmaster_pid(standby),
            )
            result[key]["load_average"] = [round(x, 2) for x in (*load0, *os.getloadavg())]
            if not args.deployments:
                result[key]["not_measured"] = _not_measured(variants, args.no_replica)
    finally:
        await rig.close()
        loop.remove_signal_handler(signal.SIGTERM)
        interrupt_on_sigterm()
    return result


def _not_measured(variants: list[Variant], no_replica: bool) -> list[str]:
    """
    The deployments left out of this run, and why.
    """
    names = {v.name for v in variants}
    fields = Settings.model_fields
    out = []
    if not any(v.replica for v in variants):
        out.append(
            "reads on a standby: "
            + ("--no-replica" if no_replica or "read_dsn" in fields else "this notifyd has no NOTIFYD_READ_DSN")
        )  # fmt: skip
    if "workers" not in names:
        out.append("workers: this notifyd has no NOTIFYD_WORKERS")
    return out


def _command(argv: list[str]) -> str:
    return " ".join(["python -m bench scale", *argv])


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if not args.results.is_file():
        parser().error(f"the scale figures join {args.results}, which does not exist")
    if args.workers > 1 and "workers" not in Settings.model_fields:
        parser().error("--workers: this notifyd has no NOTIFYD_WORKERS")
    notifyd_env = dict(item.partition("=")[::2] for item in args.notifyd_env)
    if any(not key.startswith("NOTIFYD_") for key in notifyd_env):
        parser().error("--notifyd-env takes NOTIFYD_NAME=VALUE")
    limit = raise_nofile()
    logs = Path(tempfile.mkdtemp(prefix="notifyd-scale-"))
    progress(f"scale run, logs in {logs}, RLIMIT_NOFILE {limit}")
    measured = {
        "machine": machine(),
        "command": _command(argv),
        "notifyd_env": notifyd_env,
        "notifyd_source": source_fingerprint(),
        "rlimit_nofile": limit,
    }
    want_standby = (
        args.only != "sessions" and not args.no_replica and "read_dsn" in Settings.model_fields
    )
    primary = EmbeddedPostgres(settings=PG_SETTINGS)
    standby: EmbeddedPostgres | None = None
    ok = False
    interrupt_on_sigterm()
    try:
        progress("starting embedded PostgreSQL")
        primary.start(timeout=120)
        if want_standby:
            progress("making a streaming standby of it")
            standby = EmbeddedPostgres.standby_of(primary)
            standby.start(timeout=120)
        scale = asyncio.run(_scale(args, primary, standby, logs, notifyd_env, limit))
        measured["runtime_s"] = elapsed()
        measured["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        results = json.loads(args.results.read_text())
        for phase in scale.values():
            if isinstance(phase, dict):
                phase["measured"] = measured
        # A phase not run keeps the figures (and the description) of its last run.
        results["scale"] = {**results.get("scale", {}), **scale}
        args.results.write_text(json.dumps(results, indent=1, default=str) + "\n")
        args.out.write_text(render(results, write_plots(results, args.out)))
        progress(f"done in {elapsed():.0f}s: {args.out} and {args.results}")
        ok = True
    except (KeyboardInterrupt, asyncio.CancelledError):
        progress("interrupted; cleaning up")
    finally:
        if standby is not None:
            with contextlib.suppress(Exception):
                standby.cleanup()
        primary.cleanup()
        if ok and not args.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            progress(f"logs kept in {logs}")
    return 0 if ok else 1
