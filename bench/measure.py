"""
Process statistics from /proc, percentiles, the kernel's floors for a write
and a fan-out, and a description of the machine and of the notifyd sources
measured.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import os
import platform
import re
import selectors
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .control import ROOT

__all__ = [
    "BACKEND_PARTS",
    "anonymous_memory_kib",
    "backend_cpu_by_part",
    "busy_seconds",
    "cluster_cpu_seconds",
    "cpu_seconds",
    "fanout_floor",
    "gc_pauses",
    "loopback_send_cost",
    "machine",
    "percentiles",
    "rss_kib",
    "source_fingerprint",
    "tree_cpu_by_pid",
    "tree_cpu_seconds",
    "tree_rss_kib",
    "wait_quiet",
]

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    # Fields after the parenthesised command name (which may hold spaces):
    # index 0 is field 3 (state), so utime (14) is 11, stime (15) is 12.
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rpartition(")")[2].split()


def cpu_seconds(pid: int) -> float:
    """
    User plus system CPU seconds the process has used.
    """
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _TICKS


# What each Postgres process is for, as pg_stat_activity names it: the
# application's writers (pgbench, including its backends reaped since the
# first reading), the push server's own connections (notifyd's and the naive
# relay's name themselves), the cluster's background processes, and the rest
# (the harness's own queries).
BACKEND_PARTS = ("writers", "server", "background", "other")


def _part(application_name: str, backend_type: str) -> str:
    if backend_type != "client backend":
        return "background"
    if application_name == "pgbench":
        return "writers"
    if application_name.startswith(("notifyd", "naive relay")):
        return "server"
    return "other"


async def backend_cpu_by_part(admin: Any, postmaster: int) -> dict[str, float]:
    """
    CPU seconds used so far by the cluster's processes, summed by
    :data:`BACKEND_PARTS`: a reading to subtract from a later one. Reaped
    backends (connections that came and went: pgbench's) count as writers,
    the postmaster as background.
    """
    rows = await admin.fetch(
        "SELECT pid, coalesce(application_name, '') AS name, coalesce(backend_type, '') AS type "
        "FROM pg_stat_activity"
    )
    parts = dict.fromkeys(BACKEND_PARTS, 0.0)
    fields = _stat_fields(postmaster)
    parts["writers"] += (int(fields[13]) + int(fields[14])) / _TICKS
    parts["background"] += cpu_seconds(postmaster)
    for row in rows:
        try:
            parts[_part(row["name"], row["type"])] += cpu_seconds(row["pid"])
        except OSError:  # ended since the query
            continue
    return parts


def busy_seconds() -> float:
    """
    CPU seconds the whole machine spent in user, system and steal time
    (summed over CPUs), from /proc/stat.
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, steal = (int(fields[i]) for i in (1, 2, 3, 8))
    return (user + nice + system + steal) / _TICKS


def tree_cpu_by_pid(parent: int) -> dict[int, float]:
    """
    CPU seconds of ``parent`` and of each of its live children (a
    postmaster and its backends), by pid.
    """
    found: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry.name))
        except (OSError, IndexError):
            continue
        if int(entry.name) == parent or int(fields[1]) == parent:
            found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / _TICKS
    return found


def tree_cpu_seconds(parent: int) -> float:
    """
    CPU seconds of ``parent`` and its live children (a postmaster and its
    backends). Backends that exited in between are not counted.
    """
    return sum(tree_cpu_by_pid(parent).values())


def cluster_cpu_seconds(postmaster: int) -> float:
    """
    CPU seconds of a PostgreSQL cluster: the postmaster, the backends it has
    reaped (its cutime and cstime: connections that came and went, such as
    pgbench's) and those still running.
    """
    fields = _stat_fields(postmaster)
    reaped = (int(fields[13]) + int(fields[14])) / _TICKS
    return tree_cpu_seconds(postmaster) + reaped


