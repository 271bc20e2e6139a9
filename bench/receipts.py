"""
A client process that also notes which row each message frame carried: the
``id`` of every message of a tag and when it arrived, so that the run can
match each receipt with its row's commit time in Postgres and count every
row delivered, lost or delivered twice.

``python -m bench.receipts '<config json>'``: the same configuration and
requests as ``bench/clients.py``, plus

* ``{"cmd": "receipts", "tag": "..."}``: ``[[id, receipt ns], ...]`` of the
  tag's messages so far (forgotten afterwards, with their latencies).
"""

from __future__ import annotations

from typing import Any

from .clients import Clients
from .control import run_command_process
from .raw_session import Tally

__all__ = ["ReceiptTally", "frame_row"]

_CONTENT = b'"content":'
_ID = b'"id":'


def _string_after(data: bytes, key: bytes) -> bytes | None:
    """
    The JSON string value after the first ``key`` of a flat frame (the
    servers write these values without escapes: uuids and tags).
    """
    start = data.find(key)
    if start < 0:
        return None
    start += len(key)
    if data.startswith(b" ", start):
        start += 1
    if not data.startswith(b'"', start):
        return None
    end = data.find(b'"', start + 1)
    return None if end < 0 else data[start + 1 : end]


def frame_row(data: bytes) -> tuple[str, str] | None:
    """
    (tag, row id) of a message frame whose content is ``"<tag>:<digits>"``.
    """
    content = _string_after(data, _CONTENT)
    if content is None:
        return None
    tag, sep, _ = content.partition(b":")
    row_id = _string_after(data, _ID)
    if not sep or row_id is None:
        return None
    return tag.decode(), row_id.decode()


class ReceiptTally(Tally):
    """
    A :class:`Tally` that also keeps (row id, receipt time) per tag.
    """

    def __init__(self) -> None:
        super().__init__()
        self.receipts: dict[str, list[tuple[str, int]]] = {}

    def record_bytes(self, data: bytes, now_ns: int) -> None:
        super().record_bytes(data, now_ns)
        row = frame_row(data)
        if row is not None:
            self.receipts.setdefault(row[0], []).append((row[1], now_ns))


class ReceiptClients(Clients):
    """
    :class:`Clients` whose sessions record receipts.
    """

    def __init__(self, kind: str, url: str, secret: str) -> None:
        super().__init__(kind, url, secret)
        self.tally = self.receipt_tally = ReceiptTally()

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["cmd"] == "receipts":
            tag = request["tag"]
            self.receipt_tally.latencies.pop(tag, None)
            self.receipt_tally.last_ns.pop(tag, None)
            return {"receipts": self.receipt_tally.receipts.pop(tag, [])}
        if request["cmd"] == "take":
            # Taken as latencies (an announcement): its receipts go too.
            self.receipt_tally.receipts.pop(request["tag"], None)
        return await super().handle(request)


if __name__ == "__main__":
    run_command_process(
        lambda config: ReceiptClients(config["kind"], config["url"], config.get("secret", ""))
    )
