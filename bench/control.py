"""
The benchmark's child processes: spawned with a raised fd limit in their own
session, driven over JSON lines (clients and writers) or polled over HTTP
(servers), and always stopped with a bounded wait that ends in SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "Child",
    "free_port",
    "http_status",
    "raise_nofile",
    "run_command_process",
    "wait_healthy",
]

ROOT = Path(__file__).resolve().parent.parent
_LINE_LIMIT = 1 << 27


def raise_nofile() -> int:
    """
    Raise RLIMIT_NOFILE to the kernel's ceiling (``fs.nr_open``) where this
    process may raise its hard limit (root), else the soft limit to the hard
    one; returns the new limit. 100,000 sessions need more than a default
    hard limit of 20,000 or so.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = int(Path("/proc/sys/fs/nr_open").read_text())
    if hard == resource.RLIM_INFINITY or hard < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
            return ceiling
        except (ValueError, OSError):
            pass  # not privileged: the hard limit stays
    if hard == resource.RLIM_INFINITY:
        hard = ceiling
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _preexec() -> None:
    raise_nofile()


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that is free right now.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def http_get(port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes] | None:
    """
    The status and body of ``GET path`` on 127.0.0.1:port, or None when
    unreachable.
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
                )
                answer = await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return None
    head, _, body = answer.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1]), body


async def http_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    """
    The status of ``GET path`` on 127.0.0.1:port, or None when unreachable.
    """
    answer = await http_get(port, path, timeout)
    return None if answer is None else answer[0]


class Child:
    """
    One child process; stderr (and stdout unless it is the control channel)
    goes to ``log``.
    """

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log
        self.gc_log: Path | None = None  # a server's bench/probe log
        self._lock = asyncio.Lock()

    @classmethod
    async def spawn(
        cls,
        name: str,
        argv: list[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        control: bool = False,
    ) -> Child:
        """
        Start ``argv`` in the repository root. With ``control``, stdin and
        stdout are the JSON-line request channel.
        """
        log_file = await asyncio.to_thread(log.open, "ab")
        with log_file:
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=ROOT,
                env=env if env is not None else dict(os.environ),
                stdin=asyncio.subprocess.PIPE if control else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if control else log_file,
                stderr=log_file,
                limit=_LINE_LIMIT,
                start_new_session=True,
                preexec_fn=_preexec,
            )
        return cls(name, process, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    async def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """
        Send one request line and return the reply; raises on a timeout, an
        exited child or an ``error`` reply.
        """
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None, f"{self.name} has no control channel"
        async with self._lock:
            try:
                async with asyncio.timeout(timeout):
                    stdin.write(json.dumps(message).encode() + b"\n")
                    await stdin.drain()
                    line = await stdout.readline()
            except TimeoutError:
                raise RuntimeError(
                    f"{self.name}: no reply to {message.get('cmd')!r} within {timeout:.0f}s"
                ) from None
            except (BrokenPipeError, ConnectionResetError):
                line = b""
        if not line:
            raise RuntimeError(f"{self.name} exited ({self.process.returncode}): {self.log_tail()}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {message.get('cmd')!r} failed: {reply['error']}")
        return reply

    async def wait_exit(self, timeout: float) -> int | None:
        """
        The exit code, or None if still running after ``timeout``.
        """
        try:
            async with asyncio.timeout(timeout):
                return await self.process.wait()
        except TimeoutError:
            return None

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """
        Stop the child: close its stdin (control children quit on EOF),
        send ``sig``, wait up to ``timeout``, then SIGKILL its process group.
        """
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        if self.running and self.process.stdin is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
        code = await self.wait_exit(timeout)
        if code is None and self.process.stdin is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            code = await self.wait_exit(timeout / 2)
        if code is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            code = await self.wait_exit(10.0)
        return code

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


async def wait_healthy(child: Child, port: int, timeout: float) -> None:
    """
    Poll ``/healthz`` until it answers 200; raise if the child exits or the
    deadline passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        if not child.running:
            raise RuntimeError(
                f"{child.name} exited ({child.process.returncode}): {child.log_tail()}"
            )
        if await http_status(port, "/healthz") == 200:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{child.name} not healthy within {timeout:.0f}s: {child.log_tail()}"
            )
        await asyncio.sleep(0.05)


async def serve_commands(handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
    """
    Answer JSON-line commands from stdin on stdout until EOF or ``quit``.

    The protocol between the orchestrator and its client and writer
    processes; a failing command answers ``{"error": ...}``.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        request = json.loads(line)
        try:
            reply = await handle(request)
        except Exception as exc:
            reply = {"error": repr(exc)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if request["cmd"] == "quit":
            break


class CommandHandler(Protocol):
    async def handle(self, request: dict[str, Any]) -> dict[str, Any]: ...

    async def close(self) -> Any: ...


def run_command_process(make: Callable[[dict[str, Any]], CommandHandler]) -> None:
    """
    The whole life of a client or writer process: raise its descriptor
    limit, build its handler from the JSON config in ``argv[1]``, answer
    commands until EOF, then close it; on uvloop when installed (the
    instrument should cost as little as it can).
    """
    raise_nofile()
    config = json.loads(sys.argv[1])

    async def main() -> None:
        handler = make(config)
        try:
            await serve_commands(handler.handle)
        finally:
            await handler.close()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
