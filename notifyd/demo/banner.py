"""
What ``notifyd demo`` prints once it is serving: ready-to-paste URLs and
commands for a first try.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from urllib.parse import quote

from ..settings import Settings

__all__ = ["demo_banner", "psql_command"]


def demo_banner(settings: Settings, port: int, users: dict[str, str], user: str) -> str:
    """
    What ``notifyd demo`` prints once it serves: a page per demo user, a
    token, the WebSocket URL, the DSN, and commands to watch and send.
    """
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    if ":" in host:
        host = f"[{host}]"
    token = users[user]
    url = f"ws://{host}:{port}/ws/message?token={token}"
    width = max(len(name) for name in users)
    pages = [
        f"  {name + ':':<{width + 1}}  http://{host}:{port}/?user={quote(name)}" for name in users
    ]
    assert settings.dsn is not None
    send = (
        f"NOTIFYD_DSN={shlex.quote(settings.dsn)} {shlex.quote(sys.executable)} -m notifyd send "
        f"--to {shlex.quote(user)} --title Hello --content 'Your first message'"
    )
    psql = psql_command()
    # Double quotes read best here; the user id is quoted for both SQL and the shell.
    sql_user = user.replace("'", "''")
    sql = (
        "INSERT INTO t_message_real_time (to_user, title, content) "
        f"VALUES ('{sql_user}', 'Hi', 'Sent with plain SQL')"
    )
    sql_arg = f'"{sql}"' if re.fullmatch(r"[^\\\"$`!]*", sql) else shlex.quote(sql)
    return "\n".join(
        [
            "notifyd demo is running. Press Ctrl-C to stop.",
            "",
            "Open the message center, one page per demo user (two windows of one",
            "user, or one of each), and send messages between them:",
            *pages,
            "",
            f"  token for {user}:  {token}",
            f"  WebSocket URL:     {url}",
            f"  database DSN:      {settings.dsn}",
            "",
            "Watch the pushes (in another shell):",
            f"  {shlex.quote(sys.executable)} -m websockets {shlex.quote(url)}",
            "Send a message as an application would:",
            f"  {send}",
            "or with plain SQL:",
            f"  {psql} {shlex.quote(settings.dsn)} -c {sql_arg}",
            "",
        ]
    )


def psql_command() -> str:
    """
    A psql to print in the demo banner: the one on PATH, else the one that
    ships with the embedded PostgreSQL binaries.
    """
    found = shutil.which("psql")
    if found:
        return found
    try:
        from .embedded import find_postgres_bin_dir

        candidate = find_postgres_bin_dir() / "psql"
    except Exception:
        return "psql"
    return shlex.quote(str(candidate)) if candidate.exists() else "psql"
