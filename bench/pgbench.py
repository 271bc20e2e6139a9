"""
pgbench as the application's writers: single-row INSERT transactions
(autocommit, synchronous_commit on, prepared statements) to random users of
a name prefix, paced (``-R``) or as fast as the clients go; its summary read
back as figures.

pgbench comes from the same PostgreSQL installation as the embedded cluster
(pgserver bundles it next to ``postgres``), or from ``PATH``.

Each row's ``content`` is ``"<tag>:<clock_timestamp() in ns>"``: the time
the INSERT ran, taken inside the transaction; the commit time is read back
from Postgres afterwards (``bench/accounting.py``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PgbenchError", "Writes", "find_pgbench", "insert_script", "parse_summary", "pgbench"]

_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_TAG = re.compile(r"[A-Za-z0-9_]+")
_PREFIX = re.compile(r"[A-Za-z0-9_-]+")


class PgbenchError(RuntimeError):
    """
    pgbench is missing or failed.
    """


def find_pgbench() -> Path:
    """
    The pgbench of the embedded PostgreSQL's binaries, else the one on PATH.
    """
    try:
        from notifyd.demo.binaries import find_postgres_bin_dir

        candidate = find_postgres_bin_dir() / "pgbench"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    except RuntimeError:
        pass
    found = shutil.which("pgbench")
    if found is None:
        raise PgbenchError("pgbench not found (install pgserver, or PostgreSQL's client tools)")
    return Path(found)


@dataclass(frozen=True)
class Writes:
    """
    What pgbench inserts: ``table``, to ``prefix || random(0, users - 1)``,
    with ``tag`` in the content.
    """

    table: str
    tag: str
    prefix: str
    users: int


def insert_script(writes: Writes) -> str:
    """
    The pgbench script of one transaction: one single-row INSERT.
    """
    if not _NAME.fullmatch(writes.table):
        raise ValueError(f"bad table name {writes.table!r}")
    if not _TAG.fullmatch(writes.tag) or not _PREFIX.fullmatch(writes.prefix):
        raise ValueError(f"bad tag {writes.tag!r} or prefix {writes.prefix!r}")
    if writes.users < 1:
        raise ValueError("users must be at least 1")
    return (
        f"\\set u random(0, {writes.users - 1})\n"
        f"INSERT INTO {writes.table} (to_user, title, content, type, send_user) VALUES "
        f"('{writes.prefix}' || :u, 'Bench message', "
        f"'{writes.tag}:' || ((extract(epoch FROM clock_timestamp()) * 1000000)::bigint * 1000), "
        "'bench', 'bench-writer');\n"
    )


_PATTERNS = {
    "processed": re.compile(r"number of transactions actually processed: (\d+)"),
    "failed": re.compile(r"number of failed transactions: (\d+)"),
    "tps": re.compile(r"tps = ([0-9.]+) \(without initial connection time\)"),
    "latency_avg_ms": re.compile(r"latency average = ([0-9.]+) ms"),
    "lag_avg_ms": re.compile(r"rate limit schedule lag: avg ([0-9.]+)"),
    "skipped": re.compile(r"number of transactions skipped: (\d+)"),
}


def parse_summary(text: str) -> dict[str, float | None]:
    """
    The figures of pgbench's summary (None for those it did not print).
    """
    out: dict[str, float | None] = {}
    for key, pattern in _PATTERNS.items():
        match = pattern.search(text)
        out[key] = float(match.group(1)) if match else None
    return out


async def pgbench(
    dsn: str,
    writes: Writes,
    *,
    clients: int,
    threads: int,
    seconds: float,
    rate: float | None = None,
) -> dict[str, Any]:
    """
    Run pgbench for ``seconds`` with ``clients`` connections (``threads``
    threads), paced at ``rate`` transactions/s over all of them when given;
    its summary figures, and the wall time it ran.
    """
    binary = find_pgbench()
    with tempfile.NamedTemporaryFile("w", suffix=".sql", prefix="bench-", delete=False) as f:
        f.write(insert_script(writes))
        script = f.name
    argv = [
        str(binary), "--no-vacuum", "--protocol=prepared", f"--file={script}",
        f"--client={clients}", f"--jobs={min(threads, clients)}",
        f"--time={max(1, round(seconds))}",
    ]  # fmt: skip
    if rate is not None:
        argv.append(f"--rate={rate:g}")
    argv.append(dsn)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    # The cluster's default, stated: a commit returns once its WAL is flushed.
    env["PGOPTIONS"] = "-c synchronous_commit=on"
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), seconds * 3 + 60)
        except BaseException:
            if process.returncode is None:
                process.kill()
                await process.wait()
            raise
    finally:
        await asyncio.to_thread(os.unlink, script)
    wall = loop.time() - started
    text = output.decode(errors="replace")
    if process.returncode != 0:
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise PgbenchError(f"pgbench exited {process.returncode}: {tail}")
    summary = parse_summary(text)
    if summary["processed"] is None:
        raise PgbenchError(f"pgbench printed no summary: {text[-300:]!r}")
    return {**summary, "clients": clients, "seconds": seconds, "rate": rate, "wall_s": wall}
