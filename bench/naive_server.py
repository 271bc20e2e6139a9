"""
The naive baseline, written the way such a pipeline usually is: a per-row
trigger NOTIFYs the whole row as JSON, one LISTEN connection ``json.loads``
it in the callback and starts a task per notification that sends it to each
socket of the addressee. No auth, no resume, no read state.

``python -m bench.naive_server --dsn DSN --port PORT`` (``/ws/message/{userId}``;
``GET /healthz`` answers 200 once LISTEN is in place).
"""

from __future__ import annotations

import argparse
import asyncio
import http
import json
import signal
from urllib.parse import unquote

import asyncpg
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

__all__ = ["NAIVE_SCHEMA", "NAIVE_TABLE"]

NAIVE_TABLE = "t_message_naive"
CHANNEL = "naive"
_PREFIX = "/ws/message/"

# The seed's columns; the trigger sends the full row.
NAIVE_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {NAIVE_TABLE} (
    id        text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    title     text,
    send_user text,
    to_user   text,
    type      text,
    content   text,
    send_time timestamptz DEFAULT now(),
    skip_url  text,
    is_read   text DEFAULT '0'
);

CREATE OR REPLACE FUNCTION naive_notify() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', row_to_json(NEW)::text);
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER naive_notify
    AFTER INSERT ON {NAIVE_TABLE}
    FOR EACH ROW EXECUTE FUNCTION naive_notify();
"""


async def serve_naive(dsn: str, host: str, port: int) -> None:
    sockets: dict[str, set[ServerConnection]] = {}
    tasks: set[asyncio.Task[None]] = set()
    listening = False

    async def push(user: str, text: str) -> None:
        for ws in list(sockets.get(user, ())):
            try:
                await ws.send(text)
            except ConnectionClosed:
                pass

    def on_notification(connection: object, pid: int, channel: str, payload: object) -> None:
        row = json.loads(str(payload))
        task = asyncio.create_task(push(row["to_user"], json.dumps(row)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        user = unquote(ws.request.path[len(_PREFIX) :])
        sockets.setdefault(user, set()).add(ws)
        try:
            await ws.wait_closed()
        finally:
            mine = sockets.get(user)
            if mine is not None:
                mine.discard(ws)
                if not mine:
                    del sockets[user]

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/healthz":
            status = http.HTTPStatus.OK if listening else http.HTTPStatus.SERVICE_UNAVAILABLE
            return connection.respond(status, "ok\n" if listening else "starting\n")
        if not request.path.startswith(_PREFIX) or len(request.path) == len(_PREFIX):
            return connection.respond(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        return None

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    listener = await asyncpg.connect(dsn, server_settings={"application_name": "naive relay"})
    try:
        await listener.add_listener(CHANNEL, on_notification)
        async with serve(handler, host, port, process_request=process_request, compression=None):
            listening = True
            await stop.wait()
    finally:
        await listener.close(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_server")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve_naive(args.dsn, args.host, args.port))


if __name__ == "__main__":
    main()
