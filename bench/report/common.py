"""
The report's building blocks: numbers and ratios as it writes them, the
steps of a ramp its sentences refer to (highest sustained, saturation, first
failure), and Markdown tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "MINUS",
    "TIMES",
    "Results",
    "best_step",
    "common_target",
    "cores_used",
    "failed_above",
    "field",
    "first_failure",
    "latencies",
    "num",
    "p99_of",
    "ratio",
    "saturation_step",
    "step_at",
    "sustained",
    "table",
    "trigger_rate",
    "writers_capped",
]

Results = dict[str, Any]

# The report's typography, spelled out so that the source shows which
# character is meant.
TIMES = "\N{MULTIPLICATION SIGN}"
MINUS = "\N{MINUS SIGN}"


def num(value: float | int | None, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".rstrip()


def ratio(a: float | int | None, b: float | int | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}"


def latencies(step: dict[str, Any] | None) -> str:
    if step is None or step["latency_ms"]["p50"] is None:
        return "n/a"
    lat = step["latency_ms"]
    return f"{lat['p50']:.1f} / {lat['p99']:.1f} / {lat['p999']:.1f} / {lat['max']:.1f}"


def field(step: dict[str, Any] | None, key: str) -> float | None:
    return None if step is None else step[key]


def p99_of(step: dict[str, Any] | None) -> float | None:
    return None if step is None else step["latency_ms"]["p99"]


def step_at(ramp: dict[str, Any], target: int | None) -> dict[str, Any] | None:
    if target is None:
        return None
    # The last attempt at that target (a failed step is retried once).
    return next((s for s in reversed(ramp["steps"]) if s["target"] == target), None)


def best_step(ramp: dict[str, Any]) -> dict[str, Any] | None:
    return step_at(ramp, ramp["last_good"])


def common_target(a: dict[str, Any], b: dict[str, Any]) -> int | None:
    if a["last_good"] is None or b["last_good"] is None:
        return None
    return int(min(a["last_good"], b["last_good"]))


def sustained(ramp: dict[str, Any]) -> str:
    if ramp["last_good"] is None:
        return "none (first step failed)"
    return ("≥ " if ramp["ceiling_reached"] else "") + num(ramp["last_good"])


def trigger_rate(results: Results, rows: int, trigger: str) -> float | None:
    for case in results.get("trigger", {}).get("cases", []):
        if case["rows_per_statement"] == rows and case["trigger"] == trigger:
            return float(case["rows_per_s"])
    return None


def writers_capped(ramp: dict[str, Any]) -> bool:
    """
    Whether every attempt at the step after the highest sustained one failed
    because the writers could not reach its rate (the machine's ceiling).
    """
    failed = failed_above(ramp)
    return bool(failed) and all("writers reached" in s["why"] for s in failed)


def failed_above(ramp: dict[str, Any]) -> list[dict[str, Any]]:
    """
    The failed attempts above the highest sustained step.
    """
    good = ramp["last_good"] or 0
    return [s for s in ramp["steps"] if not s["ok"] and s["target"] > good]


def saturation_step(ramp: dict[str, Any]) -> dict[str, Any] | None:
    """
    The step with the most deliveries per second, whatever its latency: the
    server at saturation.
    """
    steps = [s for s in ramp["steps"] if s["delivered"]]
    return max(steps, key=lambda s: s["deliveries_per_s"]) if steps else None


def first_failure(ramp: dict[str, Any]) -> dict[str, Any] | None:
    failed = failed_above(ramp)
    return failed[0] if failed else None


def cores_used(step: dict[str, Any] | None, key: str) -> float | None:
    """
    CPU cores a step's figure per 1,000 deliveries amounts to at its rate.
    """
    if step is None or step.get(key) is None:
        return None
    return float(step[key]) * float(step["deliveries_per_s"]) / 1e6


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines
