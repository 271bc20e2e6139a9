"""
The ``notifyd`` command line: serve, demo, init-db, send, token, check.

Settings are built here, once, and passed down; logging is configured here,
once. User errors print one line to stderr and exit with a defined code:

* 0 success; 1 runtime failure (database unreachable, check failed);
* 2 invalid settings or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from .auth import TokenVerifier
from .daemon import Daemon, Instance, Stopped
from .db import connect_database
from .exceptions import ConfigError, NotifydError
from .fleet import WorkerLink
from .logs import configure_logging
from .loop import loop_factory
from .origin import origin_warning
from .settings import Settings, load_settings
from .workers import Workers, heartbeat_interval

__all__ = ["main"]

logger = logging.getLogger("notifyd")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="notifyd",
        description="Push rows of t_message_real_time to the addressee's WebSocket sessions, on commit.",
    )
    parser.add_argument(
        "--env-file", type=Path, help="read NOTIFYD_* settings from this file (environment wins)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the push server (needs NOTIFYD_DSN)")
    # Given by the parent of NOTIFYD_WORKERS to each worker (notifyd/workers.py).
    for option in ("--worker-index", "--worker-count", "--worker-fd"):
        serve.add_argument(option, type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-dir", type=Path, help=argparse.SUPPRESS)

    demo = commands.add_parser(
        "demo", help="run the server on an embedded throwaway PostgreSQL (or NOTIFYD_DSN)"
    )
    demo.add_argument("--user", default="demo-user", help="user the printed token is for")
    demo.add_argument("--port", type=int, help="port to serve on (default NOTIFYD_PORT or 8080)")

    init_db = commands.add_parser(
        "init-db", help="create or upgrade the table, indexes and triggers"
    )
    init_db.add_argument(
        "--role",
        action="store_true",
        help="also create the least-privilege role notifyd_daemon (needs CREATEROLE)",
    )

    send = commands.add_parser("send", help="insert one message, as an application would")
    send.add_argument("--to", required=True, dest="to_user", help="addressee user id")
    send.add_argument("--title", default=None)
    send.add_argument("--content", default=None)
    send.add_argument("--type", default=None)
    send.add_argument("--url", default=None, dest="skip_url", help="skip_url of the message")
    send.add_argument("--from", default=None, dest="send_user", help="sender user id")

    token = commands.add_parser("token", help="print a signed JWT for USER (HS256 secret)")
    token.add_argument("user")
    token.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")

    commands.add_parser("check", help="check settings, database, schema and LISTEN end to end")
    return parser


def main(argv: list[str] | None = None) -> int:
    """
    Run the CLI; returns the process exit code.
    """
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.env_file)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    # Daemons log to stdout (the service's output); one-shot commands keep
    # stdout for their results.
    log_stream = sys.stdout if args.command in ("serve", "demo") else sys.stderr
    configure_logging(settings.log_level, settings.log_format, log_stream)
    command: Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]] = {
        "serve": _serve,
        "demo": _demo,
        "init-db": _init_db,
        "send": _send,
        "token": _token,
        "check": _check,
    }[args.command]
    if args.command == "demo":
        # The demo says Ctrl-C stops it. A parent that started it with SIGINT
        # ignored (a background job of a script) would leave it deaf to that
        # until the daemon takes over the signal, embedded PostgreSQL's start
        # included; asyncio.Runner only handles SIGINT when the default is in place.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            return runner.run(command(settings, args))
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except NotifydError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


def _error(text: str) -> None:
    print(f"notifyd: {text}", file=sys.stderr)


def _verifier(settings: Settings) -> TokenVerifier | None:
    """
    The token verifier, or None in the path-user development mode.
    """
    if settings.dev_insecure_user_from_path:
        if not settings.local_only:
            raise ConfigError(
                "NOTIFYD_DEV_INSECURE_USER_FROM_PATH is only allowed on a loopback NOTIFYD_HOST "
                "without NOTIFYD_TRUSTED_PROXIES"
            )
        logger.warning(
            "development mode: the user id is taken from the path WITHOUT a token; never expose this"
        )
        if not (settings.jwt_secret or settings.jwt_public_key_file):
            return None
    verifier = TokenVerifier.from_settings(settings)
    if verifier.weak_secret:
        logger.warning("NOTIFYD_JWT_SECRET is shorter than 32 bytes; use a longer random secret")
    return verifier


def _exit_code(stopped: Stopped) -> int:
    if stopped.failure is not None:
        _error(str(stopped.failure))
    return EXIT_FAILURE if stopped.failed else EXIT_OK


async def _serve(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.dsn:
        raise ConfigError("NOTIFYD_DSN is not set: give the PostgreSQL connection string")
    verifier = _verifier(settings)
    link = _worker_link(settings, args)
    if link is None:
        warning = origin_warning(
            allowed_origins=settings.allowed_origins, is_loopback=settings.local_only
        )
        if warning is not None:
            logger.warning("%s", warning)
        if settings.workers > 1:
            return await _serve_workers(settings, args)
    daemon = Daemon(settings, verifier, fleet=link)

    def reload() -> TokenVerifier | None:
        return _verifier(load_settings(args.env_file))

    if link is None:
        return _exit_code(await daemon.run(reload=reload))
    async with link.running():
        return _exit_code(await daemon.run(reload=reload))


def _worker_link(settings: Settings, args: argparse.Namespace) -> WorkerLink | None:
    """
    The link to the parent when this process is one of NOTIFYD_WORKERS.
    """
    if args.worker_fd is None:
        return None
    # Until the daemon handles SIGHUP, a reload passed on must not end us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return WorkerLink(
        args.worker_fd,
        index=args.worker_index,
        count=args.worker_count,
        metrics_dir=args.worker_dir,
        interval=heartbeat_interval(settings.worker_stall_s),
    )


async def _serve_workers(settings: Settings, args: argparse.Namespace) -> int:
    """
    The parent of NOTIFYD_WORKERS workers (settings already checked here).
    """
    command = [sys.executable, "-m", "notifyd"]
    if args.env_file is not None:
        command += ["--env-file", str(args.env_file)]
    stopped = await Workers(settings, [*command, "serve"]).run()
    if stopped.failure is not None:
        _error(stopped.failure)
    return stopped.code


async def _demo(settings: Settings, args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if not settings.jwt_secret and not settings.jwt_public_key_file:
        overrides["jwt_secret"] = secrets.token_urlsafe(32)
    if args.port is not None:
        overrides["port"] = args.port
    embedded = None
    try:
        if not settings.dsn:
            from .demo.embedded import EmbeddedPostgres, start_in_thread

            embedded = EmbeddedPostgres()
            overrides["dsn"] = embedded.dsn
            await start_in_thread(embedded)
        settings = settings.model_copy(update=overrides)
        db = await connect_database(settings, wait=False)
        try:
            await db.apply_schema()
        finally:
            await db.close()
        verifier = _verifier(settings)
        assert verifier is not None
        # The message center's users (and --user's, for the raw WebSocket
        # lines), with tokens good for the demo's lifetime. Only the demo
        # passes demo_users: it turns on the page at / and demo_send.
        demo_users = {
            user: verifier.mint(user, ttl_s=7 * 24 * 3600)
            for user in dict.fromkeys(("alice", "bob", args.user))
        }
        daemon = Daemon(settings, verifier, demo_users=demo_users)

        def announce(instance: Instance) -> None:
            from .demo.banner import demo_banner

            print(demo_banner(settings, instance.port, demo_users, args.user), flush=True)

        return _exit_code(await daemon.run(on_ready=announce))
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.cleanup)


async def _init_db(settings: Settings, args: argparse.Namespace) -> int:
    db = await connect_database(settings, wait=False)
    try:
        await db.apply_schema(role=args.role)
    finally:
        await db.close()
    print("schema and role applied" if args.role else "schema applied")
    return EXIT_OK


async def _send(settings: Settings, args: argparse.Namespace) -> int:
    db = await connect_database(settings, wait=False)
    try:
        message_id = await db.insert_message(
            to_user=args.to_user,
            title=args.title,
            content=args.content,
            type=args.type,
            skip_url=args.skip_url,
            send_user=args.send_user,
        )
    finally:
        await db.close()
    print(message_id)
    return EXIT_OK


async def _token(settings: Settings, args: argparse.Namespace) -> int:
    verifier = TokenVerifier.from_settings(settings)
    try:
        print(verifier.mint(args.user, ttl_s=args.ttl))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return EXIT_OK


async def _check(settings: Settings, args: argparse.Namespace) -> int:
    from .checks import run_checks

    ok = await run_checks(settings, print)
    return EXIT_OK if ok else EXIT_FAILURE
