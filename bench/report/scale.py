"""
The report's scale section (``python -m bench scale``): many sessions on one
instance, and the database's cost of each added instance, each with the run
it comes from. ``docs/scaling.md`` builds its capacity model on these.
"""

from __future__ import annotations

import statistics
from typing import Any

from .common import TIMES, Results, num, ratio, table

__all__ = ["instance_costs", "scale_section"]


def _measured(phase: dict[str, Any]) -> str:
    m = phase.get("measured") or {}
    machine = m.get("machine") or {}
    load = phase.get("load_average") or []
    during = f"load average {load[0]:.1f} before, {load[3]:.1f} after" if len(load) == 6 else ""
    return (
        f"Measured {machine.get('date', '?')} on {machine.get('nproc', '?')} CPUs "
        f"({machine.get('cpu_model', 'unknown')}), shared with other work ({during}); "
        f"notifyd sources `{(m.get('notifyd_source') or {}).get('sha256', '?')}`; "
        f"`{m.get('command', 'python -m bench scale')}`."
    )


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _sessions(s: dict[str, Any]) -> list[str]:
    opened, target = s["opened"], s["target"]
    idle = s.get("idle") or {}
    ann = s.get("announcement") or {}
    pipeline = s.get("pipeline") or {}
    runs = pipeline.get("runs") or []
    p99 = _median([r["latency_ms"]["p99"] for r in runs])
    p50 = _median([r["latency_ms"]["p50"] for r in runs])
    lost = sum(r["lost"] for r in runs)
    twice = sum(r["duplicates"] for r in runs)
    rows = sum(r["rows"] for r in runs)
    cpu = _median([r["server_cpu_us_per_delivery"] for r in runs])
    workers = s.get("workers", 1)
    title = "one process" if workers == 1 else f"one instance of {workers} worker processes"
    out = [f"### Sessions on {title}", "", _measured(s), ""]
    if workers > 1:
        out += [
            f"The instance ran {workers} worker processes (`NOTIFYD_WORKERS={workers}`) sharing "
            "its port; RSS and CPU are the sum over its processes.",
            "",
        ]
    if opened < target:
        why = s.get("capped_by") or s.get("stopped_by") or "unknown"
        out += [
            f"**{num(opened)} of the {num(target)} sessions asked for were held** (not {num(target)}): "
            f"{why}. The figures below are for {num(opened)} sessions; per-session figures scale "
            "linearly (see the stages), the rest is stated as measured.",
            "",
        ]
    kib = s.get("kib_per_session")
    out += table(
        ("Figure", "Measured"),
        [
            (
                "sessions held",
                f"{num(opened)} ({num(s.get('opened_on_retry'))} on a retry, "
                f"{num(s.get('failed'))} failed to open)",
            ),
            (
                "server RSS before / after",
                f"{num(s['rss_before_kib'] / 1024, 0)} / {num(s['rss_after_kib'] / 1024, 0)} MiB",
            ),
            ("RSS per session", f"{num(kib, 1)} KiB"),
            (
                "time to open them all",
                f"{num(s['open_s'], 1)} s ({num(s.get('opens_per_s'))} sessions/s, "
                f"{s['client_procs']} client processes, {len(s['sources'])} source addresses)",
            ),
            (
                "server CPU while idle (pings only)",
                f"{num((idle.get('server_cpu_share') or 0) * 100, 1)} % of a core over "
                f"{num(idle.get('seconds'))} s",
            ),
            (
                "Postgres CPU while idle",
                f"{num((idle.get('postgres_cpu_share') or 0) * 100, 1)} % of a core",
            ),
            (
                "announcement to all (time to the last receipt, median)",
                f"{num(ann.get('median_last_ms'))} ms over {len(ann.get('reps') or [])} announcements",
            ),
            (
                f"commit-to-receipt at {num(pipeline.get('rate'))} commits/s (median of runs)",
                f"p50 {num(p50, 1)} ms, p99 {num(p99, 1)} ms; {num(lost)} lost, {num(twice)} twice "
                f"of {num(rows)}",
            ),
            ("server CPU per delivery at that rate", f"{num(cpu)} µs"),
        ],
    )
    stages = s.get("stages") or []
    if stages:
        first = stages[0]
        out += [
            "",
            "Opened in stages; after each, the server's RSS, one announcement to every open "
            f"session and one paced run at {num(pipeline.get('rate'))} commits/s (the same run's "
            f"first stage is the baseline of the ratios):",
            "",
        ]
        out += table(
            ("sessions", "stage took", "server RSS", "announcement, last", f"{TIMES} first stage",
             "p99", f"{TIMES} first stage", "server µs/delivery", "lost / twice"),
            [
                (
                    num(st["sessions"]), f"{num(st['seconds'], 1)} s",
                    f"{num(st['rss_kib'] / 1024)} MiB",
                    f"{num(st.get('announcement_last_ms'))} ms",
                    ratio(st.get("announcement_last_ms"), first.get("announcement_last_ms")),
                    f"{num(st.get('p99_ms'), 1)} ms", ratio(st.get("p99_ms"), first.get("p99_ms")),
                    num(st.get("server_cpu_us_per_delivery")),
                    f"{num(st.get('lost'))} / {num(st.get('duplicates'))}",
                )
                for st in stages
            ],
        )  # fmt: skip
    return out


