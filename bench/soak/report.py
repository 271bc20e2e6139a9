"""
``docs/soak.md`` from a soak run's results: the verdict first (loss,
duplicates, growth), then the trends, the events and the samples.
"""

from __future__ import annotations

import itertools
from typing import Any

__all__ = ["TRENDED", "render", "task_kinds"]

# The figures fitted for growth, with the unit each is shown in.
TRENDED = {
    "rss_mb": "RSS (MB)",
    "fds": "open descriptors",
    "tasks": "asyncio tasks",
    "loop_lag_ms": "event-loop lag (ms, worst of 10 s)",
    "python_blocks": "Python's live memory blocks",
    "anon_mapped_mb": "anonymous memory mapped (MB: heap, allocators' arenas, thread stacks)",
}


def _number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _machine(info: dict[str, Any]) -> str:
    load = info.get("load_average_at_start")
    return (
        f"{info.get('nproc', '?')} cores ({info.get('cpu_model', 'unknown')}), "
        f"{info.get('memory_gib', '?')} GiB, Python {info.get('python', '?')}, "
        f"{info.get('date', '')}" + (f", load average {load[0]:.2f} at the start" if load else "")
    )


def _second_half(trend: dict[str, Any] | None) -> str:
    if trend is None:
        return ""
    beyond = abs(trend["slope_per_h"]) > trend["noise_per_h"]
    if not beyond:
        verdict = " (within noise)"
    elif trend["slope_per_h"] < 0:
        verdict = " (falling beyond noise: no growth)"
    else:
        verdict = " (still beyond noise)"
    return (
        f"; over the second half alone {_number(trend['slope_per_h'])} per hour, noise "
        f"±{_number(trend['noise_per_h'])}" + verdict
    )


def verdict(results: dict[str, Any]) -> list[str]:
    """
    One line per target: nothing lost, nothing twice, nothing growing.
    """
    account = results["accounting"]
    lines = [
        f"- **{account['lost']} lost, {account['duplicates']} duplicated**, "
        f"{account['not_in_table']} delivered that the table does not hold, of "
        f"{account['committed']:,} committed messages "
        f"({account['resyncs']} resyncs, {account['unrecovered_resumes']} resumes not proven)."
    ]
    for event in results["events"]:
        if event["what"] == "notifyd restart":
            lines.append(
                f"- notifyd restarted at {event['at_s'] / 60:.1f} min (SIGTERM, then a new process "
                "on the same port, as systemd does): "
                + (
                    f"the last of {results['config']['sessions']:,} sessions live again "
                    f"{event['last_live_after_sigterm_s']:.1f} s after the SIGTERM "
                    f"({event['last_live_after_start_s']:.1f} s after the new process started; "
                    f"the old one took {event['stop_s']:.1f} s to stop)."
                    if event["all_live"]
                    else "**not every session was live again within 10 minutes**."
                )
            )
    trends = results["trends"]
    if any(event["what"] == "notifyd restart" for event in results["events"]):
        lines.append(
            "- Growth is not fitted: notifyd itself was restarted during the run, so the samples "
            "come from more than one process."
        )
        return lines
    for key, label in TRENDED.items():
        trend = trends.get(key)
        if trend is None:
            lines.append(f"- {label}: not sampled.")
            continue
        beyond = abs(trend["slope_per_h"]) > trend["noise_per_h"]
        lines.append(
            f"- {label}: {_number(trend['slope_per_h'])} per hour, noise "
            f"±{_number(trend['noise_per_h'])} per hour: "
            + ("**a slope beyond noise**" if beyond else "no slope beyond noise")
            + f" (from {_number(trend['first'])} to {_number(trend['last'])},"
            f" range {_number(trend['low'])} to {_number(trend['high'])})"
            + _second_half(trend.get("second_half"))
            + (_peak(results["samples"], trends["warmup_s"]) if key == "rss_mb" else "")
            + "."
        )
    return lines + _whose_growth(trends)


def _whose_growth(trends: dict[str, Any]) -> list[str]:
    """
    When RSS grows, whether Python's live blocks grew with it (objects that
    accumulate, or memory the allocator keeps after they are freed), and
    whether the anonymous memory mapped grew (or RSS grows inside it).
    """
    rss = trends.get("rss_mb")
    if rss is None or rss["slope_per_h"] <= rss["noise_per_h"]:
        return []
    return _blocks_growth(trends.get("python_blocks")) + _mapped_growth(
        trends.get("anon_mapped_mb")
    )


def _mapped_growth(mapped: dict[str, Any] | None) -> list[str]:
    if mapped is None:
        return []
    if mapped["slope_per_h"] > mapped["noise_per_h"]:
        return [
            "- The anonymous memory mapped grows too: the allocators take new memory from the "
            "system, so RSS has no bound in what is mapped."
        ]
    return [
        f"- The anonymous memory mapped does not grow ({_number(mapped['low'])} to "
        f"{_number(mapped['high'])} MB): RSS grows inside it, as the allocators touch for the "
        "first time pages they had mapped before, and cannot outgrow it without new mappings, "
        "which this figure would show."
    ]


