"""
The rate ramps: single-row commits, then 100-row statements, stepped up for
both servers interleaved until every attempt at a step failed.
"""

from __future__ import annotations

from typing import Any

from ..control import Child
from ..measure import wait_quiet
from ..progress import progress
from ..rig import Rig
from ..step import run_step, step_line
from .side import Side

__all__ = ["ramp"]


async def ramp(rig: Rig, sides: list[Side], writers: list[Child], mode: str) -> None:
    """
    Step the rate up for every server, interleaved: at each target each
    server still in the race runs its step (the order alternating), so both
    meet the same moments of a noisy machine. A server leaves the race when
    every attempt at a target failed.
    """
    plan = rig.plan
    steps = plan.single_steps if mode == "single" else plan.batch_steps
    results: dict[str, list[dict[str, Any]]] = {side.kind: [] for side in sides}
    racing = list(sides)
    for index, target in enumerate(steps):
        order = list(racing) if index % 2 == 0 else racing[::-1]
        for side in order:
            for attempt in range(plan.attempts):
                if attempt:
                    # The machine is shared: a failed step is tried again once
                    # the server has worked off its backlog.
                    await wait_quiet(side.server.pid, timeout=15)
                calm = await rig.wait_calm()
                tag = f"{mode[0]}{index}" + (f"r{attempt}" if attempt else "")
                step = await run_step(
                    rig, side.server, side.clients, writers, side.kind, mode, target, tag,
                    seed=index + 1 + 50 * attempt,
                )  # fmt: skip
                step["attempt"] = attempt + 1
                step["other_load_before_cores"] = calm
                progress(step_line(side.kind, step))
                results[side.kind].append(step)
                if step["ok"]:
                    break
            if not step["ok"]:
                racing.remove(side)
        if not racing:
            break
    for side in sides:
        good = [s for s in results[side.kind] if s["ok"]]
        side.result[mode] = {
            "steps": results[side.kind],
            "last_good": good[-1]["target"] if good else None,
            "ceiling_reached": bool(good) and good[-1]["target"] == steps[-1],
        }
        if not await wait_quiet(side.server.pid, timeout=30):
            progress(f"  {side.kind} still busy 30 s after the {mode} ramp")
