"""
The server's TLS context, from the two certificate settings.
"""

from __future__ import annotations

import ssl

from .exceptions import ConfigError
from .settings import Settings

__all__ = ["tls_context"]


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """
    The server TLS context when a certificate is configured, else None.

    Raises :class:`ConfigError` naming the setting when the files are
    missing or do not match.
    """
    if settings.tls_cert_file is None and settings.tls_key_file is None:
        return None
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise ConfigError("set both NOTIFYD_TLS_CERT_FILE and NOTIFYD_TLS_KEY_FILE")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"NOTIFYD_TLS_CERT_FILE/NOTIFYD_TLS_KEY_FILE cannot be used: {exc}"
        ) from None
    return context
