"""
What one run does: the sessions, the processes, the rate steps and their pass
marks, the tables written to; ``--quick`` shrinks every part of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .naive_server import NAIVE_TABLE

__all__ = ["NOTIFYD_TABLE", "TABLES", "Plan", "make_plan"]

NOTIFYD_TABLE = "t_message_real_time"
TABLES = {"notifyd": NOTIFYD_TABLE, "naive": NAIVE_TABLE}


@dataclass(frozen=True)
class Plan:
    """
    What one run does; ``--quick`` shrinks every part of it.
    """

    mode: str
    users: int  # online users that messages are addressed to
    sessions: int  # sessions held open during the runs (idle RSS, announcement)
    client_procs: int
    writer_procs: int
    writer_conns: int
    single_steps: tuple[int, ...]  # commits/s
    batch_steps: tuple[int, ...]  # deliveries/s, as 100-row statements
    step_s: float
    drain_s: float
    announcements: int
    hello_rows: int
    hello_connects: int
    trigger_s: float  # per case and round
    trigger_rounds: int
    attempts: int = 3  # a failing step is run up to this many times (shared machine)
    calm_budget_s: float = 120.0  # total time the run may wait for other tenants to calm down
    single_p99_ms: float = 20.0
    batch_p99_ms: float = 100.0
    writers_synchronous_commit: str = "off"
    # The push-pipeline phases (pgbench writers, synchronous_commit on).
    pipeline_sessions: tuple[int, ...] = (1000, 10_000)
    pipeline_rates: tuple[int, ...] = (500, 2000)  # commits/s
    pipeline_reps: int = 3  # alternating runs per server, session count and rate
    pipeline_s: float = 10.0
    pipeline_clients: int = 16  # pgbench connections pacing the rate
    ceiling_clients: int = 16
    ceiling_sessions: int = 1000
    ceiling_s: float = 8.0
    ceiling_reps: int = 3
    isolated_messages: int = 50
    isolated_gap_s: float = 0.2
    commit_cost_commits: int = 2000  # per case and round, one at a time


def make_plan(quick: bool, users: int) -> Plan:
    if quick:
        return Plan(
            mode="quick", users=users, sessions=max(users, 1000), client_procs=2,
            writer_procs=2, writer_conns=8, single_steps=(1000, 2000, 4000),
            batch_steps=(10_000, 20_000), step_s=2.0, drain_s=3.0, announcements=2,
            hello_rows=100_000, hello_connects=20, trigger_s=1.5, trigger_rounds=1,
            attempts=2, calm_budget_s=5.0, pipeline_sessions=(1000,), pipeline_reps=1,
            pipeline_s=3.0, ceiling_s=3.0, ceiling_reps=1, commit_cost_commits=300,
        )  # fmt: skip
    return Plan(
        mode="full", users=users, sessions=max(users, 10_000), client_procs=2,
        writer_procs=2, writer_conns=8,
        single_steps=(1000, 2000, 3000, 4000, 5000, 6000, 8000, 10_000, 12_000),
        batch_steps=(10_000, 20_000, 40_000, 60_000, 80_000), step_s=6.0, drain_s=5.0,
        announcements=3, hello_rows=100_000, hello_connects=20, trigger_s=2.0, trigger_rounds=3,
    )  # fmt: skip
