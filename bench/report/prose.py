"""
The report's prose: where the time goes for the missed targets, read against
the machine's floors, and how everything was measured.
"""

from __future__ import annotations

from typing import Any

from .common import (
    MINUS,
    TIMES,
    Results,
    best_step,
    common_target,
    cores_used,
    failed_above,
    field,
    first_failure,
    num,
    ratio,
    saturation_step,
    step_at,
)

__all__ = ["method", "where_the_time_goes"]


def _budget(step: dict[str, Any] | None, nproc: int, when: str) -> str:
    """
    Where a step's CPU went, by process group, as a sentence.
    """
    cores = (step or {}).get("cores")
    if step is None or not cores:
        return ""
    parts = [(name, cores.get(name)) for name in ("server", "postgres", "clients", "writers")]
    known = [(name, value) for name, value in parts if value is not None]
    total = sum(value for _, value in known)
    listed = ", ".join(
        f"{'notifyd' if name == 'server' else name} {value:.2f}" for name, value in known
    )
    return (
        f"{when} ({num(step['target'])} deliveries/s asked, {num(step['deliveries_per_s'])} delivered) "
        f"the cores went to {listed}: {total:.2f} of {nproc}."
    )


def where_the_time_goes(r: Results) -> list[str]:
    """
    Where the time goes, for the targets that are missed: figures from this
    run, read against the machine's floor.
    """
    nd, nv, m = r["notifyd"], r["naive"], r["machine"]
    floor = m.get("loopback_send", {})
    wake, burst = floor.get("cpu_us_per_send"), floor.get("cpu_us_per_send_back_to_back")

    def next_failure(kind: str) -> str:
        failed = failed_above(r[kind]["single"])
        if not failed:
            return f"{kind} passed every step"
        return f"{kind} failed at {num(failed[0]['target'])}/s: " + "; ".join(
            f"“{s['why']}”" for s in failed
        )

    top = {kind: best_step(r[kind]["single"]) for kind in ("notifyd", "naive")}
    sat = saturation_step(nd["batch"])
    sessions = nd["idle"]["opened"]
    common = common_target(nd["single"], nv["single"])
    at_common = {kind: step_at(r[kind]["single"], common) for kind in ("notifyd", "naive")}
    fanout = m.get("fanout_floor", {}).get("median_ms")
    ann = nd.get("announcement", {}).get("median_last_ms")
    capped = [s for s in failed_above(nd["single"]) if "writers reached" in s["why"]]
    naive_same = [s for s in nv["single"]["steps"] if capped and s["target"] == capped[0]["target"]]
    failed = first_failure(nd["batch"])
    sat_pg = field(sat, "pg_cpu_ms_per_1000")
    lines = [
        "## Where the time goes",
        "",
        "- **Single-row commits.** "
        f"notifyd's highest sustained step used {num(cores_used(top['notifyd'], 'pg_cpu_ms_per_1000'), 2)} cores of "
        f"Postgres and {num(cores_used(top['notifyd'], 'server_cpu_ms_per_1000'), 2)} of notifyd; the naive "
        f"pipeline's {num(cores_used(top['naive'], 'pg_cpu_ms_per_1000'), 2)} and "
        f"{num(cores_used(top['naive'], 'server_cpu_ms_per_1000'), 2)}, out of {m['nproc']}, shared with the writers, "
        f"the clients and other tenants. Above that, {next_failure('notifyd')}; {next_failure('naive')}."
        + (
            f" On {len(capped)} of notifyd's failed attempts the writers could not even commit at the target "
            f"rate (at most {num(max(st['sent_per_s'] for st in capped))}/s"
            + (
                f"; {num(max(st['sent_per_s'] for st in naive_same))}/s into the naive pipeline's table at "
                "the same target"
                if naive_same
                else ""
            )
            + "): each commit that sends a NOTIFY takes a cluster-wide lock, and with notifyd Postgres also "
            "spends CPU on its reads and its extra indexes on the same 2 cores as the writers, so its ceiling "
            "for notifying commits is lower there."
            if capped
            else ""
        )
        + (
            f" At {num(common)} commits/s, the highest step both sustained, Postgres spent "
            f"{num(field(at_common['notifyd'], 'pg_cpu_ms_per_1000'), 1)} ms of CPU per 1,000 deliveries for "
            f"notifyd and {num(field(at_common['naive'], 'pg_cpu_ms_per_1000'), 1)} for naive: the difference "
            "is notifyd's reads (one query per burst of commits, where naive's NOTIFY carries the row) and its "
            "extra indexes (history, unread counts, resume)."
            if common is not None
            else ""
        ),
        "- **CPU per delivery.** Every delivery is at least one `send()` to the client's socket, and over "
        f"loopback the sender pays the receiver's side too: {num(wake, 1)} µs when the reader has to be woken, "
        f"{num(burst, 1)} µs back to back (see Machine). At low rates most writes wake a sleeping client "
        "process, so the figure per delivery falls as the load rises: "
        f"{num(field(sat, 'server_cpu_ms_per_1000'), 1)} µs at saturation. The profile below shows the split: "
        "`session.py (flush)` is the one write per session per delivery round.",
        f"- **Announcement to {num(sessions)} sessions.** "
        + (
            f"A plain loop of `send()` calls to as many sockets takes {num(fanout, 1)} ms here (see Machine), "
            f"so notifyd's {num(ann, 1)} ms is {ratio(ann, fanout)}{TIMES} the cost of the writes alone. "
            if fanout and ann
            else ""
        )
        + "The writes are one per session, in one thread; on top of them notifyd queues the announcement "
        "(framed once) for every session and then the new unread count (framed once per distinct count) "
        "before the write that carries both.",
        "- **100-row statements.** "
        + " ".join(
            filter(
                None,
                [
                    _budget(sat, m["nproc"], "At saturation"),
                    _budget(failed, m["nproc"], "At the first step it failed")
                    if failed is not sat
                    else "",
                    f"60,000 deliveries/s would take {num(sat_pg * 60 / 1000, 2)} cores of "
                    "Postgres alone at the CPU per delivery it used at saturation (inserting and indexing the rows, "
                    "and notifyd's reads), before notifyd, the writers and the clients."
                    if sat_pg is not None
                    else "",
                ],
            )
        ),
    ]
    return lines


