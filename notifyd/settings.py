"""
Settings, read once at the edge (the CLI) and passed down.

Every setting is an environment variable prefixed ``NOTIFYD_`` (or a line in
the ``--env-file``). Lists are comma-separated. :func:`load_settings` turns a
validation failure into :class:`~notifyd.exceptions.ConfigError` whose text
names the offending variable in one line.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .exceptions import ConfigError
from .peers import TrustedProxies

ENV_PREFIX = "NOTIFYD_"

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """
    All of notifyd's configuration.

    Instances are immutable; a reload builds a new one.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        frozen=True,
        case_sensitive=False,
    )

    dsn: str | None = None
    listen_dsn: str | None = Field(
        default=None,
        description="DSN for the LISTEN connection when NOTIFYD_DSN goes "
        "through a transaction-mode pooler; must reach Postgres directly "
        "or through a session-mode pooler.",
    )
    read_dsn: str | None = Field(
        default=None,
        description="DSN of a hot standby of NOTIFYD_DSN's cluster for delivery's window "
        "reads, replays and history (docs/deployment.md, 'Reads on a replica').",
    )
    read_max_lag_ms: float = Field(
        default=2000.0,
        gt=0,
        description="How long a read waits for the standby to replay the primary's "
        "position before the standby is bypassed for the primary.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)

    jwt_secret: str | None = None
    jwt_public_key_file: Path | None = None
    jwt_algorithms: CommaList = Field(default_factory=list)
    jwt_user_claim: str = "sub"
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    token_cookie: str = "notifyd_token"
    serve_static: bool = Field(
        default=True,
        description="Serve the browser client (/notifyd.js, /notifyd.d.ts) and the demo page (/demo).",
    )
    allowed_origins: CommaList = Field(
        default_factory=list,
        description="Origins (https://app.example.com) whose pages may open WebSocket "
        "sessions (others get 403 before the upgrade) and load the static files by CORS; "
        "empty: all.",
    )
    auth_timeout_s: float = Field(default=10.0, gt=0)
    dev_insecure_user_from_path: bool = False

    max_sessions_per_user: int = Field(default=10, ge=1)
    max_frame_bytes: int = Field(default=64 * 1024, ge=256)
    session_queue_messages: int = Field(default=20_000, ge=1)
    session_queue_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    slow_client_timeout_s: float = Field(default=30.0, gt=0)
    replay_limit: int = Field(default=1000, ge=1)
    fetch_batch: int = Field(default=1000, ge=1)
    batch_interval_ms: float = Field(
        default=2.0,
        ge=0,
        description="While polling, the time between two reads of new rows; while waiting "
        "for NOTIFYs, a read starts at once as long as a budget of a few lasts, which refills "
        "at one per interval, so one query serves several commits under load; 0 reads once "
        "per wake-up.",
    )
    wake: Literal["auto", "notify"] = Field(
        default="auto",
        description="auto: while the application's commits queue for the NOTIFY lock, "
        "this instance polls and the triggers skip their NOTIFY; notify: always wake up "
        "on NOTIFY (other instances' polling is still followed). See docs/deployment.md.",
    )
    push_ahead: bool = Field(
        default=True,
        description="Push the rows a NOTIFY carries (a transaction's first few inserted "
        "rows, when small) at once, before the window read that confirms them; false: "
        "every row waits for its window read. See docs/deployment.md.",
    )
    poll_above: float | None = Field(
        default=None,
        gt=0,
        description="With NOTIFYD_WAKE=auto, also poll above this many writing transactions "
        "a second (stopping below half of it), whether or not commits queue; unset: only "
        "the queue decides.",
    )
    event_retention_s: float = Field(
        default=3600.0,
        gt=0,
        description="How long read/delete events are kept in t_message_event.",
    )

    ping_interval_s: float = Field(default=20.0, gt=0)
    ping_timeout_s: float = Field(default=20.0, gt=0)
    probe_interval_s: float = Field(default=5.0, gt=0)
    probe_timeout_s: float = Field(default=5.0, gt=0)
    poll_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="How often the table is scanned while the LISTEN "
        "connection is down, so delivery continues during an outage.",
    )
    reconnect_max_s: float = Field(default=10.0, gt=0)
    shutdown_timeout_s: float = Field(default=10.0, gt=0)
    pool_size: int = Field(default=4, ge=2)
    workers: int = Field(
        default=1,
        ge=1,
        description="Worker processes sharing the port (SO_REUSEPORT) under one parent; "
        "auto: one per CPU this process may run on. See docs/deployment.md.",
    )
    worker_stall_s: float = Field(
        default=10.0,
        gt=0,
        description="With NOTIFYD_WORKERS above 1: a worker whose heartbeats stop this long "
        "(its event loop stuck) is killed and replaced; keep it below systemd's WatchdogSec.",
    )

    metrics: bool = Field(default=True, description="Serve /metrics (Prometheus).")
    metrics_loopback_only: bool = Field(
        default=False, description="Answer /metrics only to clients on this machine."
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["kv", "json"] = "kv"
    tls_cert_file: Path | None = Field(
        default=None, description="Serve wss:// directly with this PEM certificate (chain)."
    )
    tls_key_file: Path | None = Field(
        default=None, description="The certificate's PEM private key."
    )

    # Hostile clients (docs/security.md). Per-address limits are off by
    # default: behind a load balancer or NAT every client has one address.
    require_origin: bool = Field(
        default=False,
        description="Refuse WebSocket handshakes without an Origin header (non-browser "
        "clients) with 403.",
    )
    jwt_leeway_s: float = Field(
        default=5.0, ge=0, le=30, description="Clock skew tolerated on exp/nbf/iat."
    )
    revocation_sql: str | None = Field(
        default=None,
        description="A query run when a session authenticates or refreshes, with $1 the "
        "user id and (optionally) $2 the token's claims as jsonb; the session is refused "
        "with 4401 unless its first column is true.",
    )
    max_connections_per_address: int = Field(
        default=0, ge=0, description="Open WebSocket connections per client IP; 0: no limit."
    )
    handshakes_per_s_per_address: float = Field(
        default=0.0,
        ge=0,
        description="WebSocket handshakes per second per client IP (bursts of 4 s worth); "
        "0: no limit.",
    )
    client_frames_per_s: float = Field(
        default=50.0,
        ge=0,
        description="Frames per second a session may send (bursts of 4 s worth); past "
        "it the session is closed with 1008. 0: no limit.",
    )
    max_pending_handshakes: int = Field(
        default=2000,
        ge=0,
        description="WebSocket handshakes accepted but not yet live sessions (hello sent), all "
        "clients together; past it new ones are shed at once with a retry hint (503 and "
        "Retry-After, or close 1013 for browsers) instead of waiting to time out. 0: no limit.",
    )
    trusted_proxies: CommaList = Field(
        default_factory=list,
        description="Reverse proxies (addresses or networks: 127.0.0.1, 10.0.0.0/8) whose "
        "X-Forwarded-For names the client, for the per-address limits and the logs; from "
        "any other peer the header is ignored. Empty: the TCP peer is the client.",
    )
    max_read_ids: int = Field(default=1000, ge=1, le=100_000)
    max_concurrent_history: int = Field(
        default=2, ge=1, description="history queries running at once, all sessions together."
    )

    # -- Sinks: channels besides the WebSocket (docs/sinks.md) ---------------
    sinks: CommaList = Field(
        default_factory=list,
        description="Sinks to run, by name in the notifyd.sinks entry point group "
        "(built in: log, webhook).",
    )
    sink_queue_size: int = Field(
        default=10_000, ge=1, description="Messages waiting per sink; more are dropped and counted."
    )
    sink_timeout_s: float = Field(
        default=30.0, gt=0, description="A sink call taking longer is cancelled and counted failed."
    )
    sink_options: Annotated[dict[str, dict[str, Any]], NoDecode] = Field(
        default_factory=dict,
        description='Options of third-party sinks, as JSON: {"name": {"key": value}}.',
    )
    webhook_url: str | None = Field(
        default=None, description="http(s) URL the webhook sink POSTs to."
    )
    webhook_secret: SecretStr | None = Field(
        default=None, description="HMAC-SHA256 key the webhook signs with (at least 16 bytes)."
    )
    webhook_mode: Literal["all", "offline"] = Field(
        default="all",
        description="all: every message; offline: only messages no session saw within "
        "NOTIFYD_WEBHOOK_OFFLINE_AFTER_S.",
    )
    webhook_offline_after_s: float = Field(default=60.0, ge=0)
    webhook_types: CommaList = Field(
        default_factory=list, description="Only messages of these types; empty: all."
    )
    webhook_ca_file: Path | None = Field(
        default=None,
        description="PEM certificates to trust for an https:// webhook with a private CA "
        "(default: the system's).",
    )
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, description="Per POST, connect to status line."
    )
    webhook_retry_initial_s: float = Field(default=1.0, gt=0)
    webhook_retry_max_s: float = Field(default=300.0, gt=0)
    webhook_max_age_s: float = Field(
        default=86_400.0,
        gt=0,
        description="A message not delivered this long after it was committed is given up.",
    )
    webhook_batch: int = Field(
        default=10, ge=1, description="Pending rows the webhook sender reads at a time."
    )
    webhook_poll_s: float = Field(
        default=5.0,
        gt=0,
        description="Longest wait between looks at the dispatch table without a wake-up.",
    )
    log_sink_path: str = Field(
        default="-", description="File the log sink appends to; - is stdout."
    )
    log_sink_types: CommaList = Field(
        default_factory=list, description="Only messages of these types; empty: all."
    )

    @field_validator("sink_options", mode="before")
    @classmethod
    def _parse_sink_options(cls, value: object) -> object:
        # Parsed here, not by the settings source, so bad JSON is a one-line
        # ConfigError rather than a traceback.
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc.msg} at position {exc.pos})") from None
        return value

    # Speed trade-offs, measured in docs/performance.md.
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        default="auto",
        description="auto: uvloop when it is installed (notifyd[fast]), else asyncio's own loop.",
    )
    compression: bool = Field(
        default=False,
        description="Accept permessage-deflate: smaller frames on slow links, but each frame "
        "is compressed per session and an idle session takes several times the memory.",
    )

    @field_validator(
        "jwt_algorithms",
        "allowed_origins",
        "sinks",
        "webhook_types",
        "log_sink_types",
        "trusted_proxies",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: list[str]) -> list[str]:
        # Raises ValueError naming the bad entry: a one-line ConfigError.
        TrustedProxies.from_list(value)
        return value

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return usable_cpus()
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def local_only(self) -> bool:
        """
        Whether only this machine can reach the port: a loopback ``host``
        and no reverse proxy in front (which would bring any client in).
        """
        return self.is_loopback and not self.trusted_proxies

    @property
    def is_loopback(self) -> bool:
        """
        Whether ``host`` only accepts connections from this machine.
        """
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def usable_cpus() -> int:
    """
    The CPUs this process may run on (its affinity mask, which a container's
    or systemd's CPU pinning narrows), at least 1.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def load_settings(env_file: Path | str | None = None, **overrides: Any) -> Settings:
    """
    Build :class:`Settings` from the environment, an optional env file and
    explicit overrides (highest precedence).

    Raises :class:`ConfigError` with one line naming the setting on failure.
    """
    if env_file is not None and not Path(env_file).is_file():
        raise ConfigError(f"env file {env_file} does not exist")
    try:
        return Settings(_env_file=env_file, **overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "?"
        raise ConfigError(f"invalid setting {ENV_PREFIX}{field.upper()}: {error['msg']}") from None
