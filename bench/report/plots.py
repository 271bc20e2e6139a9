"""
PNG plots of a run's figures, written next to the report and embedded in
it: commit-to-receipt latency (p50, p99) against the commit rate, CPU per
delivery against the rate, and the figures by session count, for notifyd
and the naive relay.

matplotlib is optional (the ``bench`` extra): without it the report has its
tables only, and :func:`write_plots` says so in one line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["PLOT_FILES", "matplotlib_missing", "render_plots", "write_plots"]

# File names, after the report's own stem.
PLOT_FILES = ("latency", "cpu", "sessions")

_STYLE = {"notifyd": {"color": "tab:blue"}, "naive": {"color": "tab:orange"}}
_PERCENTILES = (("p50", "o", "-"), ("p99", "s", "--"))


def matplotlib_missing() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def _ramp_points(r: dict[str, Any], kind: str, key: str) -> list[tuple[float, float]]:
    """
    (commits/s reached, value) of the single-row ramp's last attempt at
    each target.
    """
    steps = r.get(kind, {}).get("single", {}).get("steps", [])
    last: dict[int, dict[str, Any]] = {}
    for step in steps:
        last[step["target"]] = step
    out = []
    for _, step in sorted(last.items()):
        value = step["latency_ms"].get(key) if key in ("p50", "p99") else step.get(key)
        if value is not None:
            out.append((float(step["sent_per_s"]), float(value)))
    return out


def _push_points(
    push: dict[str, Any], kind: str, sessions: int, key: str
) -> list[tuple[float, float]]:
    """
    (commits/s reached, value) at each paced rate, in the order of the
    rates asked: a rate the machine could not reach is plotted where it was.
    """
    return [
        (float(s["committed_per_s"] or s["rate"]), float(s[key]))
        for s in sorted(push.get("summary", []), key=lambda s: int(s["rate"]))
        if s["kind"] == kind and s["sessions"] == sessions and s.get(key) is not None
    ]


def _line(ax: Axes, points: list[tuple[float, float]], label: str, **style: Any) -> None:
    if points:
        ax.plot([x for x, _ in points], [y for _, y in points], label=label, **style)


def _latency(fig: Any, r: dict[str, Any]) -> None:
    push = r.get("push") or {}
    counts = push.get("session_counts", [])
    panels = len(counts) + (1 if "notifyd" in r else 0)
    axes = fig.subplots(1, max(1, panels), squeeze=False)[0]
    for ax, sessions in zip(axes, counts, strict=False):
        for kind in ("notifyd", "naive"):
            for pct, marker, dash in _PERCENTILES:
                _line(
                    ax, _push_points(push, kind, sessions, f"{pct}_ms"), f"{kind} {pct}",
                    marker=marker, linestyle=dash, **_STYLE[kind],
                )  # fmt: skip
        ax.set_title(f"pgbench, sync commit on, {sessions:,} sessions", fontsize=9)
    if "notifyd" in r:
        ax = axes[-1]
        for kind in ("notifyd", "naive"):
            for pct, marker, dash in _PERCENTILES:
                _line(
                    ax, _ramp_points(r, kind, pct), f"{kind} {pct}",
                    marker=marker, linestyle=dash, **_STYLE[kind],
                )  # fmt: skip
        ax.set_title("single-row ramp (clock before INSERT), log scale", fontsize=9)
        ax.set_yscale("log")
    for ax in axes:
        ax.set_xlabel("commits/s reached")
        ax.set_ylabel("commit → receipt, ms")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle("Latency against the commit rate")


def _cpu(fig: Any, r: dict[str, Any]) -> None:
    push = r.get("push") or {}
    counts = push.get("session_counts", [])
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, (key, what) in zip(
        axes, (("server_cpu_us", "server"), ("pg_cpu_us", "Postgres")), strict=True
    ):
        for kind in ("notifyd", "naive"):
            for sessions, marker in zip(counts, "os^v", strict=False):
                _line(
                    ax, _push_points(push, kind, sessions, key), f"{kind}, {sessions:,} sessions",
                    marker=marker, **_STYLE[kind],
                )  # fmt: skip
            ramp_key = "server_cpu_ms_per_1000" if key == "server_cpu_us" else "pg_cpu_ms_per_1000"
            _line(
                ax, _ramp_points(r, kind, ramp_key), f"{kind}, ramp", linestyle=":",
                **_STYLE[kind],
            )  # fmt: skip
        ax.set_title(f"{what} CPU per delivery", fontsize=9)
        ax.set_xlabel("commits/s reached")
        ax.set_ylabel("µs per delivery")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle("CPU per delivery against the commit rate")


def _sessions(fig: Any, r: dict[str, Any]) -> None:
    push = r.get("push") or {}
    counts = push.get("session_counts", [])
    rates = push.get("rates", [])
    figures = (
        ("p50_ms", "p50, ms"),
        ("p99_ms", "p99, ms"),
        ("server_cpu_us", "server µs/delivery"),
        ("pg_cpu_us", "Postgres µs/delivery"),
    )
    axes = fig.subplots(1, len(figures), squeeze=False)[0]
    groups = [(s, rate) for rate in rates for s in counts]
    width = 0.38
    for ax, (key, label) in zip(axes, figures, strict=True):
        for k, kind in enumerate(("notifyd", "naive")):
            values = []
            for sessions, rate in groups:
                found = [
                    s[key]
                    for s in push.get("summary", [])
                    if (s["kind"], s["sessions"], s["rate"]) == (kind, sessions, rate)
                ]
                values.append(found[0] if found and found[0] is not None else 0.0)
            ax.bar(
                [i + (k - 0.5) * width for i in range(len(groups))], values, width,
                label=kind, **_STYLE[kind],
            )  # fmt: skip
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{s:,}\n{rate:,}/s" for s, rate in groups], fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("By session count (sessions, commits/s asked)")


def render_plots(r: dict[str, Any], directory: Path, stem: str) -> list[str]:
    """
    Write the plots the results allow as ``<stem>-<name>.png`` in
    ``directory``; their file names. Needs matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    makers = {"latency": _latency, "cpu": _cpu, "sessions": _sessions}
    written = []
    for name in PLOT_FILES:
        if name == "sessions" and not (r.get("push") or {}).get("summary"):
            continue
        if name != "sessions" and not r.get("push") and "notifyd" not in r:
            continue
        fig = Figure(figsize=(11, 3.8), dpi=100, layout="constrained")
        makers[name](fig, r)
        path = directory / f"{stem}-{name}.png"
        fig.savefig(path, format="png")
        written.append(path.name)
    return written


def write_plots(r: dict[str, Any], report: Path) -> list[str]:
    """
    The plots next to ``report`` (file names, to embed), or none, with one
    line on stderr, when matplotlib is not installed.
    """
    if matplotlib_missing():
        print(
            "bench: matplotlib is not installed (pip install -e '.[bench]'): "
            "the report gets its tables and no plots",
            file=sys.stderr,
        )
        return []
    report.parent.mkdir(parents=True, exist_ok=True)
    return render_plots(r, report.parent, report.stem)
