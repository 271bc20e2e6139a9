"""
notifyd sink: e-mail a message to its addressee when no session of theirs
on this instance had it.

Options (NOTIFYD_SINK_OPTIONS='{"email": {...}}'):

* ``address``: the addressee's e-mail from the user id, e.g.
  ``"{user}@example.com"`` (required);
* ``sender``: the From address (required);
* ``host`` / ``port``: the SMTP relay (default localhost:25);
* ``types``: list of message types to mail (default: all).

It runs in every notifyd instance and sees what that instance routed, so
with several instances "online" means "online here". For "offline on every
instance", exactly once, use the built-in webhook sink in offline mode.
"""

from __future__ import annotations

import asyncio
import smtplib
from email.message import EmailMessage
from typing import Any

from notifyd.exceptions import ConfigError
from notifyd.sinks import SinkContext, SinkMessage


def create(context: SinkContext) -> EmailSink:
    """
    The entry point: check the options once, at start-up.
    """
    options = context.options
    for required in ("address", "sender"):
        if not isinstance(options.get(required), str) or not options[required]:
            raise ConfigError(f'the email sink needs NOTIFYD_SINK_OPTIONS {{"email": {{"{required}": ...}}}}')
    if "{user}" not in options["address"]:
        raise ConfigError('the email sink\'s "address" option must contain {user}')
    return EmailSink(options)


def build_mail(message: SinkMessage, *, address: str, sender: str) -> EmailMessage:
    """
    The e-mail for one message (no I/O).
    """
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = address.format(user=message.to_user)
    mail["Subject"] = message.title or "New message"
    # Lets a mail client thread and a relay deduplicate.
    mail["Message-ID"] = f"<notifyd-{message.id}@{sender.rpartition('@')[2] or 'localhost'}>"
    body = message.content or ""
    link = message.to_json()["skipUrl"]
    mail.set_content(f"{body}\n\n{link}" if link else body)
    return mail


class EmailSink:
    """
    Sends one e-mail per message whose addressee was not online.
    """

    def __init__(self, options: dict[str, Any]) -> None:
        self._address = options["address"]
        self._sender = options["sender"]
        self._host = options.get("host", "localhost")
        self._port = int(options.get("port", 25))
        self._types = set(options.get("types", []))

    async def __call__(self, message: SinkMessage, online: bool) -> None:
        if online or message.to_user == "*":
            return
        if self._types and message.type not in self._types:
            return
        mail = build_mail(message, address=self._address, sender=self._sender)
        # smtplib blocks: keep it off the event loop. notifyd's per-sink
        # timeout and queue bound a slow relay; an exception is counted as
        # failed and logged.
        await asyncio.to_thread(self._send, mail)

    def _send(self, mail: EmailMessage) -> None:
        with smtplib.SMTP(self._host, self._port, timeout=10) as smtp:
            smtp.send_message(mail)