def gc_pauses(log: Path | None, start: float, end: float) -> list[tuple[int, float]]:
    """
    (generation, ms) of the collector passes that ``bench/probe`` logged
    for a server between unix times ``start`` and ``end``.
    """
    if log is None:
        return []
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return []
    pauses = []
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and start <= float(parts[0]) <= end:
            pauses.append((int(parts[1]), float(parts[2])))
    return pauses


def rss_kib(pid: int) -> int:
    """
    Resident set size (VmRSS) in KiB.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


_MAPPING = re.compile(r"[0-9a-f]+-[0-9a-f]+")


def anonymous_memory_kib(smaps: str) -> tuple[int, int]:
    """
    From the text of ``/proc/<pid>/smaps``: how much writable private
    anonymous memory (the heap, the allocators' arenas and the threads'
    stacks; not files, not address space reserved without access) is
    mapped, and how much of it is resident, in KiB. RSS that grows while
    what is mapped does not is memory the allocators had already mapped
    being touched for the first time: it cannot outgrow the mappings without
    new ones.
    """
    mapped = resident = 0
    counting = False
    for line in smaps.splitlines():
        fields = line.split()
        if not fields:
            continue
        if _MAPPING.fullmatch(fields[0]):
            path = fields[5] if len(fields) > 5 else ""
            private_writable = fields[1].startswith("rw") and fields[1].endswith("p")
            counting = private_writable and path in ("", "[heap]")
        elif counting and fields[0] == "Size:":
            mapped += int(fields[1])
        elif counting and fields[0] == "Rss:":
            resident += int(fields[1])
    return mapped, resident


def tree_rss_kib(parent: int) -> int:
    """
    Resident set size of ``parent`` and its live children (a notifyd with
    workers), summed in KiB.
    """
    total = rss_kib(parent)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == parent:
            continue
        try:
            if int(_stat_fields(int(entry.name))[1]) == parent:
                total += rss_kib(int(entry.name))
        except (OSError, IndexError, RuntimeError):
            continue
    return total


def percentiles(values: list[int]) -> dict[str, float | int | None]:
    """
    n, p50, p99, p999 and max of ``values`` (nearest rank); None when empty.
    """
    if not values:
        return {"n": 0, "p50": None, "p99": None, "p999": None, "max": None}
    ordered = sorted(values)
    n = len(ordered)

    def rank(q: float) -> int:
        return ordered[min(n - 1, max(0, int(q * n + 0.999999) - 1))]

    return {"n": n, "p50": rank(0.50), "p99": rank(0.99), "p999": rank(0.999), "max": ordered[-1]}


async def wait_quiet(
    pid: int, *, below: float = 0.10, window: float = 0.5, timeout: float = 20.0
) -> bool:
    """
    Wait until process ``pid`` uses less than ``below`` of a CPU over a
    ``window``; False if it is still busy after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        await asyncio.sleep(window)
        if cpu_seconds(pid) - before < below * window:
            return True
    return False


def _read_until_closed(port: int, connections: int, on_data: Callable[[int], None]) -> None:
    """
    Open ``connections`` to ``port`` and read (and discard) until the other
    side has closed them all, calling ``on_data`` with the bytes received so
    far after each read.
    """
    selector = selectors.DefaultSelector()
    for _ in range(connections):
        reader = socket.create_connection(("127.0.0.1", port), timeout=30)
        reader.setblocking(False)
        selector.register(reader, selectors.EVENT_READ, data=reader)
    received, open_readers = 0, connections
    while open_readers:
        for key, _ in selector.select():
            ready: socket.socket = key.data
            try:
                data = ready.recv(1 << 16)
            except BlockingIOError:
                continue
            if not data:
                selector.unregister(ready)
                open_readers -= 1
                continue
            received += len(data)
            on_data(received)


