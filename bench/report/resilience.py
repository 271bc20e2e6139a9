"""
The resilience figures in ``docs/performance.md``: the soak and the restart
storm, each summed up from the results its own run wrote
(``bench/soak.json``, ``bench/restart-storm.json``), with a link to its
page. They are not measured by ``python -m bench`` itself: each takes its
own run (README says how).
"""

from __future__ import annotations

from typing import Any

from .common import num

__all__ = ["resilience_section"]

_TRENDED = (
    ("rss_mb", "RSS", "MB"),
    ("fds", "open descriptors", ""),
    ("tasks", "asyncio tasks", ""),
    ("loop_lag_ms", "event-loop lag", "ms"),
    ("python_blocks", "Python's live memory blocks", ""),
)


def _loss(results: dict[str, Any]) -> str:
    account = results["accounting"]
    return (
        f"{account['lost']} lost and {account['duplicates']} duplicated of "
        f"{num(account['committed'])} committed messages"
    )


def _figure(value: float, digits: int, sign: str = "") -> str:
    """
    A slope or its noise: significant digits, or whole numbers for large counts.
    """
    return f"{value:{sign},.0f}" if abs(value) >= 100 else f"{value:{sign}.{digits}g}"


def _fitted(fit: dict[str, Any], unit: str) -> str:
    beyond = abs(fit["slope_per_h"]) > fit["noise_per_h"]
    return (
        f"{_figure(fit['slope_per_h'], 3, '+')}{unit}/h "
        f"(noise ±{_figure(fit['noise_per_h'], 2)}), {'beyond' if beyond else 'within'} noise"
    )


def _trend(name: str, unit: str, trend: dict[str, Any]) -> str:
    unit = f" {unit}" if unit else ""
    line = f"{name} {_fitted(trend, unit)}"
    half = trend.get("second_half")
    if half:
        line += f"; second half {_fitted(half, unit)}"
    return line


def _warm_up(soak: dict[str, Any]) -> str:
    warm_up = soak.get("warm_up") or {}
    if not warm_up.get("turnovers"):
        return ""
    return (
        f" (after {warm_up['turnovers']:g} turnovers of the sessions before the clock, RSS "
        f"{warm_up['rss_before_mb']:.1f} to {warm_up['rss_after_mb']:.1f} MB)"
    )


def _soak(soak: dict[str, Any]) -> list[str]:
    config = soak["config"]
    events = soak["events"]
    restarts = sum(event["what"] == "postgres restart" for event in events)
    kills = sum(event["what"] == "listener killed" for event in events)
    lines = [
        f"- **Soak** ([soak.md](soak.md), `{soak.get('command', 'python -m bench soak')}`, "
        f"notifyd at {soak.get('commit', 'unknown')}): {config['minutes']:g} minutes at "
        f"{num(config['rate'])} commits/s, {num(config['sessions'])} sessions with "
        f"{config['reconnect_share']:.0%} reconnecting each minute{_warm_up(soak)}, PostgreSQL "
        f"restarted {restarts} times and the LISTEN connection killed {kills} times: "
        f"{_loss(soak)}.",
    ]
    trends = soak.get("trends", {})
    fitted = [_trend(name, unit, trends[key]) for key, name, unit in _TRENDED if key in trends]
    if fitted:
        lines.append("  Growth per hour: " + "; ".join(fitted) + ".")
    return lines


def _storm(storm: dict[str, Any]) -> list[str]:
    config = storm["config"]
    restarts = [event for event in storm["events"] if event["what"] == "notifyd restart"]
    back = ", ".join(
        f"{event['last_live_after_sigterm_s']:.1f} s" if event["all_live"] else "not all back"
        for event in restarts
    )
    return [
        f"- **Restart storm** ([restart-storm.md](restart-storm.md)): {num(config['sessions'])} "
        f"sessions, {num(config['rate'])} commits/s, notifyd restarted {len(restarts)} times "
        f"(SIGTERM, then a new process): the last session live again {back} after the SIGTERM; "
        f"{_loss(storm)}.",
    ]


def resilience_section(soak: dict[str, Any] | None, storm: dict[str, Any] | None) -> list[str]:
    """
    The section's lines; none when neither run has results.
    """
    if soak is None and storm is None:
        return []
    out = [
        "## Resilience",
        "",
        "From their own runs (README says how), not from this one; database failover, a dead "
        "webhook claimer and a database that refuses writes are measured by the tests and given "
        "in [deployment.md](deployment.md).",
        "",
    ]
    if soak is not None:
        out += _soak(soak)
    if storm is not None:
        out += _storm(storm)
    return [*out, ""]