def method(r: Results) -> list[str]:
    plan = r["plan"]
    trig = r.get("trigger", {})
    return [
        "## Method",
        "",
        f"- **Sessions.** Each server gets {num(plan['sessions'])} sessions (one per user, `user-0` …), opened "
        "once (notifyd first, then naive) and kept open until both servers are done; messages go to the first "
        f"{num(plan['users'])} of them. The ramps interleave the two servers step by step (order alternating), "
        "so both meet the same moments of a shared machine; the idle server's keepalive pings go on meanwhile. "
        "notifyd sessions "
        "authenticate with `?token=` and count as open once `hello` arrives; naive sessions connect to "
        "`/ws/message/{userId}`. The clients are "
        f"{plan['client_procs']} processes that speak just enough RFC 6455 (`bench/clients.py`: the opening "
        "handshake, server frames parsed in place, pings answered, no compression), on uvloop when it is "
        "installed, so that the instrument costs little of the two cores; they do not ping (the servers do, "
        "every 20 s). The session-open times use the websockets client, as an application would.",
        "- **Servers.** notifyd as `python -m notifyd serve` with its defaults"
        + (
            " and " + ", ".join(f"`{k}={v}`" for k, v in r["notifyd_env"].items())
            if r.get("notifyd_env")
            else ""
        )
        + " (event loop: uvloop when installed, `NOTIFYD_EVENT_LOOP=auto`); naive on asyncio's own loop.",
        "- **Latency.** The writer puts `time.time_ns()`, taken just before it sends the INSERT, in `content`; "
        "each INSERT is its own autocommit transaction, so that is just before COMMIT. The client subtracts "
        "it from `time.time_ns()` when the frame arrives. Same clock, same machine.",
        f"- **Writers.** {plan['writer_procs']} processes {TIMES} {plan['writer_conns']} asyncpg connections, open-loop "
        "pacing (a late insert is sent at once, never skipped). Single-row: each to a random online user, 10 % "
        f"to offline users (`offline-N`), so deliveries ≈ 0.9 {TIMES} commits. 100-row: `INSERT … SELECT unnest($1)` "
        "to 100 distinct online users. naive runs insert into `t_message_naive` instead.",
        f"- **synchronous_commit.** On for the cluster. The ramp writers set it **off** for their sessions "
        f"(`synchronous_commit={plan['writers_synchronous_commit']}`): a NOTIFYing commit holds Postgres' global "
        "notify lock while it flushes WAL, so with it on every notifying commit on this disk is serialised "
        "behind an fsync and the ramps would measure that, for both servers alike. The trigger-cost runs, "
        "the announcements and the 100k-row insert keep it on: they are the notifying-commit ceiling.",
        f"- **Steps.** {plan['step_s']:.0f} s each (single-row: {', '.join(map(str, plan['single_steps']))} "
        f"commits/s; 100-row: {', '.join(map(str, plan['batch_steps']))} deliveries/s), then up to "
        f"{plan['drain_s']:.0f} s for the last deliveries. A step passes when the writers reached ≥ 90 % of the "
        f"target, every expected message arrived exactly once and p99 ≤ {plan['single_p99_ms']:.0f} ms "
        f"(100-row: ≤ {plan['batch_p99_ms']:.0f} ms). The machine is shared, so before each step the harness "
        f"waits (≤ 10 s, ≤ {plan['calm_budget_s']:.0f} s per run) for other tenants to use < 0.25 cores, and a "
        f"failed step is run again (after the server went idle), up to {plan['attempts']} attempts; the ramp "
        "stops when all fail. Every attempt is listed. "
        f"deliveries/s = messages received ÷ (last receipt {MINUS} first send). *Other load* is the machine's "
        "busy CPU (user+system+steal from `/proc/stat`) minus that of the harness, the server and Postgres "
        "during the step: other tenants (with `--dsn`, Postgres counts there too). *Client GC max* is the longest collector pause in a client process "
        "(clients `gc.freeze()` their sessions after opening them, so the instrument does not stall).",
        "- **CPU.** utime+stime from `/proc/<pid>/stat` of the server process (and of the postmaster and its "
        "live backends for the Postgres figure) before and after the step including its drain, divided by "
        "the messages delivered in it. Offline rows are included in the work, not in the count. The same "
        "counters of the client and writer processes, divided by the step's wall time, give the cores each "
        "group used (*Where the time goes*).",
        "- **Collector pauses.** The servers are started with `PYTHONPATH=bench/probe`, whose "
        "`sitecustomize.py` registers a `gc.callbacks` observer that logs every full (generation 2) pass and "
        "any pass over 5 ms; the command line and the collector's behaviour are unchanged. *Server GC max* is "
        "the longest pass during a step. A full pass walks every object the server holds (each open session "
        "is many of them) and stops the event loop meanwhile: a step that meets a long one fails p99 ≤ 20 ms "
        "whatever the server's steady-state speed. (Not used for the cProfile run.)",
        "- **RSS.** VmRSS of the server before and after opening the sessions (each time after the server "
        "went idle), divided by the sessions opened.",
        "- **Announcement.** One row with `to_user = '*'` per repetition, with all sessions open; the time "
        "from just before its commit until the last session received it.",
        f"- **Session open.** {num(plan['hello_rows'])} rows for `{'bench-big'}` (every second one read) inserted "
        "in one statement while all sessions are open, then `VACUUM ANALYZE`; one warm-up connect, then "
        f"{plan['hello_connects']} sequential connects, each timed from `connect()` to `hello`. For naive, "
        "the WebSocket handshake only (it has no hello).",
        f"- **Trigger cost.** No server running. {trig.get('connections', 4)} asyncpg connections insert as fast as "
        f"they can for {trig.get('seconds', plan['trigger_s']):.1f} s per case, cases interleaved, "
        f"{trig.get('rounds', 1)} round(s), median reported, each into a fresh `CREATE TABLE … (LIKE "
        "t_message_real_time INCLUDING ALL)` copy with notifyd's statement trigger, with it disabled "
        "(`ALTER TABLE … DISABLE TRIGGER notifyd_wake_on_insert`), and with the naive per-row "
        "`pg_notify(row_to_json(NEW))` trigger; synchronous_commit on.",
        "- **naive.** `bench/naive_server.py`: per-row trigger NOTIFY with the full row as JSON, one LISTEN "
        "connection, `json.loads` in the callback, `asyncio.create_task` per notification sending "
        "`json.dumps(row)` to each socket of the user; no auth, no resume, no unread counts. notifyd sends "
        "two frames per message (the message and the new `unread` count), naive one.",
        "",
    ]