def instance_costs(summary: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float | None]]]:
    """
    Per variant and instance count: the primary's (and the standby's) CPU
    per committed message above the writes alone, in all and per instance.
    """
    base = next((row for row in summary if row["instances"] == 0), None)
    base_pg = None if base is None else base["pg_cpu_us"]
    base_sb = None if base is None else base["standby_cpu_us"]
    out: dict[str, dict[int, dict[str, float | None]]] = {}
    for row in summary:
        n = row["instances"]
        if n == 0:
            continue
        added = None if base_pg is None or row["pg_cpu_us"] is None else row["pg_cpu_us"] - base_pg
        added_sb = (
            None
            if base_sb is None or row["standby_cpu_us"] is None
            else row["standby_cpu_us"] - base_sb
        )
        out.setdefault(row["variant"], {})[n] = {
            "pg_added_us": added,
            "pg_added_per_instance_us": None if added is None else added / n,
            "standby_added_us": added_sb,
        }
    return out


def _instances(s: dict[str, Any]) -> list[str]:
    summary = s["summary"]
    costs = instance_costs(summary)
    out = [
        "### More instances on one database"
        + (f": {', '.join(v['name'] for v in s['variants'])}" if "not_measured" not in s else ""),
        "",
        _measured(s),
        "",
        f"pgbench commits single-row INSERTs at {num(s['rate'])}/s (synchronous_commit on) to "
        f"{num(s['users'])} users, every one connected to one of the instances; {s['reps']} runs "
        f"of {num(s['seconds'])} s per case, alternating, medians. CPU is per committed message: "
        "the primary's whole cluster (every backend, the WAL writer, the checkpointer), and the "
        "standby's when there is one. *Writes alone* runs no notifyd: what the application's "
        "commits cost by themselves, the baseline every added instance is measured against; "
        "the bench holds the polling lease meanwhile, so that the triggers skip their NOTIFY as "
        "they do while instances poll at this rate. "
        "The instances run with `NOTIFYD_POLL_ABOVE=200`: above 200 writing transactions a "
        "second each polls, one read per `NOTIFYD_BATCH_INTERVAL_MS`: its cost is per second more than per "
        "message, hence the share of a core.",
        "",
    ]
    ordered = sorted(summary, key=lambda row: row["instances"] != 0)  # writes alone first
    primary, other = [], []
    for row in ordered:
        n = row["instances"]
        cost = costs.get(row["variant"], {}).get(n, {})
        backends = row.get("backends_cpu_us")
        per_backend = None if backends is None or not n else backends / n
        share = None if per_backend is None else per_backend * row["committed_per_s"] / 1e6 * 100
        primary.append(
            (
                row["variant"], str(n), num(row["committed_per_s"]), num(row["pg_cpu_us"]),
                num(cost.get("pg_added_us")), num(cost.get("pg_added_per_instance_us")),
                num(backends), num(per_backend), num(share, 1),
            )
        )  # fmt: skip
        standby_backends = row.get("standby_backends_cpu_us")
        other.append(
            (
                row["variant"], str(n), num(row["standby_cpu_us"]), num(standby_backends),
                num(None if standby_backends is None or not n else standby_backends / n),
                num(row["server_cpu_us"]), num(row["p99_ms"], 1),
                f"{num(row['lost'])} / {num(row['duplicates'])} of {num(row['rows'])}",
            )
        )  # fmt: skip
    out += [
        "The primary. *Cluster* is every process of it; *above writes alone* subtracts the "
        "baseline; *instances' backends* is the CPU of the connections the instances hold "
        "(their window reads, LISTEN, probe and lease), read per backend, which the other "
        "tenants of a shared machine disturb far less than the cluster's total:",
        "",
    ]
    out += table(
        ("deployment", "instances", "commits/s", "cluster µs/message", "above writes alone",
         "per instance", "instances' backends µs/message", "per instance",
         "per instance, % of a core"),
        primary,
    )  # fmt: skip
    out += ["", "The standby, notifyd itself and the deliveries:", ""]
    out += table(
        ("deployment", "instances", "standby cluster µs/message", "instances' backends there",
         "per instance", "notifyd µs/message (all instances)", "p99 ms", "lost / twice"),
        other,
    )  # fmt: skip
    notes = s.get("not_measured") or []
    if notes:
        out += ["", "Not measured in this run: " + "; ".join(notes) + "."]
    slopes = []
    for variant in dict.fromkeys(row["variant"] for row in ordered if row["instances"]):
        rows = [row for row in ordered if row["variant"] == variant and row["instances"]]
        backends = [
            row["backends_cpu_us"] / row["instances"]
            for row in rows
            if row.get("backends_cpu_us") is not None
        ]
        cluster = [
            c["pg_added_per_instance_us"]
            for c in costs.get(variant, {}).values()
            if c["pg_added_per_instance_us"] is not None
        ]
        if backends or cluster:
            slopes.append(
                f"{variant}: {num(statistics.median(backends) if backends else None)} µs of "
                f"primary CPU per message per instance by its backends, "
                f"{num(statistics.median(cluster) if cluster else None)} µs by the whole cluster "
                f"(medians over {', '.join(str(row['instances']) for row in rows)} instances)"
            )
    if slopes:
        out += ["", "Each added instance costs the primary: " + "; ".join(slopes) + "."]
    return out


def scale_section(r: Results) -> list[str]:
    """
    The section, or nothing when the run has no scale figures.
    """
    scale = r.get("scale")
    if not scale:
        return []
    out = [
        "## Scale",
        "",
        "`python -m bench scale` (its own run; the rest of this page is not affected). "
        "The capacity model built on these figures is in [scaling.md](scaling.md).",
        "",
    ]
    for key in ("sessions", "sessions_workers"):
        if key in scale:
            out += [*_sessions(scale[key]), ""]
    for key in sorted(k for k in scale if k.startswith("instances")):
        out += [*_instances(scale[key]), ""]
    return out
