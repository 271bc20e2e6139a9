"""
The report's tables: the yardstick's targets with their verdicts, the
notifyd-against-naive figures, and every step of each ramp.
"""

from __future__ import annotations

from typing import Any

from .common import (
    TIMES,
    Results,
    best_step,
    common_target,
    field,
    latencies,
    num,
    p99_of,
    ratio,
    saturation_step,
    step_at,
    sustained,
    table,
    trigger_rate,
    writers_capped,
)

__all__ = ["figures", "ramp_table", "targets"]


def targets(r: Results) -> list[tuple[str, str, str]]:
    nd, nv, plan = r["notifyd"], r["naive"], r["plan"]
    out: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None, note: str = "") -> str:
        base = "n/a" if ok is None else ("**met**" if ok else "**missed**")
        return f"{base} {note}".rstrip()

    sessions = nd["idle"]["opened"]
    good = nd["single"]["last_good"]
    full_size = sessions >= 10_000
    out.append((
        "Keep up with ~5,000 single-row commits/s, 10,000 sessions connected, p99 < 20 ms",
        f"sustained {sustained(nd['single'])} commits/s with {num(sessions)} sessions",
        verdict(good is not None and good >= 5000 if full_size else None,
                "" if full_size else f"(only {num(sessions)} sessions in this run)"),
    ))  # fmt: skip
    bb = best_step(nd["batch"])
    rate = bb["deliveries_per_s"] if bb else None
    if bb is not None:
        measured = f"{num(rate)} deliveries/s sustained (target step {sustained(nd['batch'])})"
    elif nd["batch"]["steps"]:
        top = max(nd["batch"]["steps"], key=lambda s: s["deliveries_per_s"])
        measured = (
            f"no step sustained at p99 ≤ {plan['batch_p99_ms']:.0f} ms; highest measured "
            f"{num(top['deliveries_per_s'])} deliveries/s (p99 {num(p99_of(top))} ms)"
        )
    else:
        measured = "not run"
    out.append((
        "100-row statements ≥ 60,000 deliveries/s", measured, verdict(rate is not None and rate >= 60_000),
    ))  # fmt: skip
    step = best_step(nd["single"]) or (nd["single"]["steps"][0] if nd["single"]["steps"] else None)
    cpu = step["server_cpu_ms_per_1000"] if step else None
    sat = saturation_step(nd["batch"])
    sat_cpu = sat["server_cpu_ms_per_1000"] if sat else None
    # The step with the most deliveries passed: the ramp ended before notifyd
    # saturated.
    unsaturated = sat is not None and bool(sat["ok"])
    out.append((
        "CPU per delivered message < 15 µs at saturation",
        f"{num(sat_cpu, 1)} µs at "
        + ("the highest load measured, not saturated" if unsaturated else "saturation")
        + f" (100-row statements, {num(field(sat, 'deliveries_per_s'))} "
        f"deliveries/s); {num(cpu, 1)} µs at the highest sustained single-row step "
        f"({num(step and step['target'])} commits/s)",
        verdict(None if sat_cpu is None or unsaturated else sat_cpu < 15,
                "(the ramp never saturated notifyd)" if unsaturated else ""),
    ))  # fmt: skip
    ann = nd.get("announcement", {}).get("median_last_ms")
    floor = r["machine"].get("fanout_floor", {}).get("median_ms")
    out.append((
        "Announcement to 10,000 sessions < 100 ms",
        f"{num(ann, 1)} ms to {num(sessions)} sessions"
        + (f"; bare `send()` calls alone take {num(floor, 1)} ms here ({ratio(ann, floor)}{TIMES} that floor)"
           if floor else ""),
        verdict(None if ann is None or not full_size else ann < 100,
                "" if full_size else f"(only {num(sessions)} sessions in this run)"),
    ))  # fmt: skip
    kib = nd["idle"]["kib_per_session"]
    out.append(("Idle session < 16 KiB", f"{num(kib, 1)} KiB", verdict(kib < 16)))
    none, with_trigger = trigger_rate(r, 100, "none"), trigger_rate(r, 100, "notifyd")
    share = None if none is None or with_trigger is None else with_trigger / none
    out.append((
        "Trigger keeps ≥ 0.65 of no-trigger throughput, 100-row statements",
        num(share, 2) + (" (above 1: other load disturbed these runs; each round is in `bench/results.json`)"
                        if share is not None and share > 1.05 else ""),
        verdict(None if share is None or share > 1.05 else share >= 0.65),
    ))  # fmt: skip
    hello = nd["connect"]["big_user_median_ms"]
    out.append((
        f"hello for the {num(plan['hello_rows'])}-message user < 20 ms",
        f"{num(hello, 2)} ms (median)", verdict(hello < 20),
    ))  # fmt: skip
    a, b = nd["single"]["last_good"], nv["single"]["last_good"]
    factor = None if a is None or not b else a / b
    note = (
        "(both reached the top step: a lower bound)"
        if nd["single"]["ceiling_reached"] and nv["single"]["ceiling_reached"]
        else ""
    )

    if not note and writers_capped(nd["single"]) and writers_capped(nv["single"]):
        note = "(for both, the writers could not reach the next step's rate: the machine's ceiling, not the servers')"
    out.append((
        f"Sustained rate at p99 < 20 ms ≥ 1.5{TIMES} naive",
        f"{num(a)} vs {num(b)} commits/s = {num(factor, 2)}{TIMES}",
        verdict(None if factor is None else factor >= 1.5, note),
    ))  # fmt: skip
    return out


