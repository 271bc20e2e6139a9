"""
Tokens: whether a JWT is valid and whom it speaks for, and minting HS256
tokens for the demo and the tests.

Where a handshake carries its token is :mod:`notifyd.credentials`' job.
Everything here is pure: no network, no event loop, no logging. The one piece
of I/O is :meth:`TokenVerifier.from_settings` reading the public key file,
because that happens once at start-up, at the edge.

Token verification pins the algorithm to the server's configured key (never
to the token's ``alg`` header), so ``alg: none`` and the HS256-with-an-RSA-
public-key confusion attack are both rejected. Every rejection raises
:class:`~notifyd.exceptions.AuthError` whose ``reason`` is a short string for
the log; it never contains the token.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ec import (
    SECP256R1,
    EllipticCurvePublicKey,
)
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm
from jwt.warnings import InsecureKeyLengthWarning

from .credentials import valid_user
from .exceptions import AuthError, ConfigError
from .settings import Settings

__all__ = [
    "DEFAULT_LEEWAY_S",
    "MAX_LEEWAY_S",
    "MAX_TOKEN_CHARS",
    "Identity",
    "Keys",
    "TokenVerifier",
]

DEFAULT_LEEWAY_S = 5.0
MAX_LEEWAY_S = 30.0
# Real tokens are a few hundred bytes; the cap keeps a hostile client from
# making us base64-decode and JSON-parse megabytes before we can say no.
MAX_TOKEN_CHARS = 8192
# RFC 7518 §3.2: an HS256 key should be at least as long as the hash output.
MIN_SECRET_BYTES = 32
# A PEM public key is a few KiB at most; the cap stops a misconfigured path
# such as /dev/zero from eating memory at start-up.
MAX_KEY_FILE_BYTES = 64 * 1024

_HS256 = "HS256"
_RS256 = "RS256"
_ES256 = "ES256"

PublicKey = RSAPublicKey | EllipticCurvePublicKey
_VerifyKey = bytes | RSAPublicKey | EllipticCurvePublicKey

_NO_KEY = "no JWT key: set NOTIFYD_JWT_SECRET or NOTIFYD_JWT_PUBLIC_KEY_FILE"


@dataclass(frozen=True)
class Identity:
    """
    Who a verified token speaks for, and until when.

    ``expires_at`` is the token's ``exp`` claim in unix seconds; ``claims``
    the verified payload (for the revocation check; never logged).
    """

    user: str
    expires_at: float
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


class TokenVerifier:
    """
    Verifies JWTs against the server's own key and mints HS256 test tokens.

    The set of accepted algorithms is fixed at construction from the
    configured key(s): HS256 for a shared secret, RS256 for an RSA public
    key, ES256 for an EC P-256 public key. A token's ``alg`` header only
    selects among those, never widens them.
    """

    algorithms: tuple[str, ...]
    weak_secret: bool
    user_claim: str
    issuer: str | None
    audience: str | None
    leeway_s: float

    def __init__(
        self,
        *,
        secret: str | bytes | None = None,
        public_key: PublicKey | None = None,
        algorithms: Iterable[str] = (),
        user_claim: str = "sub",
        issuer: str | None = None,
        audience: str | None = None,
        leeway_s: float = DEFAULT_LEEWAY_S,
    ) -> None:
        """
        Fix the keys and the allowed algorithms.

        ``algorithms`` (case-insensitive) narrows the set the keys allow;
        empty means all of them. Empty-string ``secret``, ``issuer`` and
        ``audience`` count as unset (an empty line in an env file).

        Raises :class:`ConfigError` when there is no key, a key is unusable,
        or a listed algorithm does not fit a configured key; raises
        :class:`ValueError` when ``leeway_s`` is outside 0..30 s.
        """
        if not (math.isfinite(leeway_s) and 0 <= leeway_s <= MAX_LEEWAY_S):
            raise ValueError(f"leeway_s must be between 0 and {MAX_LEEWAY_S:g} s")
        if not user_claim:
            raise ConfigError("NOTIFYD_JWT_USER_CLAIM must not be empty")

        usable: dict[str, _VerifyKey] = {}
        secret_bytes = secret.encode("utf-8") if isinstance(secret, str) else secret
        if secret_bytes:
            try:
                # PyJWT refuses PEM/SSH-looking HMAC keys; checking now turns a
                # per-request failure into a start-up error.
                HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret_bytes)
            except jwt.InvalidKeyError:
                raise ConfigError(
                    "NOTIFYD_JWT_SECRET looks like a PEM or SSH key; HS256 needs "
                    "a shared secret (put a public key in "
                    "NOTIFYD_JWT_PUBLIC_KEY_FILE instead)"
                ) from None
            usable[_HS256] = secret_bytes
        if public_key is not None:
            usable[_algorithm_for_key(public_key)] = public_key
        if not usable:
            raise ConfigError(_NO_KEY)

        wanted = [name.strip().upper() for name in algorithms if name.strip()]
        for name in wanted:
            if name not in usable:
                raise ConfigError(
                    f"NOTIFYD_JWT_ALGORITHMS lists {name!r}, which the configured "
                    f"key cannot verify (usable: {', '.join(sorted(usable))})"
                )
        allowed = sorted(set(wanted)) if wanted else sorted(usable)

        self._keys: dict[str, _VerifyKey] = {name: usable[name] for name in allowed}
        self._secret: bytes | None = secret_bytes or None
        self.algorithms = tuple(allowed)
        self.weak_secret = secret_bytes is not None and 0 < len(secret_bytes) < MIN_SECRET_BYTES
        self.user_claim = user_claim
        self.issuer = issuer or None
        self.audience = audience or None
        self.leeway_s = float(leeway_s)

    @classmethod
    def from_settings(cls, settings: Settings, *, leeway_s: float | None = None) -> TokenVerifier:
        """
        Build a verifier from the ``NOTIFYD_JWT_*`` settings.

        Reads ``jwt_public_key_file`` if set (the only I/O in this module).
        Raises :class:`ConfigError` (one line, naming the variable) when no
        key is configured, the key file is unreadable or not a supported PEM
        public key, or ``jwt_algorithms`` lists an algorithm the keys cannot
        verify; raises :class:`ValueError` for an out-of-range ``leeway_s``
        (default: ``jwt_leeway_s``).
        """
        public_key = None
        if settings.jwt_public_key_file is not None:
            public_key = _load_public_key(settings.jwt_public_key_file)
        return cls(
            secret=settings.jwt_secret,
            public_key=public_key,
            algorithms=settings.jwt_algorithms,
            user_claim=settings.jwt_user_claim,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            leeway_s=settings.jwt_leeway_s if leeway_s is None else leeway_s,
        )

    def verify(self, token: str, *, now: float | None = None) -> Identity:
        """
        Check a token's signature and claims and return whom it identifies.

        ``now`` (unix seconds) replaces the clock for the ``exp``/``nbf``/
        ``iat`` checks. ``exp`` is required; ``iss``/``aud`` are checked when
        configured. Raises :class:`AuthError` with a short log-only reason on
        every rejection; never raises anything else for any token string, and
        the reason never contains the token.
        """
        if not isinstance(token, str) or not token:
            raise AuthError("malformed")
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError("token too long")
        if not token.isascii():
            # A JWT is base64url and dots; PyJWT would fail to even encode a
            # lone surrogate and raise something other than a PyJWTError.
            raise AuthError("malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            # ``from None`` everywhere: PyJWT's messages and chained causes
            # can quote decoded token content, which must stay out of logs.
            raise AuthError("malformed") from None

        alg = header.get("alg")
        # The header only picks among the algorithms our keys allow, and each
        # algorithm gets only its own key: an HS256 token is never checked
        # against the RSA/EC public key, so the confusion attack has no key.
        if not isinstance(alg, str) or alg not in self._keys:
            raise AuthError("algorithm not allowed")
        key = self._keys[alg]

        try:
            with self._quiet_if_weak(alg):
                payload: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=self.audience,
                    issuer=self.issuer,
                    options={
                        "require": ["exp"],
                        # Time claims are checked below against ``now``,
                        # because PyJWT always reads the real clock.
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                        # Without a configured audience any ``aud`` is fine;
                        # PyJWT would otherwise reject every token having one.
                        "verify_aud": self.audience is not None,
                        # The user claim gets its own check (ints allowed);
                        # ``jti`` is not used by notifyd.
                        "verify_sub": False,
                        "verify_jti": False,
                    },
                )
        except jwt.InvalidSignatureError:
            raise AuthError("bad signature") from None
        except jwt.MissingRequiredClaimError as exc:
            # exc.claim is one of our own names (exp, iss, aud), not token data.
            raise AuthError(f"missing claim {exc.claim}") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong issuer") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("algorithm not allowed") from None
        except jwt.DecodeError:
            raise AuthError("malformed") from None
        except jwt.PyJWTError:
            raise AuthError("invalid token") from None

        clock = time.time() if now is None else now
        exp = _numeric_date(payload.get("exp"))
        if exp is None:
            raise AuthError("invalid claim exp")
        if exp <= clock - self.leeway_s:
            raise AuthError("expired")
        if "nbf" in payload:
            nbf = _numeric_date(payload["nbf"])
            if nbf is None:
                raise AuthError("invalid claim nbf")
            if nbf > clock + self.leeway_s:
                raise AuthError("not yet valid")
        if "iat" in payload:
            iat = _numeric_date(payload["iat"])
            if iat is None:
                raise AuthError("invalid claim iat")
            if iat > clock + self.leeway_s:
                raise AuthError("issued in the future")

        raw_user = payload.get(self.user_claim)
        if raw_user is None:
            raise AuthError(f"missing claim {self.user_claim}")
        # bool is an int subclass, but ``true`` is not a user id.
        if isinstance(raw_user, int) and not isinstance(raw_user, bool):
            raw_user = str(raw_user)
        if not isinstance(raw_user, str) or not valid_user(raw_user):
            raise AuthError(f"invalid claim {self.user_claim}")
        return Identity(user=raw_user, expires_at=exp, claims=payload)

    def mint(
        self,
        user: str,
        *,
        ttl_s: float = 3600,
        now: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """
        Sign an HS256 token for ``user`` that :meth:`verify` accepts.

        Claims: the user claim, ``iat``, ``exp`` (``now + ttl_s`` rounded
        up), ``iss``/``aud`` when configured, plus ``extra``. Raises
        :class:`ConfigError` without a secret or when HS256 is not allowed;
        :class:`ValueError` for an invalid user id, a non-positive ``ttl_s``
        or ``extra`` overriding one of those claims; :class:`TypeError` when
        ``extra`` is not JSON-serialisable.
        """
        if self._secret is None:
            raise ConfigError("minting tokens needs NOTIFYD_JWT_SECRET")
        if _HS256 not in self._keys:
            raise ConfigError("minting tokens needs HS256 in NOTIFYD_JWT_ALGORITHMS")
        if not valid_user(user):
            raise ValueError("user id must be 1-255 characters without control characters")
        if not (math.isfinite(ttl_s) and ttl_s > 0):
            raise ValueError("ttl_s must be a positive number of seconds")

        clock = time.time() if now is None else now
        claims: dict[str, Any] = {
            self.user_claim: user,
            "iat": math.floor(clock),
            "exp": math.ceil(clock + ttl_s),
        }
        if self.issuer is not None:
            claims["iss"] = self.issuer
        if self.audience is not None:
            claims["aud"] = self.audience
        if extra:
            clash = sorted(set(extra) & set(claims))
            if clash:
                raise ValueError(f"extra claims may not override {', '.join(clash)}")
            claims.update(extra)
        with self._quiet_if_weak(_HS256):
            return jwt.encode(claims, self._secret, algorithm=_HS256)

    @contextmanager
    def _quiet_if_weak(self, alg: str) -> Iterator[None]:
        """
        Silence PyJWT's short-HMAC-key warning, which would repeat per token.

        ``weak_secret`` already tells the CLI to warn once at start-up.
        """
        if alg == _HS256 and self.weak_secret:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", InsecureKeyLengthWarning)
                yield
        else:
            yield


def _algorithm_for_key(key: PublicKey) -> str:
    """
    Return the one algorithm a public key may verify.

    Raises :class:`ConfigError` for key types or curves notifyd does not
    support.
    """
    if isinstance(key, RSAPublicKey):
        return _RS256
    if isinstance(key, EllipticCurvePublicKey):
        if isinstance(key.curve, SECP256R1):
            return _ES256
        raise ConfigError(
            f"NOTIFYD_JWT_PUBLIC_KEY_FILE holds an EC key on curve "
            f"{key.curve.name}; only P-256 (ES256) is supported"
        )
    raise ConfigError(
        f"NOTIFYD_JWT_PUBLIC_KEY_FILE holds a {type(key).__name__}; only RSA "
        "(RS256) and EC P-256 (ES256) public keys are supported"
    )


def _load_public_key(path: Path) -> PublicKey:
    """
    Read and parse a PEM public key file.

    Raises :class:`ConfigError` (one line, naming
    NOTIFYD_JWT_PUBLIC_KEY_FILE) when the file cannot be read, is too
    large, is not a PEM public key, or holds an unsupported key type.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot read NOTIFYD_JWT_PUBLIC_KEY_FILE {path}: {reason}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"NOTIFYD_JWT_PUBLIC_KEY_FILE {path} is too large to be a PEM public key")
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        hint = " (it holds a private key; give the public half)" if b"PRIVATE KEY" in data else ""
        raise ConfigError(
            f"NOTIFYD_JWT_PUBLIC_KEY_FILE {path} is not a PEM public key{hint}"
        ) from None
    if not isinstance(key, (RSAPublicKey, EllipticCurvePublicKey)):
        raise ConfigError(
            f"NOTIFYD_JWT_PUBLIC_KEY_FILE {path} holds a {type(key).__name__}; only "
            "RSA (RS256) and EC P-256 (ES256) public keys are supported"
        )
    _algorithm_for_key(key)  # rejects unsupported EC curves now, not per token
    return key


def _numeric_date(value: object) -> float | None:
    """
    Return a JWT NumericDate as float, or ``None`` if it is not one.

    Rejects booleans and non-finite values: Python's JSON parser accepts
    ``Infinity`` and ``NaN``, and ``exp: Infinity`` must not mean "never".
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


class Keys:
    """
    The verifier in force, swapped whole on a reload (key rotation).

    One object, owned by the daemon and read by everything that checks a
    token, so a reload reaches every reader at once and nothing reaches
    into another part to set it.
    """

    __slots__ = ("verifier",)

    def __init__(self, verifier: TokenVerifier | None) -> None:
        # None: the path-user development mode, where no token is taken.
        self.verifier = verifier

    @property
    def leeway_s(self) -> float:
        """
        The clock leeway of the verifier in force (0 without one).
        """
        return self.verifier.leeway_s if self.verifier is not None else 0.0

    def verify(self, token: str) -> Identity:
        """
        Verify ``token`` with the keys in force; :class:`AuthError` when it
        is invalid or this server takes no tokens.
        """
        if self.verifier is None:
            raise AuthError("this server takes no tokens")
        return self.verifier.verify(token)
