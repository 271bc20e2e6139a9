"""
A worker's side of ``NOTIFYD_WORKERS``: its link to the parent, and what it
answers for the whole set of workers.

The parent (:mod:`notifyd.workers`) hands each worker one end of a Unix
stream socket. Over it, one JSON object a line:

* worker to parent, every heartbeat interval: ``{"beat": {"ready": ...,
  "sessions": ..., "users": ...}}``, sent by the worker's event loop, so a
  loop that is stuck stops them;
* parent to worker: ``{"all_ready": ...}``, whether every worker is ready,
  which is what the worker's ``/readyz`` answers.

Each worker also writes its own metrics exposition to a directory the parent
made, at every heartbeat; a scrape of ``/metrics`` on any worker answers
every worker's series, each with a ``worker`` label
(:func:`merged_exposition`), so one scrape through the shared port sees them
all. When the parent goes away (the socket ends), the worker stops itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .vitals import Vitals

__all__ = [
    "WorkerLink",
    "decode_line",
    "encode_line",
    "merged_exposition",
    "metrics_file",
    "send_line",
]

logger = logging.getLogger(__name__)

# The longest line either side accepts; a heartbeat is well under 200 bytes.
LINE_LIMIT = 64 * 1024


def encode_line(message: dict[str, Any]) -> bytes:
    """
    One message on the link: compact JSON and a newline.
    """
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode_line(line: bytes) -> dict[str, Any]:
    """
    One message read from the link; an empty dict for anything that is not
    a JSON object (the other side is our own code: ignore, never crash).
    """
    try:
        message = json.loads(line)
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def send_line(writer: asyncio.StreamWriter, message: dict[str, Any]) -> bool:
    """
    Queue ``message`` on a link; False when the link is closed or breaks.

    The other side can die at any moment (a killed worker, a parent gone),
    and the link's transport then closes under the writer. asyncio ignores a
    write to a closed transport, but uvloop raises RuntimeError: unchecked,
    that ended the parent's supervision task and with it systemd's watchdog.
    """
    if writer.is_closing():
        return False
    try:
        writer.write(encode_line(message))
    except OSError:
        return False
    return not writer.is_closing()


def metrics_file(directory: Path, index: int) -> Path:
    """
    Where worker ``index`` leaves its exposition.
    """
    return directory / f"worker-{index}.prom"


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merged_exposition(expositions: dict[int, bytes]) -> bytes:
    """
    The Prometheus exposition of several workers as one: every series gains
    a ``worker`` label with its worker's index, and each family appears once
    (a second ``# TYPE`` line for a name would make the scrape fail).
    """
    families: dict[str, Metric] = {}
    for index, text in sorted(expositions.items()):
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            for sample in family.samples:
                merged.samples.append(
                    sample._replace(labels={**sample.labels, "worker": str(index)})
                )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class WorkerLink:
    """
    This process is worker ``index`` of ``count``: heartbeats to the parent,
    the parent's word on whether every worker is ready, and the metrics of
    all workers.
    """

    def __init__(
        self, fd: int, *, index: int, count: int, metrics_dir: Path, interval: float
    ) -> None:
        self.index = index
        self.count = count
        self._fd = fd
        self._metrics_dir = metrics_dir
        self._interval = interval
        self._all_ready = False
        self._vitals: Callable[[], Vitals] | None = None
        self._metrics: Callable[[], bytes] | None = None

    def views(
        self, vitals: Callable[[], Vitals], metrics: Callable[[], bytes] | None
    ) -> tuple[Callable[[], Vitals], Callable[[], bytes] | None]:
        """
        Take this worker's own ``vitals`` and ``metrics`` (for heartbeats and
        the shared directory); return what its HTTP paths answer instead:
        ready only while every worker is, and every worker's metrics.
        """
        self._vitals = vitals
        self._metrics = metrics

        def fleet_vitals() -> Vitals:
            own = vitals()
            return dataclasses.replace(own, ready=own.ready and self._all_ready)

        return fleet_vitals, None if metrics is None else self._all_metrics

    def _all_metrics(self) -> bytes:
        assert self._metrics is not None
        expositions = {self.index: self._metrics()}
        for index in range(self.count):
            if index == self.index:
                continue
            # A worker being replaced has no file for a moment: its series
            # are missing from that scrape, as a restarted process's would be.
            with contextlib.suppress(FileNotFoundError):
                expositions[index] = metrics_file(self._metrics_dir, index).read_bytes()
        return merged_exposition(expositions)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """
        Talk to the parent while the block runs.
        """
        sock = socket.socket(fileno=self._fd)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
        tasks = [
            asyncio.create_task(self._beat(writer), name="worker-heartbeat"),
            asyncio.create_task(self._listen(reader), name="worker-link"),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()
            metrics_file(self._metrics_dir, self.index).unlink(missing_ok=True)

    async def _beat(self, writer: asyncio.StreamWriter) -> None:
        while True:
            vitals = self._vitals() if self._vitals is not None else None
            beat = {
                "ready": bool(vitals and vitals.ready),
                "sessions": vitals.sessions if vitals else 0,
                "users": vitals.users if vitals else 0,
            }
            if not send_line(writer, {"beat": beat}):
                return  # the parent is gone: _listen sees the end and stops us
            try:
                await writer.drain()
            except OSError:
                return
            if self._metrics is not None:
                self._publish_metrics(self._metrics())
            await asyncio.sleep(self._interval)

    def _publish_metrics(self, exposition: bytes) -> None:
        target = metrics_file(self._metrics_dir, self.index)
        partial = target.with_suffix(".tmp")
        try:
            partial.write_bytes(exposition)
            partial.replace(target)  # readers never see half a file
        except OSError as exc:
            logger.warning("cannot write the metrics of worker %d: %s", self.index, exc)

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (OSError, ValueError):
                line = b""
            if not line:
                break
            message = decode_line(line)
            if "all_ready" in message:
                self._all_ready = bool(message["all_ready"])
        # Without a parent nobody would restart or stop this worker, and it
        # would keep a share of the port: stop as on SIGTERM.
        logger.error("the parent process is gone; worker %d stops", self.index)
        os.kill(os.getpid(), signal.SIGTERM)
