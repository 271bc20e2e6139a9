"""
The push-pipeline section of the report: paced commits at each rate and
session count beside the naive relay, the commit ceiling with and without
the triggers and its accounting, isolated messages; the targets for them
with a verdict each, every run, and how it was measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .common import TIMES, num, table

__all__ = [
    "CEILING_SHARE",
    "CPU_PG_RATIO",
    "ISOLATED_P99_MS",
    "LATENCY_RATIO",
    "Target",
    "pair",
    "push_section",
    "push_targets",
]

# The targets (2 cores, co-located; ratios measured in the same run).
LATENCY_RATIO = 1.2  # p50 and p99 at most this times the naive relay's
CPU_SERVER_RATIO = 1.0  # server CPU per delivery at most the naive relay's
CPU_PG_RATIO = 1.2  # Postgres CPU per delivery at most this times naive's
CEILING_SHARE = 0.85  # of the no-trigger throughput, offline users
ISOLATED_P99_MS = 5.0
# The loads the targets name; a run that measured fewer (--quick) shows the
# others as not measured.
TARGET_SESSIONS = (1000, 10_000)
TARGET_RATES = (500, 2000)

_CLOCKS = {
    "commit_timestamp": "the row's commit timestamp (`pg_xact_commit_timestamp(xmin)`, "
    "`track_commit_timestamp = on`): stamped when Postgres writes the commit record, after any wait "
    "for the notify lock and before that record's WAL flush, so the figure includes the flush (the "
    "row is invisible until it is done) and nothing before the commit",
    "insert_clock": "the INSERT's own `clock_timestamp()` (this cluster has `track_commit_timestamp` "
    "off, so the commit's own time is unknown): the figure includes the commit",
}


@dataclass(frozen=True)
class Target:
    """
    One target: what it asks, what was measured, the ratio it is judged
    by, and the verdict (True met, False missed, None not measured).
    """

    name: str
    measured: str
    ratio: float | None
    met: bool | None

    @property
    def verdict(self) -> str:
        return {True: "**met**", False: "**missed**", None: "n/a"}[self.met]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}{TIMES}"


def pair(
    push: dict[str, Any], sessions: int, rate: int
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """
    The summaries of notifyd and of naive at one session count and rate.
    """
    found: dict[str, dict[str, Any]] = {
        s["kind"]: s
        for s in push.get("summary", [])
        if s["sessions"] == sessions and s["rate"] == rate
    }
    return found.get("notifyd"), found.get("naive")


def _get(summary: dict[str, Any] | None, key: str) -> float | None:
    return None if summary is None else summary.get(key)


def _at_most(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound


def _reached(nd: dict[str, Any] | None, nv: dict[str, Any] | None, rate: int) -> str:
    """
    A note when either server's writers committed less than 90 % of the
    rate asked (the comparison is then at the rates reached).
    """
    a, b = _get(nd, "committed_per_s"), _get(nv, "committed_per_s")
    if a is None or b is None or min(a, b) >= 0.9 * rate:
        return ""
    return f" (commits/s reached: {num(a)} and {num(b)})"


def _latency_target(push: dict[str, Any], sessions: int, rate: int) -> Target:
    nd, nv = pair(push, sessions, rate)
    r50 = _ratio(_get(nd, "p50_ms"), _get(nv, "p50_ms"))
    r99 = _ratio(_get(nd, "p99_ms"), _get(nv, "p99_ms"))
    worst = None if r50 is None or r99 is None else max(r50, r99)
    return Target(
        f"Commit → receipt p50 and p99 at {num(rate)} commits/s, {num(sessions)} sessions: "
        f"≤ {LATENCY_RATIO}{TIMES} naive",
        f"p50 {num(_get(nd, 'p50_ms'), 2)} vs {num(_get(nv, 'p50_ms'), 2)} ms ({_x(r50)}); "
        f"p99 {num(_get(nd, 'p99_ms'), 2)} vs {num(_get(nv, 'p99_ms'), 2)} ms ({_x(r99)})"
        + _reached(nd, nv, rate),
        worst,
        _at_most(worst, LATENCY_RATIO),
    )


def _cpu_target(push: dict[str, Any], sessions: int, rate: int, key: str) -> Target:
    nd, nv = pair(push, sessions, rate)
    ratio = _ratio(_get(nd, key), _get(nv, key))
    bound, what = (
        (CPU_SERVER_RATIO, "Server")
        if key == "server_cpu_us"
        else (CPU_PG_RATIO, "Postgres (all backends)")
    )
    limit = "naive's" if bound == 1.0 else f"{bound}{TIMES} naive's"
    return Target(
        f"{what} CPU per delivery at {num(rate)} commits/s, {num(sessions)} sessions: ≤ {limit}",
        f"{num(_get(nd, key))} vs {num(_get(nv, key))} µs ({_x(ratio)})" + _reached(nd, nv, rate),
        ratio,
        _at_most(ratio, bound),
    )


def _ceiling_runs(push: dict[str, Any], case: str) -> list[dict[str, Any]]:
    return [r for r in push.get("ceiling", {}).get("runs", []) if r["case"] == case]


def _ceiling_targets(push: dict[str, Any]) -> list[Target]:
    ceiling = push.get("ceiling")
    if not ceiling:
        return [
            Target(name, "not measured", None, None)
            for name in (
                f"Commit ceiling, offline users: ≥ {CEILING_SHARE} of the no-trigger throughput",
                "Every row of the offline case read and accounted for",
                "Connected users: every row delivered exactly once",
            )
        ]
    rates = ceiling["commits_per_s"]
    share = _ratio(rates.get("offline"), rates.get("no_trigger"))
    out = [
        Target(
            f"Commit ceiling, {ceiling['clients']} pgbench clients, users not connected, "
            f"{num(ceiling['sessions'])} sessions open: ≥ {CEILING_SHARE} of the no-trigger throughput",
            f"{num(rates.get('offline'))} vs {num(rates.get('no_trigger'))} commits/s "
            f"(median of {ceiling['reps']})",
            share,
            None if share is None else share >= CEILING_SHARE,
        )
    ]
    offline = _ceiling_runs(push, "offline")
    rows = sum(r["rows"] for r in offline)
    c = {
        key: sum(r["catchup"][key] for r in offline)
        for key in (
            "rows",
            "replayed",
            "missing",
            "twice",
            "not_in_table",
            "hello_unread",
            "not_recovered",
            "resynced",
            "users",
        )
    }
    queued = [r.get("webhook_queued") for r in offline]
    webhook_on = any(q is not None for q in queued)
    webhook = sum(q or 0 for q in queued)
    complete = (
        bool(offline)
        and rows > 0
        and c["rows"] == rows
        and c["replayed"] == rows
        and c["missing"] == c["twice"] == c["not_in_table"] == 0
        and c["not_recovered"] == c["resynced"] == 0
        and c["hello_unread"] == rows
        and (not webhook_on or webhook == rows)
    )
    out.append(
        Target(
            "Every row of the offline case read and accounted for (catch-up of those users; the "
            "webhook queue when it is on)",
            f"{num(rows)} rows in the table for {num(c['users'])} users; resumed from a cursor taken "
            f"before the writes, their sessions replayed {num(c['replayed'])} ({num(c['missing'])} "
            f"missing, {num(c['twice'])} twice, {num(c['not_in_table'])} not in the table, "
            f"{num(c['not_recovered'])} not recovered), hello unread adds up to "
            f"{num(c['hello_unread'])}; webhook queue: "
            + (f"{num(webhook)} rows" if webhook_on else "off in this run"),
            None,
            complete if offline else None,
        )
    )
    online = _ceiling_runs(push, "online")
    d = {
        key: sum(r["delivery"][key] for r in online)
        for key in ("rows", "received", "lost", "duplicates", "unknown")
    }
    exact = bool(online) and d["rows"] > 0 and d["lost"] == d["duplicates"] == d["unknown"] == 0
    out.append(
        Target(
            "Connected users: every row delivered exactly once",
            f"{num(d['rows'])} rows, {num(d['received'])} received: {num(d['lost'])} lost, "
            f"{num(d['duplicates'])} twice, {num(d['unknown'])} not in the table "
            f"({num(_ceiling_median(push, 'online'))} commits/s)",
            None,
            exact if online else None,
        )
    )
    return out


def _ceiling_median(push: dict[str, Any], case: str) -> float | None:
    value = push.get("ceiling", {}).get("commits_per_s", {}).get(case)
    return None if value is None else float(value)


def _isolated_target(push: dict[str, Any]) -> Target:
    iso = push.get("isolated")
    nd = (iso or {}).get("notifyd", {}).get("latency_ms", {})
    nv = (iso or {}).get("naive", {}).get("latency_ms", {})
    p99 = nd.get("p99")
    return Target(
        f"Isolated message (idle system, {num((iso or {}).get('messages'))} messages "
        f"{num((iso or {}).get('gap_s', 0) * 1000)} ms apart): p99 < {num(ISOLATED_P99_MS)} ms",
        f"p99 {num(p99, 2)} ms (naive {num(nv.get('p99'), 2)} ms, {_x(_ratio(p99, nv.get('p99')))}); "
        f"other load before: {num((iso or {}).get('other_load_before_cores'), 2)} cores",
        _ratio(p99, nv.get("p99")),
        None if p99 is None else p99 < ISOLATED_P99_MS,
    )


def _unmeasured(push: dict[str, Any], sessions: int, rate: int, target: Target) -> Target:
    """
    ``target``, or the same target marked not measured when this run had
    no figures at that load.
    """
    if pair(push, sessions, rate) == (None, None):
        return Target(target.name, "not measured in this run", None, None)
    return target


def push_targets(push: dict[str, Any]) -> list[Target]:
    """
    Every target of the push pipeline, in the order they are stated.
    """
    out: list[Target] = []
    sessions = sorted({*TARGET_SESSIONS, *push.get("session_counts", [])})
    rates = sorted({*TARGET_RATES, *push.get("rates", [])})
    grid = [(s, r) for s in sessions for r in rates]
    out += [_unmeasured(push, s, r, _latency_target(push, s, r)) for s, r in grid]
    for key in ("server_cpu_us", "pg_cpu_us"):
        out += [_unmeasured(push, s, r, _cpu_target(push, s, r, key)) for s, r in grid]
    out += _ceiling_targets(push)
    out.append(_isolated_target(push))
    out.append(
        Target(
            "Everything that holds today still holds (chaos, out-of-order commits, resume, 1 MB "
            "rows, 100,000-row statements, idle memory, announcement time)",
            "the test suite guards these; idle memory and announcement time are in the tables above",
            None,
            None,
        )
    )
    return out


Summary = dict[str, Any] | None


def _two(nd: Summary, nv: Summary, key_a: str, key_b: str) -> tuple[str, str, str]:
    """
    Two figures of each server ("a / b"), and their ratios.
    """
    a = f"{num(_get(nd, key_a), 2)} / {num(_get(nd, key_b), 2)}"
    b = f"{num(_get(nv, key_a), 2)} / {num(_get(nv, key_b), 2)}"
    ratios = (
        f"{_x(_ratio(_get(nd, key_a), _get(nv, key_a)))} / "
        f"{_x(_ratio(_get(nd, key_b), _get(nv, key_b)))}"
    )
    return a, b, ratios


def _one(nd: Summary, nv: Summary, key: str) -> tuple[str, str, str]:
    return num(_get(nd, key)), num(_get(nv, key)), _x(_ratio(_get(nd, key), _get(nv, key)))


def _counts(s: Summary) -> str:
    return f"{num(_get(s, 'rows'))} ({num(_get(s, 'lost'))}, {num(_get(s, 'duplicates'))})"


def _pipeline_rows(push: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for sessions in push.get("session_counts", []):
        for rate in push.get("rates", []):
            nd, nv = pair(push, sessions, rate)
            load = (num(sessions), num(rate))
            rows += [
                (*load, "commit → receipt p50 / p99, ms", *_two(nd, nv, "p50_ms", "p99_ms")),
                (
                    *load,
                    "INSERT → receipt p50 / p99, ms",
                    *_two(nd, nv, "insert_p50_ms", "insert_p99_ms"),
                ),
                (*load, "server CPU per delivery, µs", *_one(nd, nv, "server_cpu_us")),
                (*load, "Postgres CPU per delivery, µs", *_one(nd, nv, "pg_cpu_us")),
                (*load, "commits/s reached", *_one(nd, nv, "committed_per_s")),
                (*load, "rows (lost, received twice)", _counts(nd), _counts(nv), ""),
            ]
    return rows


def _pg_parts_table(push: dict[str, Any]) -> list[str]:
    """
    Postgres's CPU per delivery split by what its processes are for (the
    medians of the runs; empty for runs from before the split was taken).
    """
    rows: list[tuple[str, ...]] = []
    for sessions in push.get("session_counts", []):
        for rate in push.get("rates", []):
            nd, nv = pair(push, sessions, rate)
            for part, name in _PART_NAMES.items():
                a = ((nd or {}).get("pg_cpu_us_by_part") or {}).get(part)
                b = ((nv or {}).get("pg_cpu_us_by_part") or {}).get(part)
                if a is None and b is None:
                    continue
                rows.append((num(sessions), num(rate), name, num(a), num(b), _x(_ratio(a, b))))
    if not rows:
        return []
    return [
        "### Where Postgres's CPU goes",
        "",
        "Per delivery, µs (medians of the runs), by what each process of the cluster is for, "
        "as `pg_stat_activity` names it. The writers' backends insert into each server's own "
        "table and run its trigger (the next table takes a commit apart); the server's "
        "connections are notifyd's window reads, LISTEN, looks at the NOTIFY lock and lease, or "
        "the naive relay's LISTEN.",
        "",
        *table(("sessions", "commits/s asked", "part", "notifyd", "naive", "ratio"), rows),
        "",
    ]


_PART_NAMES = {
    "writers": "writers' backends (pgbench)",
    "server": "the server's own connections",
    "background": "background (WAL writer, checkpointer, ...)",
    "other": "the harness's queries",
}


def _commit_cost_table(push: dict[str, Any]) -> list[str]:
    cost = push.get("commit_cost")
    if not cost or not cost.get("measured"):
        return []
    cases = cost["cases"]
    naive = cases["naive"]["total_us"]
    rows = [
        (
            case["what"],
            num(case["writer_us"]),
            num(case["listener_us"]),
            num(case["total_us"]),
            _x(_ratio(case["total_us"], naive)),
        )
        for case in cases.values()
    ]

    def step(key: str, base: str) -> str:
        return f"{cases[key]['total_us'] - cases[base]['total_us']:+.0f} µs"

    return [
        "### A single-row commit, piece by piece",
        "",
        f"CPU µs per single-row INSERT transaction (synchronous_commit on), medians of "
        f"{cost['rounds']} alternating rounds of {num(cost['commits'])} commits one at a time, "
        "no server running: the writing backend, and a backend LISTENing on both servers' "
        "channels (what each server's LISTEN connection costs Postgres). Ratio to the naive "
        "relay's table and trigger.",
        "",
        *table(("case", "writer", "listener", "total", "ratio"), rows),
        "",
        f"- notifyd's table over the naive relay's, no trigger: {step('notifyd_bare', 'naive_bare')}"
        " (its indexes: history, unread counts, resume, the delivery scan);",
        f"- notifyd's trigger over the naive relay's, both on notifyd's table: "
        f"{step('notifyd', 'notifyd_row_trigger')} (a statement trigger in PL/pgSQL that runs as "
        "the schema's owner, reads the lease, the statement's rows and the transaction's earlier "
        "ones);",
        f"- the naive relay's trigger on its table: {step('naive', 'naive_bare')}; notifyd's on "
        f"its table: {step('notifyd', 'notifyd_bare')}.",
        "",
    ]


def _ceiling_table(push: dict[str, Any]) -> list[str]:
    ceiling = push.get("ceiling")
    if not ceiling:
        return ["Not measured in this run.", ""]
    rates = ceiling["commits_per_s"]
    none = rates.get("no_trigger")
    labels = {
        "offline": "to users not connected, triggers on",
        "no_trigger": "to users not connected, `DISABLE TRIGGER USER`",
        "online": "to connected users, triggers on",
    }
    rows = [
        (
            labels[case],
            num(rates.get(case)),
            _x(_ratio(rates.get(case), none)),
            ", ".join(num(r["commits_per_s"]) for r in _ceiling_runs(push, case)),
        )
        for case in ("offline", "no_trigger", "online")
    ]
    return [
        *table(("case", "commits/s (median)", "share of no-trigger", "each rep"), rows),
        "",
    ]


def _isolated_table(push: dict[str, Any]) -> list[str]:
    iso = push.get("isolated")
    if not iso:
        return ["Not measured in this run.", ""]
    nd, nv = iso["notifyd"], iso["naive"]
    rows = []
    for key, label in (("p50", "p50"), ("p99", "p99"), ("max", "max")):
        a, b = nd["latency_ms"][key], nv["latency_ms"][key]
        rows.append((f"commit → receipt {label}, ms", num(a, 2), num(b, 2), _x(_ratio(a, b))))
    rows.append(
        (
            "received / sent (lost, twice)",
            f"{nd['received']} / {nd['rows']} ({nd['lost']}, {nd['duplicates']})",
            f"{nv['received']} / {nv['rows']} ({nv['lost']}, {nv['duplicates']})",
            "",
        )
    )
    return [*table(("figure", "notifyd", "naive", "ratio"), rows), ""]


def _runs_table(push: dict[str, Any]) -> list[str]:
    rows = []
    for run in push.get("runs", []):
        lat = run["latency_ms"]
        rows.append(
            (
                num(run["sessions"]),
                num(run["rate"]),
                run["kind"],
                str(run.get("rep", 0) + 1),
                num(run["committed_per_s"]),
                f"{num(run['received'])} / {num(run['rows'])}",
                f"{run['lost']} / {run['duplicates']}",
                f"{num(lat['p50'], 2)} / {num(lat['p99'], 2)} / {num(lat['max'], 1)}",
                num(run["server_cpu_us_per_delivery"]),
                num(run["pg_cpu_us_per_delivery"]),
                num(run.get("other_load_before_cores"), 2),
                _learned(run),
            )
        )
    return table(
        (
            "sessions",
            "commits/s asked",
            "server",
            "rep",
            "commits/s reached",
            "received / rows",
            "lost / twice",
            "p50 / p99 / max ms",
            "server µs/delivery",
            "Postgres µs/delivery",
            "other load before, cores",
            "pushed ahead / window reads / leases",
        ),
        rows,
    )


def _learned(run: dict[str, Any]) -> str:
    """
    How notifyd learned of a run's commits: the share of its rows pushed
    from their NOTIFY's payload, its window reads and the polling leases
    it started (empty for the naive relay and for runs before these were
    recorded).
    """
    counters = run.get("notifyd")
    if not counters or not run.get("rows"):
        return ""
    share = counters.get("pushed_ahead", 0) / run["rows"]
    return (
        f"{share:.0%} / {num(counters.get('window_reads'))} / {num(counters.get('polling_leases'))}"
    )


def _method(push: dict[str, Any]) -> list[str]:
    clock = _CLOCKS.get(push.get("commit_clock", ""), "unknown")
    ceiling = push.get("ceiling", {})
    return [
        "### How these were measured",
        "",
        f"- **Writers.** pgbench (the one shipped with the PostgreSQL binaries), "
        f"{push.get('pgbench_clients')} clients, `--protocol=prepared`, one single-row `INSERT` per "
        "transaction (autocommit, `synchronous_commit = on`: a commit returns once its WAL is flushed), "
        "to a random user among those with an open session, paced with `--rate`; "
        f"{num(push.get('seconds'))} s per run, {push.get('reps')} run(s) per server, session count "
        "and rate, the two servers alternating (the order flips every time). Each figure is the "
        "median over the runs; every run is listed below.",
        f"- **Commit → receipt.** From {clock}, to the moment the client process read the frame "
        "(same clock, same machine). Every row is matched with its receipt by id, so a row lost or "
        "received twice is counted, not assumed. *INSERT → receipt* is from the INSERT's "
        "`clock_timestamp()`: it adds the commit itself (the wait for the notify lock and the flush).",
        "- **CPU per delivery.** utime + stime from `/proc` over the run and its drain, divided by the "
        "messages received: the server process; and the whole cluster (the postmaster, every live "
        "backend, and the backends it reaped meanwhile: pgbench's connections come and go). Both "
        "servers are up during each run, the other one idle; its sessions are quiet.",
        f"- **Table.** notifyd's table holds {num(push['seeded_rows'])} earlier messages to other "
        "users and is analyzed (`VACUUM ANALYZE`) before the runs, as a production inbox table "
        "would be (notifyd reuses its window reads' plans only on an analyzed table)."
        if push.get("seeded_rows")
        else "- **Table.** notifyd's table starts empty and unanalyzed.",
        "- **How notifyd learned of the commits** (last column of *Every pipeline run*, from "
        "its `/metrics` before and after the run): the share of the run's rows it pushed "
        "from their NOTIFY's payload, ahead of the window read that confirms them; its window "
        "reads; the polling leases it started (docs/deployment.md §9: a lease turns the "
        "triggers' NOTIFY off for at least a second while writers queue for the notify lock, "
        "and notifyd polls meanwhile).",
        "- **Sessions.** One per user (`user-0` …), held by the harness's client processes with its "
        "raw WebSocket client, noting each message's id and arrival time (`bench/receipts.py`).",
        f"- **Commit ceiling.** notifyd alone (the naive relay stopped), {num(ceiling.get('sessions'))} "
        f"sessions open; {ceiling.get('clients')} pgbench clients as fast as they go for "
        f"{num(ceiling.get('seconds'))} s per case; throughput = rows of the case in the table ÷ the run's "
        "length. Offline case: before the writes a session takes a cursor from its `hello`; after them "
        "one session per addressed user resumes with `?since=` that cursor and must receive exactly the "
        "rows the table holds for that user, with `recovered: true`, and its `hello` unread count must "
        "match. No-trigger case: the same writes with `ALTER TABLE t_message_real_time DISABLE TRIGGER "
        "USER` (enabled again at once). Online case: to the connected users, every row matched with its "
        "receipts.",
        "- **Isolated messages.** No writer running: one autocommit `INSERT` from the harness to each "
        "server in turn, each server getting one every "
        f"{num(push.get('isolated', {}).get('gap_s', 0.2) * 1000)} ms.",
        "",
    ]


def push_section(r: dict[str, Any], plots: Sequence[str] = ()) -> list[str]:
    """
    The section's Markdown lines (nothing when the run has no push figures).
    """
    push = r.get("push")
    if not push:
        return []
    measured = push.get("measured", {})
    out = [
        "## Push pipeline: commit to socket, beside the naive relay",
        "",
    ]
    run_date = r.get("machine", {}).get("date")
    if measured.get("date") and measured.get("date") != run_date:
        out += [
            f"These figures come from a separate run, `{measured.get('command')}` (mode "
            f"**{measured.get('mode')}**, {measured.get('date')}, load average at start "
            f"{measured.get('load_average_at_start')}); the rest of this report is from the run of "
            f"{run_date}.",
            "",
        ]
    loads = sorted(
        r["other_load_before_cores"]
        for r in push.get("runs", [])
        if r.get("other_load_before_cores") is not None
    )
    if loads:
        out += [
            f"Other tenants of the machine used a median of {loads[len(loads) // 2]:.2f} cores "
            f"(at most {loads[-1]:.2f}) just before each pipeline run.",
            "",
        ]
    targets = push_targets(push)
    out += ["### Targets", ""]
    out += table(
        ("Target", "Measured", "Ratio", "Verdict"),
        [(t.name, t.measured, _x(t.ratio), t.verdict) for t in targets],
    )
    if any(t.met is False for t in targets):
        out += [
            "",
            "For the missed targets, *Profile* below shows where notifyd's own time goes (under "
            "cProfile, at its highest sustained single-row step) and *Where the time goes* splits "
            "the cores between notifyd, Postgres, the clients and the writers.",
        ]
    out += ["", "### Paced single-row commits (pgbench, synchronous_commit on)", ""]
    out += ["Ratio = notifyd ÷ naive, lower is better.", ""]
    out += table(
        ("sessions", "commits/s asked", "figure", "notifyd", "naive", "ratio"),
        _pipeline_rows(push),
    )
    out += [""]
    out += _pg_parts_table(push)
    out += _commit_cost_table(push)
    out += ["### Commit ceiling of notifyd's table", ""]
    out += _ceiling_table(push)
    out += ["### Isolated message on an idle system", ""]
    out += _isolated_table(push)
    if plots:
        out += ["### Plots", ""]
        out += [f"![{name}]({name})" for name in plots]
        out.append("")
    out += _method(push)
    out += ["### Every pipeline run", ""]
    out += _runs_table(push)
    out.append("")
    return out