def _compare(
    label: str,
    notifyd: dict[str, Any] | None,
    naive: dict[str, Any] | None,
    key: str,
    digits: int,
    better: str,
) -> tuple[str, str, str, str, str]:
    """
    A figures row: one field of a notifyd step and of a naive step, and
    their ratio.
    """
    ours, theirs = field(notifyd, key), field(naive, key)
    return label, num(ours, digits), num(theirs, digits), ratio(ours, theirs), better


def figures(r: Results) -> list[tuple[str, str, str, str, str]]:
    """
    (figure, notifyd, naive, ratio, better) rows of the main table.
    """
    nd, nv = r["notifyd"], r["naive"]
    rows: list[tuple[str, str, str, str, str]] = []
    plan = r["plan"]

    s_nd, s_nv = nd["single"], nv["single"]
    b_nd, b_nv = best_step(s_nd), best_step(s_nv)
    rows.append((
        f"Highest sustained single-row rate, commits/s (p99 ≤ {plan['single_p99_ms']:.0f} ms, ≥ 90 % of target, nothing lost)",
        sustained(s_nd), sustained(s_nv), ratio(s_nd["last_good"], s_nv["last_good"]), "higher",
    ))  # fmt: skip
    rows.append(
        _compare("… deliveries/s at that step", b_nd, b_nv, "deliveries_per_s", 0, "higher")
    )
    rows.append((
        "… latency commit→receipt p50 / p99 / p99.9 / max, ms (each at its own highest step)",
        latencies(b_nd), latencies(b_nv), "p99 " + ratio(p99_of(b_nd), p99_of(b_nv)), "lower",
    ))  # fmt: skip
    rows.append(
        _compare(
            "… server CPU per 1,000 deliveries, ms (= µs per delivery), at own highest step",
            b_nd,
            b_nv,
            "server_cpu_ms_per_1000",
            1,
            "lower",
        )
    )
    common = common_target(s_nd, s_nv)
    c_nd, c_nv = step_at(s_nd, common), step_at(s_nv, common)
    rows.append((
        f"Same load for both: {num(common)} commits/s, latency p50 / p99 / p99.9 / max, ms",
        latencies(c_nd), latencies(c_nv), "p99 " + ratio(p99_of(c_nd), p99_of(c_nv)), "lower",
    ))  # fmt: skip
    rows.append(
        _compare(
            f"… server CPU per 1,000 deliveries at {num(common)}/s, ms",
            c_nd,
            c_nv,
            "server_cpu_ms_per_1000",
            1,
            "lower",
        )
    )
    rows.append(
        _compare(
            f"… Postgres CPU (all backends) per 1,000 deliveries at {num(common)}/s, ms",
            c_nd,
            c_nv,
            "pg_cpu_ms_per_1000",
            1,
            "lower",
        )
    )

    m_nd, m_nv = nd["batch"], nv["batch"]
    bb_nd, bb_nv = best_step(m_nd), best_step(m_nv)
    rows.append((
        f"100-row statements: highest sustained target, deliveries/s (p99 ≤ {plan['batch_p99_ms']:.0f} ms, nothing lost)",
        sustained(m_nd), sustained(m_nv), ratio(m_nd["last_good"], m_nv["last_good"]), "higher",
    ))  # fmt: skip
    rows.append(
        _compare(
            "… measured deliveries/s at that step", bb_nd, bb_nv, "deliveries_per_s", 0, "higher"
        )
    )
    rows.append((
        "… latency p50 / p99 / p99.9 / max, ms (own highest step)", latencies(bb_nd), latencies(bb_nv),
        "p99 " + ratio(p99_of(bb_nd), p99_of(bb_nv)), "lower",
    ))  # fmt: skip
    sat_nd, sat_nv = saturation_step(m_nd), saturation_step(m_nv)
    rows.append((
        "… at saturation: most deliveries/s measured in any step, whatever the latency (target of that step)",
        f"{num(field(sat_nd, 'deliveries_per_s'))} ({num(field(sat_nd, 'target'))})",
        f"{num(field(sat_nv, 'deliveries_per_s'))} ({num(field(sat_nv, 'target'))})",
        ratio(field(sat_nd, "deliveries_per_s"), field(sat_nv, "deliveries_per_s")), "higher",
    ))  # fmt: skip
    rows.append(
        _compare(
            "… server CPU per 1,000 deliveries at saturation, ms",
            sat_nd,
            sat_nv,
            "server_cpu_ms_per_1000",
            1,
            "lower",
        )
    )
    bcommon = common_target(m_nd, m_nv)
    bc_nd, bc_nv = step_at(m_nd, bcommon), step_at(m_nv, bcommon)
    rows.append(
        _compare(
            f"… server CPU per 1,000 deliveries at {num(bcommon)} deliveries/s, ms",
            bc_nd,
            bc_nv,
            "server_cpu_ms_per_1000",
            1,
            "lower",
        )
    )

    g_nd, g_nv = nd.get("server_gc", {}), nv.get("server_gc", {})
    rows.append((
        "Longest collector pause in the server during the run, ms (full passes; their median)",
        f"{num(g_nd.get('max_ms'))} ({num(g_nd.get('full_passes'))}; {num(g_nd.get('full_median_ms'))})",
        f"{num(g_nv.get('max_ms'))} ({num(g_nv.get('full_passes'))}; {num(g_nv.get('full_median_ms'))})",
        ratio(g_nd.get("max_ms"), g_nv.get("max_ms")), "lower",
    ))  # fmt: skip
    i_nd, i_nv = nd["idle"], nv["idle"]
    rows.append((
        f"RSS per idle session, KiB ({num(i_nd['opened'])} sessions)",
        num(i_nd["kib_per_session"], 1), num(i_nv["kib_per_session"], 1),
        ratio(i_nd["kib_per_session"], i_nv["kib_per_session"]), "lower",
    ))  # fmt: skip
    rows.append((
        "Time to open all idle sessions, s (2 client processes, 100 concurrent handshakes)",
        num(i_nd["seconds"], 1), num(i_nv["seconds"], 1), ratio(i_nd["seconds"], i_nv["seconds"]), "lower",
    ))  # fmt: skip
    ann = nd.get("announcement", {})
    rows.append((
        f"Announcement to every session: commit → last session received, ms (median of {len(ann.get('reps', []))})",
        num(ann.get("median_last_ms"), 1), "n/a (no announcements)", "n/a", "lower",
    ))  # fmt: skip
    con_nd, con_nv = nd["connect"], nv["connect"]
    rows.append((
        f"Open a session for a user with {num(plan['hello_rows'])} messages (half unread), median of "
        f"{plan['hello_connects']}, ms (notifyd: connect + hello; naive: connect only)",
        num(con_nd["big_user_median_ms"], 2), num(con_nv["big_user_median_ms"], 2),
        ratio(con_nd["big_user_median_ms"], con_nv["big_user_median_ms"]), "lower",
    ))  # fmt: skip
    rows.append((
        "… same for a user with no messages, ms",
        num(con_nd["fresh_user_median_ms"], 2), num(con_nv["fresh_user_median_ms"], 2),
        ratio(con_nd["fresh_user_median_ms"], con_nv["fresh_user_median_ms"]), "lower",
    ))  # fmt: skip
    rows.append((
        f"Delivery stalled by one {num(plan['hello_rows'])}-row INSERT (commit → next hello), s",
        num(con_nd.get("catch_up_s"), 2), "n/a", "n/a", "lower",
    ))  # fmt: skip
    for size in (1, 100):
        none = trigger_rate(r, size, "none")
        t_nd, t_nv = trigger_rate(r, size, "notifyd"), trigger_rate(r, size, "naive")
        rows.append((
            f"INSERT throughput, {size}-row statements: rows/s with the trigger (no trigger: {num(none)})",
            num(t_nd), num(t_nv), ratio(t_nd, t_nv), "higher",
        ))  # fmt: skip
        rows.append((
            f"… share of the no-trigger throughput, {size}-row statements",
            ratio(t_nd, none), ratio(t_nv, none), ratio(t_nd, t_nv), "higher",
        ))  # fmt: skip
    return rows


def ramp_table(kind: str, ramp: dict[str, Any]) -> list[str]:
    rows = []
    for s in ramp["steps"]:
        rows.append((
            num(s["target"]) + (f" (try {s['attempt']})" if s.get("attempt", 1) > 1 else ""), num(s["sent_per_s"]), f"{num(s['delivered'])} / {num(s['expected'])}",
            num(s["deliveries_per_s"]), latencies(s), num(s["server_cpu_ms_per_1000"], 1),
            num(s["pg_cpu_ms_per_1000"], 1), num(s.get("server_gc_max_ms")), num(s.get("other_load_cores"), 2),
            num(s.get("client_gc_max_ms")), "ok" if s["ok"] else f"fail: {s['why']}",
        ))  # fmt: skip
    return table(
        ("target/s", "sent/s", "delivered / expected", "deliveries/s", "p50 / p99 / p99.9 / max ms",
         "server CPU ms/1000", "PG CPU ms/1000", "server GC max ms", "other load, cores", "client GC max ms",
         "verdict"),
        rows,
    )  # fmt: skip