def loopback_send_cost(
    frames: int = 20_000, size: int = 400, fanout: int = 200
) -> dict[str, float]:
    """
    The kernel's floor for one WebSocket frame here: sender CPU µs (and wall
    µs) per ``send()`` of ``size`` bytes over loopback TCP to a process that
    reads and discards, one frame at a time (the reader is woken for each);
    and per ``send()`` when frames go out back to back, round robin over
    ``fanout`` connections to that process (a fan-out burst). Call before any
    thread or event loop exists (forks).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(fanout)
    listener.settimeout(10)
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # the reader
        try:
            _read_until_closed(port, fanout, lambda received: None)
        finally:
            os._exit(0)
    connections: list[socket.socket] = []
    try:
        for _ in range(fanout):
            connection, _ = listener.accept()
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connections.append(connection)
        payload = b"x" * size
        first = connections[0]
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(frames):
            first.sendall(payload)
            time.sleep(0)  # let the reader run, as a client would
        cpu1, wall1 = time.process_time(), time.perf_counter()
        for i in range(frames):
            connections[i % fanout].sendall(payload)
        cpu2 = time.process_time()
    finally:
        for connection in connections:
            connection.close()
        listener.close()
        os.waitpid(pid, 0)
    return {
        "frame_bytes": size,
        "cpu_us_per_send": (cpu1 - cpu0) / frames * 1e6,
        "wall_us_per_send": (wall1 - wall0) / frames * 1e6,
        "cpu_us_per_send_back_to_back": (cpu2 - cpu1) / frames * 1e6,
        "fanout": fanout,
    }


def _rep_reporter(rep_bytes: int, done_w: int) -> Callable[[int], None]:
    """
    An ``on_data`` for :func:`_read_until_closed` that writes the time to
    ``done_w`` each time another ``rep_bytes`` have arrived.
    """
    reps_done = 0

    def report(received: int) -> None:
        nonlocal reps_done
        if received >= (reps_done + 1) * rep_bytes:
            os.write(done_w, time.time_ns().to_bytes(8, "little"))
            reps_done += 1

    return report


def fanout_floor(
    connections: int = 10_000, readers: int = 2, size: int = 400, reps: int = 3
) -> dict[str, float]:
    """
    The floor for an announcement here: one ``size``-byte ``send()`` to each
    of ``connections`` loopback TCP connections, read by ``readers``
    processes (as the benchmark's clients are), from the first send until
    the last reader has every byte; no framing, no event loop, no server
    logic. Median of ``reps``. Call before any thread or event loop exists
    (forks).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    listener.settimeout(30)
    port = listener.getsockname()[1]
    share = connections // readers
    pids: list[int] = []
    done_r, done_w = os.pipe()
    for _ in range(readers):
        pid = os.fork()
        if pid == 0:  # a reader: reports the time it had each rep's bytes
            try:
                os.close(done_r)
                _read_until_closed(port, share, _rep_reporter(share * size, done_w))
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(done_w)
    sockets: list[socket.socket] = []
    walls: list[float] = []
    cpus: list[float] = []
    try:
        for _ in range(share * readers):
            connection, _ = listener.accept()
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sockets.append(connection)
        payload = b"x" * size
        for _ in range(reps):
            time.sleep(0.2)
            cpu0, start = time.process_time(), time.time_ns()
            for connection in sockets:
                connection.send(payload)
            cpus.append(time.process_time() - cpu0)
            last = max(int.from_bytes(os.read(done_r, 8), "little") for _ in range(readers))
            walls.append((last - start) / 1e6)
    finally:
        for connection in sockets:
            connection.close()
        listener.close()
        os.close(done_r)
        for pid in pids:
            os.waitpid(pid, 0)
    return {
        "connections": share * readers,
        "readers": readers,
        "frame_bytes": size,
        "median_ms": sorted(walls)[len(walls) // 2],
        "sender_cpu_us_per_send": sorted(cpus)[len(cpus) // 2] / (share * readers) * 1e6,
    }


def machine() -> dict[str, object]:
    """
    What the figures were measured on.
    """
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kib = 0
    return {
        "nproc": usable,
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def source_fingerprint() -> dict[str, str]:
    """
    Which notifyd was measured: a hash of its sources and their newest mtime.
    """
    files = [*sorted((ROOT / "notifyd").glob("*.py")), ROOT / "notifyd" / "schema.sql"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    newest = max(path.stat().st_mtime for path in files)
    when = datetime.datetime.fromtimestamp(newest, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {"sha256": digest.hexdigest()[:16], "newest_file": when}
