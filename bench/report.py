"""
Render ``bench/results.json`` as ``docs/performance.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["render"]

Results = dict[str, Any]


def _n(value: float | int | None, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".rstrip()


def _ratio(a: float | int | None, b: float | int | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}"


def _lat(step: dict[str, Any] | None) -> str:
    if step is None or step["latency_ms"]["p50"] is None:
        return "n/a"
    lat = step["latency_ms"]
    return f"{lat['p50']:.1f} / {lat['p99']:.1f} / {lat['p999']:.1f} / {lat['max']:.1f}"


def _get(step: dict[str, Any] | None, key: str) -> float | None:
    return None if step is None else step[key]


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
    ours, theirs = _get(notifyd, key), _get(naive, key)
    return label, _n(ours, digits), _n(theirs, digits), _ratio(ours, theirs), better


def _p99(step: dict[str, Any] | None) -> float | None:
    return None if step is None else step["latency_ms"]["p99"]


def _step(ramp: dict[str, Any], target: int | None) -> dict[str, Any] | None:
    if target is None:
        return None
    # The last attempt at that target (a failed step is retried once).
    return next((s for s in reversed(ramp["steps"]) if s["target"] == target), None)


def _best(ramp: dict[str, Any]) -> dict[str, Any] | None:
    return _step(ramp, ramp["last_good"])


def _common(a: dict[str, Any], b: dict[str, Any]) -> int | None:
    if a["last_good"] is None or b["last_good"] is None:
        return None
    return int(min(a["last_good"], b["last_good"]))


def _sustained(ramp: dict[str, Any]) -> str:
    if ramp["last_good"] is None:
        return "none (first step failed)"
    return ("≥ " if ramp["ceiling_reached"] else "") + _n(ramp["last_good"])


def _trigger(results: Results, rows: int, trigger: str) -> float | None:
    for case in results.get("trigger", {}).get("cases", []):
        if case["rows_per_statement"] == rows and case["trigger"] == trigger:
            return float(case["rows_per_s"])
    return None


def _figures(r: Results) -> list[tuple[str, str, str, str, str]]:
    """
    (figure, notifyd, naive, ratio, better) rows of the main table.
    """
    nd, nv = r["notifyd"], r["naive"]
    rows: list[tuple[str, str, str, str, str]] = []
    plan = r["plan"]

    s_nd, s_nv = nd["single"], nv["single"]
    b_nd, b_nv = _best(s_nd), _best(s_nv)
    rows.append((
        f"Highest sustained single-row rate, commits/s (p99 ≤ {plan['single_p99_ms']:.0f} ms, ≥ 90 % of target, nothing lost)",
        _sustained(s_nd), _sustained(s_nv), _ratio(s_nd["last_good"], s_nv["last_good"]), "higher",
    ))  # fmt: skip
    rows.append(
        _compare("… deliveries/s at that step", b_nd, b_nv, "deliveries_per_s", 0, "higher")
    )
    rows.append((
        "… latency commit→receipt p50 / p99 / p99.9 / max, ms (each at its own highest step)",
        _lat(b_nd), _lat(b_nv), "p99 " + _ratio(_p99(b_nd), _p99(b_nv)), "lower",
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
    common = _common(s_nd, s_nv)
    c_nd, c_nv = _step(s_nd, common), _step(s_nv, common)
    rows.append((
        f"Same load for both: {_n(common)} commits/s, latency p50 / p99 / p99.9 / max, ms",
        _lat(c_nd), _lat(c_nv), "p99 " + _ratio(_p99(c_nd), _p99(c_nv)), "lower",
    ))  # fmt: skip
    rows.append(
        _compare(
            f"… server CPU per 1,000 deliveries at {_n(common)}/s, ms",
            c_nd,
            c_nv,
            "server_cpu_ms_per_1000",
            1,
            "lower",
        )
    )
    rows.append(
        _compare(
            f"… Postgres CPU (all backends) per 1,000 deliveries at {_n(common)}/s, ms",
            c_nd,
            c_nv,
            "pg_cpu_ms_per_1000",
            1,
            "lower",
        )
    )

    m_nd, m_nv = nd["batch"], nv["batch"]
    bb_nd, bb_nv = _best(m_nd), _best(m_nv)
    rows.append((
        f"100-row statements: highest sustained target, deliveries/s (p99 ≤ {plan['batch_p99_ms']:.0f} ms, nothing lost)",
        _sustained(m_nd), _sustained(m_nv), _ratio(m_nd["last_good"], m_nv["last_good"]), "higher",
    ))  # fmt: skip
    rows.append(
        _compare(
            "… measured deliveries/s at that step", bb_nd, bb_nv, "deliveries_per_s", 0, "higher"
        )
    )
    rows.append((
        "… latency p50 / p99 / p99.9 / max, ms (own highest step)", _lat(bb_nd), _lat(bb_nv),
        "p99 " + _ratio(_p99(bb_nd), _p99(bb_nv)), "lower",
    ))  # fmt: skip
    sat_nd, sat_nv = _saturation(m_nd), _saturation(m_nv)
    rows.append((
        "… at saturation: most deliveries/s measured in any step, whatever the latency (target of that step)",
        f"{_n(_get(sat_nd, 'deliveries_per_s'))} ({_n(_get(sat_nd, 'target'))})",
        f"{_n(_get(sat_nv, 'deliveries_per_s'))} ({_n(_get(sat_nv, 'target'))})",
        _ratio(_get(sat_nd, "deliveries_per_s"), _get(sat_nv, "deliveries_per_s")), "higher",
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
    bcommon = _common(m_nd, m_nv)
    bc_nd, bc_nv = _step(m_nd, bcommon), _step(m_nv, bcommon)
    rows.append(
        _compare(
            f"… server CPU per 1,000 deliveries at {_n(bcommon)} deliveries/s, ms",
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
        f"{_n(g_nd.get('max_ms'))} ({_n(g_nd.get('full_passes'))}; {_n(g_nd.get('full_median_ms'))})",
        f"{_n(g_nv.get('max_ms'))} ({_n(g_nv.get('full_passes'))}; {_n(g_nv.get('full_median_ms'))})",
        _ratio(g_nd.get("max_ms"), g_nv.get("max_ms")), "lower",
    ))  # fmt: skip
    i_nd, i_nv = nd["idle"], nv["idle"]
    rows.append((
        f"RSS per idle session, KiB ({_n(i_nd['opened'])} sessions)",
        _n(i_nd["kib_per_session"], 1), _n(i_nv["kib_per_session"], 1),
        _ratio(i_nd["kib_per_session"], i_nv["kib_per_session"]), "lower",
    ))  # fmt: skip
    rows.append((
        "Time to open all idle sessions, s (2 client processes, 100 concurrent handshakes)",
        _n(i_nd["seconds"], 1), _n(i_nv["seconds"], 1), _ratio(i_nd["seconds"], i_nv["seconds"]), "lower",
    ))  # fmt: skip
    ann = nd.get("announcement", {})
    rows.append((
        f"Announcement to every session: commit → last session received, ms (median of {len(ann.get('reps', []))})",
        _n(ann.get("median_last_ms"), 1), "n/a (no announcements)", "n/a", "lower",
    ))  # fmt: skip
    con_nd, con_nv = nd["connect"], nv["connect"]
    rows.append((
        f"Open a session for a user with {_n(plan['hello_rows'])} messages (half unread), median of "
        f"{plan['hello_connects']}, ms (notifyd: connect + hello; naive: connect only)",
        _n(con_nd["big_user_median_ms"], 2), _n(con_nv["big_user_median_ms"], 2),
        _ratio(con_nd["big_user_median_ms"], con_nv["big_user_median_ms"]), "lower",
    ))  # fmt: skip
    rows.append((
        "… same for a user with no messages, ms",
        _n(con_nd["fresh_user_median_ms"], 2), _n(con_nv["fresh_user_median_ms"], 2),
        _ratio(con_nd["fresh_user_median_ms"], con_nv["fresh_user_median_ms"]), "lower",
    ))  # fmt: skip
    rows.append((
        f"Delivery stalled by one {_n(plan['hello_rows'])}-row INSERT (commit → next hello), s",
        _n(con_nd.get("catch_up_s"), 2), "n/a", "n/a", "lower",
    ))  # fmt: skip
    for size in (1, 100):
        none = _trigger(r, size, "none")
        t_nd, t_nv = _trigger(r, size, "notifyd"), _trigger(r, size, "naive")
        rows.append((
            f"INSERT throughput, {size}-row statements: rows/s with the trigger (no trigger: {_n(none)})",
            _n(t_nd), _n(t_nv), _ratio(t_nd, t_nv), "higher",
        ))  # fmt: skip
        rows.append((
            f"… share of the no-trigger throughput, {size}-row statements",
            _ratio(t_nd, none), _ratio(t_nv, none), _ratio(t_nd, t_nv), "higher",
        ))  # fmt: skip
    return rows


def writers_capped(ramp: dict[str, Any]) -> bool:
    """
    Whether every attempt at the step after the highest sustained one failed
    because the writers could not reach its rate (the machine's ceiling).
    """
    failed = _failed_above(ramp)
    return bool(failed) and all("writers reached" in s["why"] for s in failed)


def _failed_above(ramp: dict[str, Any]) -> list[dict[str, Any]]:
    """
    The failed attempts above the highest sustained step.
    """
    good = ramp["last_good"] or 0
    return [s for s in ramp["steps"] if not s["ok"] and s["target"] > good]


def _saturation(ramp: dict[str, Any]) -> dict[str, Any] | None:
    """
    The step with the most deliveries per second, whatever its latency: the
    server at saturation.
    """
    steps = [s for s in ramp["steps"] if s["delivered"]]
    return max(steps, key=lambda s: s["deliveries_per_s"]) if steps else None


def _targets(r: Results) -> list[tuple[str, str, str]]:
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
        f"sustained {_sustained(nd['single'])} commits/s with {_n(sessions)} sessions",
        verdict(good is not None and good >= 5000 if full_size else None,
                "" if full_size else f"(only {_n(sessions)} sessions in this run)"),
    ))  # fmt: skip
    bb = _best(nd["batch"])
    rate = bb["deliveries_per_s"] if bb else None
    if bb is not None:
        measured = f"{_n(rate)} deliveries/s sustained (target step {_sustained(nd['batch'])})"
    elif nd["batch"]["steps"]:
        top = max(nd["batch"]["steps"], key=lambda s: s["deliveries_per_s"])
        measured = (
            f"no step sustained at p99 ≤ {plan['batch_p99_ms']:.0f} ms; highest measured "
            f"{_n(top['deliveries_per_s'])} deliveries/s (p99 {_n(_p99(top))} ms)"
        )
    else:
        measured = "not run"
    out.append((
        "100-row statements ≥ 60,000 deliveries/s", measured, verdict(rate is not None and rate >= 60_000),
    ))  # fmt: skip
    step = _best(nd["single"]) or (nd["single"]["steps"][0] if nd["single"]["steps"] else None)
    cpu = step["server_cpu_ms_per_1000"] if step else None
    sat = _saturation(nd["batch"])
    sat_cpu = sat["server_cpu_ms_per_1000"] if sat else None
    out.append((
        "CPU per delivered message < 15 µs at saturation",
        f"{_n(sat_cpu, 1)} µs at "
        + ("saturation" if sat is None or not sat["ok"] else "the highest load measured, not saturated")
        + f" (100-row statements, {_n(sat and sat['deliveries_per_s'])} "
        f"deliveries/s); {_n(cpu, 1)} µs at the highest sustained single-row step "
        f"({_n(step and step['target'])} commits/s)",
        verdict(None if sat_cpu is None or sat["ok"] else sat_cpu < 15,
                "" if sat is None or not sat["ok"] else "(the ramp never saturated notifyd)"),
    ))  # fmt: skip
    ann = nd.get("announcement", {}).get("median_last_ms")
    floor = r["machine"].get("fanout_floor", {}).get("median_ms")
    out.append((
        "Announcement to 10,000 sessions < 100 ms",
        f"{_n(ann, 1)} ms to {_n(sessions)} sessions"
        + (f"; bare `send()` calls alone take {_n(floor, 1)} ms here ({_ratio(ann, floor)}× that floor)"
           if floor else ""),
        verdict(None if ann is None or not full_size else ann < 100,
                "" if full_size else f"(only {_n(sessions)} sessions in this run)"),
    ))  # fmt: skip
    kib = nd["idle"]["kib_per_session"]
    out.append(("Idle session < 16 KiB", f"{_n(kib, 1)} KiB", verdict(kib < 16)))
    none, with_trigger = _trigger(r, 100, "none"), _trigger(r, 100, "notifyd")
    share = None if none is None or with_trigger is None else with_trigger / none
    out.append((
        "Trigger keeps ≥ 0.65 of no-trigger throughput, 100-row statements",
        _n(share, 2) + (" (above 1: other load disturbed these runs; each round is in `bench/results.json`)"
                        if share is not None and share > 1.05 else ""),
        verdict(None if share is None or share > 1.05 else share >= 0.65),
    ))  # fmt: skip
    hello = nd["connect"]["big_user_median_ms"]
    out.append((
        f"hello for the {_n(plan['hello_rows'])}-message user < 20 ms",
        f"{_n(hello, 2)} ms (median)", verdict(hello < 20),
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
        "Sustained rate at p99 < 20 ms ≥ 1.5× naive",
        f"{_n(a)} vs {_n(b)} commits/s = {_n(factor, 2)}×",
        verdict(None if factor is None else factor >= 1.5, note),
    ))  # fmt: skip
    return out


def _sources(r: Results) -> str:
    """
    Which notifyd sources the measured processes imported.
    """
    main = r["notifyd"].get("source") or r.get("notifyd_source", {})
    prof = (r.get("profile") or {}).get("source")
    text = f"notifyd sources (sha256 of `notifyd/*.py` + schema): `{main.get('sha256', '?')}`, newest file {main.get('newest_file', '?')}"
    if prof and prof.get("sha256") != main.get("sha256"):
        text += (
            f"; **the sources changed during the run**: the cProfile run imported `{prof['sha256']}` "
            f"(newest file {prof['newest_file']})"
        )
    elif r.get("notifyd_source", {}).get("changed_during_run"):
        text += "; the sources changed after the measured processes had started"
    return text + "."


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _steps(kind: str, ramp: dict[str, Any]) -> list[str]:
    rows = []
    for s in ramp["steps"]:
        rows.append((
            _n(s["target"]) + (f" (try {s['attempt']})" if s.get("attempt", 1) > 1 else ""), _n(s["sent_per_s"]), f"{_n(s['delivered'])} / {_n(s['expected'])}",
            _n(s["deliveries_per_s"]), _lat(s), _n(s["server_cpu_ms_per_1000"], 1),
            _n(s["pg_cpu_ms_per_1000"], 1), _n(s.get("server_gc_max_ms")), _n(s.get("other_load_cores"), 2),
            _n(s.get("client_gc_max_ms")), "ok" if s["ok"] else f"fail: {s['why']}",
        ))  # fmt: skip
    return _table(
        ("target/s", "sent/s", "delivered / expected", "deliveries/s", "p50 / p99 / p99.9 / max ms",
         "server CPU ms/1000", "PG CPU ms/1000", "server GC max ms", "other load, cores", "client GC max ms",
         "verdict"),
        rows,
    )  # fmt: skip


def render(r: Results) -> str:
    m, plan = r["machine"], r["plan"]
    out: list[str] = ["# notifyd performance", ""]
    out += [
        "Generated by the benchmark harness in `bench/` (do not edit by hand; rerun it).",
        "",
        "```sh",
        r.get("command", "python -m bench"),
        "```",
        "",
        f"Mode **{plan['mode']}**, runtime {_n(r.get('runtime_s'))} s. Raw figures: `bench/results.json`.",
        "",
        "## Machine",
        "",
        f"- {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB RAM, Linux {m['kernel']}; shared and noisy "
        f"(load average at start {m['load_average_at_start']}). Everything is co-located: Postgres, the server, "
        f"{plan['client_procs']} client processes and {plan['writer_procs']} writer processes share the CPUs.",
        f"- Python {m['python']}, PostgreSQL {m.get('postgres', '?')} ({r.get('postgres', '')}; "
        f"{', '.join(f'{k}={v}' for k, v in m.get('postgres_settings', {}).items())}).",
        f"- Date: {m['date']}. {_sources(r)}",
        *(
            [
                f"- Kernel floor: one {m['loopback_send']['frame_bytes']}-byte `send()` over loopback TCP to a "
                f"reading process costs {m['loopback_send']['cpu_us_per_send']:.1f} µs of sender CPU "
                f"({m['loopback_send']['wall_us_per_send']:.1f} µs wall) on this machine"
                + (
                    f", {m['loopback_send']['cpu_us_per_send_back_to_back']:.1f} µs when sent back to back "
                    f"round robin over {m['loopback_send'].get('fanout', 1)} connections (a fan-out burst: the "
                    "reader stays awake); most of the first figure is waking the reader"
                    if "cpu_us_per_send_back_to_back" in m["loopback_send"]
                    else ""
                )
                + ". Every write a server makes pays it at least once."
            ]
            if "loopback_send" in m
            else []
        ),
        *(
            [
                f"- Fan-out floor: one {m['fanout_floor']['frame_bytes']}-byte `send()` to each of "
                f"{_n(m['fanout_floor']['connections'])} loopback connections read by "
                f"{m['fanout_floor']['readers']} processes, from a plain loop with no server around it, takes "
                f"{m['fanout_floor']['median_ms']:.1f} ms until the last byte is read "
                f"({m['fanout_floor']['sender_cpu_us_per_send']:.1f} µs of sender CPU per `send()`): "
                "no server can announce to that many sessions here faster."
            ]
            if "fanout_floor" in m
            else []
        ),
        "",
        "## Yardstick",
        "",
        "Targets for notifyd: keep up at ~5,000 single-row commits/s with 10,000 users connected with "
        "p99 < 20 ms; 100-row statements ≥ 60,000 deliveries/s; CPU per delivered message < 15 µs at saturation; "
        "announcement to 10,000 sessions < 100 ms; idle session < 16 KiB; the trigger keeps ≥ 0.65 of "
        "no-trigger throughput for 100-row statements; hello for a user with 100,000 messages < 20 ms; "
        "sustained rate at p99 < 20 ms ≥ 1.5× the naive pipeline.",
        "",
    ]
    out += _table(("Target", "Measured", "Verdict"), _targets(r))
    out += [
        "",
        "## Figures",
        "",
        "Ratio = notifyd ÷ naive; the last column says which direction is better.",
        "",
    ]
    out += _table(("Figure", "notifyd", "naive", "ratio", "better"), _figures(r))
    out += ["", *_misses(r)]
    out += ["", "## Ramps", ""]
    for kind in ("notifyd", "naive"):
        for mode, title in (
            ("single", "single-row commits/s"),
            ("batch", "deliveries/s in 100-row statements"),
        ):
            out += [f"### {kind}: {title}", ""]
            out += _steps(kind, r[kind][mode])
            out.append("")
    out += _method(r)
    prof = r.get("profile")
    if prof:
        step = prof.get("step")
        out += [
            "## Profile",
            "",
            f"notifyd under `python -m cProfile -o … -m notifyd serve`, {_n(prof['sessions'])} sessions, one "
            f"single-row step at {_n(prof['rate'])} commits/s (its highest sustained step); stopped with SIGINT "
            f"(exit {prof.get('exit_code')}), profile {_n(prof.get('profile_bytes'))} bytes. Under the profiler: "
            + (f"{_n(step['deliveries_per_s'])} deliveries/s, latency {_lat(step)} ms, "
               f"{'kept up' if step['ok'] else 'fell behind: ' + step['why']}." if step else "no step figures.")
            + " The profile covers the whole process lifetime (start-up, session opens, the step, shutdown).",
            "",
            "Top 15 by cumulative time:",
            "",
            "```",
            prof.get("cumulative", ""),
            "```",
            "",
            "notifyd's own functions, top 15 by cumulative time:",
            "",
            "```",
            prof.get("notifyd_cumulative", ""),
            "```",
            "",
            "Top 15 by own (total) time:",
            "",
            "```",
            prof.get("tottime", ""),
            "```",
            "",
        ]  # fmt: skip
    warnings = r["notifyd"].get("log_warnings") or []
    out += ["## notifyd log (WARNING and above) during its runs", ""]
    out += [f"    {line}" for line in warnings] if warnings else ["None."]
    out.append("")
    return "\n".join(out)


def _cores(step: dict[str, Any] | None, key: str) -> float | None:
    """
    CPU cores a step's figure per 1,000 deliveries amounts to at its rate.
    """
    if step is None or step.get(key) is None:
        return None
    return float(step[key]) * step["deliveries_per_s"] / 1e6


def _first_failure(ramp: dict[str, Any]) -> dict[str, Any] | None:
    failed = _failed_above(ramp)
    return failed[0] if failed else None


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
        f"{when} ({_n(step['target'])} deliveries/s asked, {_n(step['deliveries_per_s'])} delivered) "
        f"the cores went to {listed}: {total:.2f} of {nproc}."
    )


def _misses(r: Results) -> list[str]:
    """
    Where the time goes, for the targets that are missed: figures from this
    run, read against the machine's floor.
    """
    nd, nv, m = r["notifyd"], r["naive"], r["machine"]
    floor = m.get("loopback_send", {})
    wake, burst = floor.get("cpu_us_per_send"), floor.get("cpu_us_per_send_back_to_back")

    def next_failure(kind: str) -> str:
        failed = _failed_above(r[kind]["single"])
        if not failed:
            return f"{kind} passed every step"
        return f"{kind} failed at {_n(failed[0]['target'])}/s: " + "; ".join(
            f"“{s['why']}”" for s in failed
        )

    top = {kind: _best(r[kind]["single"]) for kind in ("notifyd", "naive")}
    sat = _saturation(nd["batch"])
    sessions = nd["idle"]["opened"]
    common = _common(nd["single"], nv["single"])
    at_common = {kind: _step(r[kind]["single"], common) for kind in ("notifyd", "naive")}
    fanout = m.get("fanout_floor", {}).get("median_ms")
    ann = nd.get("announcement", {}).get("median_last_ms")
    capped = [s for s in _failed_above(nd["single"]) if "writers reached" in s["why"]]
    naive_same = [s for s in nv["single"]["steps"] if capped and s["target"] == capped[0]["target"]]
    failed = _first_failure(nd["batch"])
    lines = [
        "## Where the time goes",
        "",
        "- **Single-row commits.** "
        f"notifyd's highest sustained step used {_n(_cores(top['notifyd'], 'pg_cpu_ms_per_1000'), 2)} cores of "
        f"Postgres and {_n(_cores(top['notifyd'], 'server_cpu_ms_per_1000'), 2)} of notifyd; the naive "
        f"pipeline's {_n(_cores(top['naive'], 'pg_cpu_ms_per_1000'), 2)} and "
        f"{_n(_cores(top['naive'], 'server_cpu_ms_per_1000'), 2)}, out of {m['nproc']}, shared with the writers, "
        f"the clients and other tenants. Above that, {next_failure('notifyd')}; {next_failure('naive')}."
        + (
            f" On {len(capped)} of notifyd's failed attempts the writers could not even commit at the target "
            f"rate (at most {_n(max(st['sent_per_s'] for st in capped))}/s"
            + (
                f"; {_n(max(st['sent_per_s'] for st in naive_same))}/s into the naive pipeline's table at "
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
            f" At {_n(common)} commits/s, the highest step both sustained, Postgres spent "
            f"{_n(_get(at_common['notifyd'], 'pg_cpu_ms_per_1000'), 1)} ms of CPU per 1,000 deliveries for "
            f"notifyd and {_n(_get(at_common['naive'], 'pg_cpu_ms_per_1000'), 1)} for naive: the difference "
            "is notifyd's reads (one query per burst of commits, where naive's NOTIFY carries the row) and its "
            "extra indexes (history, unread counts, resume)."
            if common is not None
            else ""
        ),
        "- **CPU per delivery.** Every delivery is at least one `send()` to the client's socket, and over "
        f"loopback the sender pays the receiver's side too: {_n(wake, 1)} µs when the reader has to be woken, "
        f"{_n(burst, 1)} µs back to back (see Machine). At low rates most writes wake a sleeping client "
        "process, so the figure per delivery falls as the load rises: "
        f"{_n(_get(sat, 'server_cpu_ms_per_1000'), 1)} µs at saturation. The profile below shows the split: "
        "`session.py (flush)` is the one write per session per delivery round.",
        f"- **Announcement to {_n(sessions)} sessions.** "
        + (
            f"A plain loop of `send()` calls to as many sockets takes {_n(fanout, 1)} ms here (see Machine), "
            f"so notifyd's {_n(ann, 1)} ms is {_ratio(ann, fanout)}× the cost of the writes alone. "
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
                    f"60,000 deliveries/s would take {_n(_get(sat, 'pg_cpu_ms_per_1000') * 60 / 1000, 2)} cores of "
                    "Postgres alone at the CPU per delivery it used at saturation (inserting and indexing the rows, "
                    "and notifyd's reads), before notifyd, the writers and the clients."
                    if _get(sat, "pg_cpu_ms_per_1000") is not None
                    else "",
                ],
            )
        ),
    ]
    return lines


def _method(r: Results) -> list[str]:
    plan = r["plan"]
    trig = r.get("trigger", {})
    return [
        "## Method",
        "",
        f"- **Sessions.** Each server gets {_n(plan['sessions'])} sessions (one per user, `user-0` …), opened "
        "once (notifyd first, then naive) and kept open until both servers are done; messages go to the first "
        f"{_n(plan['users'])} of them. The ramps interleave the two servers step by step (order alternating), "
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
        f"- **Writers.** {plan['writer_procs']} processes × {plan['writer_conns']} asyncpg connections, open-loop "
        "pacing (a late insert is sent at once, never skipped). Single-row: each to a random online user, 10 % "
        "to offline users (`offline-N`), so deliveries ≈ 0.9 × commits. 100-row: `INSERT … SELECT unnest($1)` "
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
        "deliveries/s = messages received ÷ (last receipt − first send). *Other load* is the machine's "
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
        f"- **Session open.** {_n(plan['hello_rows'])} rows for `{'bench-big'}` (every second one read) inserted "
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