def _blocks_growth(blocks: dict[str, Any] | None) -> list[str]:
    if blocks is None:
        return []
    if blocks["slope_per_h"] > blocks["noise_per_h"]:
        share = blocks["slope_per_h"] / blocks["mean"] if blocks.get("mean") else 0.0
        return [
            f"- Python's live blocks grow with RSS, by {share:.2%} of their number an hour: "
            "objects accumulate (see the tasks by kind below, and what holds them)."
        ]
    return [
        "- Python's live blocks do not grow: what RSS gains is memory the allocators keep "
        "after objects are freed (free space scattered through their arenas), not objects "
        "that accumulate."
    ]


def _sslmode(sslmode: str | None) -> list[str]:
    """
    The report's line on notifyd's DSN, when the run recorded it.
    """
    if sslmode is None:
        return []
    return [
        f"- notifyd's DSN says `sslmode={sslmode}`: the embedded cluster has no TLS, and "
        "without it every new connection of the pool (after each restart and kill) would first "
        "ask for TLS and be refused, which grows RSS by itself (up to 1.4 MB over a process's "
        'first 2,500 connections, then it holds; see docs/deployment.md, "Long runs");'
    ]


def _warm_up(warm_up: dict[str, Any] | None) -> list[str]:
    """
    The report's line on the session turnover before the clock started.
    """
    if not warm_up or not warm_up.get("turnovers"):
        return []
    return [
        f"- before the clock started, {warm_up['turnovers']:g} turnovers of the sessions "
        f"({warm_up['reconnects']:,} reconnections of random sessions in "
        f"{warm_up['took_s']:.0f} s, the writer running): RSS went from "
        f"{warm_up['rss_before_mb']:.1f} to {warm_up['rss_after_mb']:.1f} MB, what a fresh "
        "process's allocator grows to under session turnover (it holds after three to four; "
        'see docs/deployment.md, "Long runs"); the figures below are from after it;'
    ]


def _peak(samples: list[dict[str, Any]], warmup_s: float) -> str:
    """
    When RSS was highest after the warm-up, and for how long before the end
    it stayed below that: a level reached and held, or still climbing.
    """
    kept = [s for s in samples if s["t_s"] >= warmup_s and "rss_mb" in s]
    if len(kept) < 2:
        return ""
    peak = max(kept, key=lambda s: (s["rss_mb"], -s["t_s"]))
    since = (kept[-1]["t_s"] - peak["t_s"]) / 60
    return f"; highest at {peak['t_s'] / 60:.0f} min ({peak['rss_mb']:.1f} MB)" + (
        f", not passed in the {since:.0f} minutes after" if since >= 1 else ", at the end"
    )


def full_collections(samples: list[dict[str, Any]]) -> list[str]:
    """
    When notifyd ran a full garbage collection (each one pauses its event
    loop), from the count each sample read; nothing for runs before the count.
    """
    counted = [s for s in samples if "full_collections" in s]
    if not counted:
        return []
    at = [
        f"{later['t_s'] / 60:.1f}"
        for earlier, later in itertools.pairwise(counted)
        if later["full_collections"] > earlier["full_collections"]
    ]
    ran = counted[-1]["full_collections"] - counted[0]["full_collections"]
    when = f" (in the sample at minute {', '.join(at)})" if at else ""
    return [f"Full collections on the clock: {ran}{when}.", ""]


def task_kinds(samples: list[dict[str, Any]], warmup_s: float) -> list[str]:
    """
    The tasks by kind (``/healthz?tasks``) after the warm-up: the median
    count over each half of the run and at the end, so a kind that scales
    with sessions shows its steadiness and a long-lived one that appeared
    mid-run shows as a step between the halves.
    """
    kept = [s for s in samples if s["t_s"] >= warmup_s and s.get("task_kinds")]
    if len(kept) < 2:
        return []
    halves = (kept[: len(kept) // 2], kept[len(kept) // 2 :])
    kinds = sorted({kind for sample in kept for kind in sample["task_kinds"]})

    def median(part: list[dict[str, Any]], kind: str) -> float:
        counts: list[int] = sorted(sample["task_kinds"].get(kind, 0) for sample in part)
        middle = len(counts) // 2
        return counts[middle] if len(counts) % 2 else (counts[middle - 1] + counts[middle]) / 2

    rows = sorted(
        ((kind, median(halves[0], kind), median(halves[1], kind)) for kind in kinds),
        key=lambda row: (-row[2], row[0]),
    )
    grew = [kind for kind, first, second in rows if second > first]
    out = [
        "## Tasks by kind",
        "",
        "A task's kind is its name, or its coroutine's when it has none; "
        "medians over the samples of each half after the warm-up. "
        + (
            "Kinds more numerous in the second half: "
            + ", ".join(f"`{kind}`" for kind in grew)
            + "."
            if grew
            else "No kind is more numerous in the second half: what moves the task count "
            "between samples is work in flight (sessions half open, a read under way), "
            "not tasks that stay."
        ),
        "",
        "| kind | first half | second half | last sample |",
        "|---|---|---|---|",
    ]
    for kind, first, second in rows:
        last = kept[-1]["task_kinds"].get(kind, 0)
        out.append(f"| `{kind}` | {first:,g} | {second:,g} | {last} |")
    return [*out, ""]


def render(results: dict[str, Any]) -> str:
    config = results["config"]
    account = results["accounting"]
    trends = results["trends"]
    restarts = any(event["what"] == "notifyd restart" for event in results["events"])
    out = [
        "# Restarts under load" if restarts else "# Soak",
        "",
        "Written by `"
        + results.get(
            "command",
            "python -m bench soak"
            + (f" --minutes {config['minutes']:g}" if config["minutes"] != 30 else ""),
        )
        + "` (README says how to run it). notifyd runs as a child process "
        "against an embedded PostgreSQL; sessions in "
        f"{config['client_procs']} client processes each hold one user, resume "
        "from their last cursor whenever they reconnect (after a close or a "
        "refusal, when notifyd.js would: a 1012 within 2 s, a shed handshake "
        "after its hint plus the jittered backoff), and count every "
        "message id they receive; at the end each user's count is compared "
        "with the table.",
        "",
        f"- {config['minutes']:g} minutes, {config['sessions']:,} sessions "
        f"({results['sessions_live_at_start']:,} live at the start), "
        f"{config['rate']:g} single-row commits/s "
        f"({results['writer']['attempted']:,} attempted, "
        f"{results['writer']['failed']:,} failed while PostgreSQL was down);",
        f"- {config['reconnect_share']:.0%} of the sessions reconnect each minute "
        f"({account['reconnects_asked']:,} reconnections asked, "
        f"{account['connects']:,} connections in all);",
        *_warm_up(results.get("warm_up")),
        *_sslmode(results.get("notifyd_sslmode")),
        f"- PostgreSQL restarted every {config['pg_restart_every']:g} minutes, the "
        f"LISTEN connection killed every {config['listener_kill_every']:g} "
        "minutes (where no restart falls)"
        + (
            f", notifyd itself restarted every {config['notifyd_restart_every']:g} minutes;"
            if config.get("notifyd_restart_every")
            else ";"
        ),
        f"- sampled every {config['sample_every']:g} s; trends fitted after a "
        f"{trends['warmup_s']:.0f} s warm-up. The noise is twice the slope's "
        "standard error, with the samples counted as the fewer independent "
        "ones they are when each is close to the one before (n (1 - r) / (1 + r) "
        "for the residuals' lag-1 autocorrelation r; samples of a slowly moving "
        "figure such as RSS wander together, and counting each as independent "
        "would call any wander a slope): a slope within it is what the scatter "
        "alone gives about 95 % of the time.",
        f"- notifyd at commit {results.get('commit', 'unknown')}; machine: "
        f"{_machine(results['machine'])}.",
        "",
        "## Verdict",
        "",
        *verdict(results),
        "",
        "## Events",
        "",
        "| at | what | detail |",
        "|---|---|---|",
    ]
    for event in results["events"]:
        detail = ", ".join(f"{k} {v}" for k, v in event.items() if k not in ("at_s", "what"))
        out.append(f"| {event['at_s'] / 60:.1f} min | {event['what']} | {detail} |")
    out += [
        "",
        *full_collections(results["samples"]),
        *task_kinds(results["samples"], trends["warmup_s"]),
        "## Samples",
        "",
        "| t (min) | RSS (MB) | Python blocks (k) | fds | tasks | loop lag (ms) | sessions "
        "| server CPU (s) | received |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    samples = results["samples"]
    # About thirty rows, the last sample always included.
    step = max(1, len(samples) // 30)
    for sample in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        out.append(
            f"| {sample['t_s'] / 60:.1f} | {sample['rss_mb']:.1f} | {_thousands(sample)} | "
            f"{sample['fds']} | "
            f"{sample.get('tasks', '—')} | {sample.get('loop_lag_ms', '—')} | "
            f"{sample.get('sessions', '—')} | {sample['cpu_s']:.0f} | {sample['received']:,} |"
        )
    return "\n".join(out) + "\n"


def _thousands(sample: dict[str, Any]) -> str:
    blocks = sample.get("python_blocks")
    return "—" if blocks is None else f"{blocks / 1000:,.1f}"
