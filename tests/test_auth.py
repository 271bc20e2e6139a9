"""
Unit tests for :mod:`notifyd.auth`: token verification, key loading and
minting. Pure: no network, no event loop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import warnings
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from notifyd.auth import Identity, TokenVerifier
from notifyd.exceptions import AuthError, ConfigError
from notifyd.settings import Settings

SECRET = "s" * 32
NOW = 1_700_000_000.0


@pytest.fixture(autouse=True)
def _no_notifyd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Keep NOTIFYD_* variables of the machine running the tests out of Settings.
    """
    for name in list(os.environ):
        if name.upper().startswith("NOTIFYD_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    """
    One RSA key pair for the module (generation is the slow part).
    """
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    """
    One EC P-256 key pair for the module.
    """
    return ec.generate_private_key(ec.SECP256R1())


def _public_pem(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_public_key(
    tmp_path: Path, private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
) -> Path:
    path = tmp_path / "jwt.pub.pem"
    path.write_bytes(_public_pem(private_key))
    return path


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64json(obj: object) -> str:
    return _b64(json.dumps(obj).encode("utf-8"))


def _hs256_by_hand(header: dict[str, Any], payload: dict[str, Any], key: bytes) -> str:
    """
    Sign a token with raw HMAC-SHA256, bypassing PyJWT's key checks.
    """
    signing_input = f"{_b64json(header)}.{_b64json(payload)}"
    digest = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(digest)}"


def _hs(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def _verifier(**settings: Any) -> TokenVerifier:
    settings.setdefault("jwt_secret", SECRET)
    return TokenVerifier.from_settings(Settings(**settings))


def _reason(verifier: TokenVerifier, token: str, now: float = NOW) -> str:
    with pytest.raises(AuthError) as info:
        verifier.verify(token, now=now)
    # Whatever the failure, the token itself must never reach the log text.
    assert token not in str(info.value) or not token
    return info.value.reason


# --------------------------------------------------------------------- HS256


def test_valid_hs256_token_gives_identity() -> None:
    """A correctly signed HS256 token yields its sub and exp."""
    token = _hs({"sub": "alice", "exp": int(NOW) + 60})
    assert _verifier().verify(token, now=NOW) == Identity("alice", NOW + 60)


def test_verify_without_now_uses_the_real_clock() -> None:
    """Omitting now checks exp against time.time()."""
    verifier = _verifier()
    assert verifier.verify(verifier.mint("bob", ttl_s=60)).user == "bob"
    with pytest.raises(AuthError, match="expired"):
        verifier.verify(_hs({"sub": "bob", "exp": 1_000_000}))


def test_expired_token_rejected_at_given_now() -> None:
    """A token past exp (beyond the leeway) is rejected as expired."""
    token = _hs({"sub": "alice", "exp": int(NOW)})
    assert _reason(_verifier(), token, now=NOW + 6) == "expired"


def test_expiry_leeway_is_applied() -> None:
    """Within the leeway (default 5 s) an expired token still passes; leeway 0 is strict."""
    token = _hs({"sub": "alice", "exp": int(NOW)})
    assert _verifier().verify(token, now=NOW + 4).user == "alice"
    strict = TokenVerifier.from_settings(Settings(jwt_secret=SECRET), leeway_s=0)
    assert _reason(strict, token, now=NOW) == "expired"


def test_leeway_above_30_seconds_refused() -> None:
    """A leeway over 30 s (or negative) is a programming error: ValueError."""
    with pytest.raises(ValueError):
        TokenVerifier(secret=SECRET, leeway_s=31)
    with pytest.raises(ValueError):
        TokenVerifier(secret=SECRET, leeway_s=-1)


def test_missing_exp_rejected() -> None:
    """exp is required: a token without it is rejected naming the claim."""
    assert _reason(_verifier(), _hs({"sub": "alice"})) == "missing claim exp"


@pytest.mark.parametrize("exp", ["tomorrow", True, float("inf"), [1]])
def test_non_numeric_exp_rejected(exp: object) -> None:
    """exp must be a finite number: strings, booleans and Infinity never pass."""
    token = _hs({"sub": "alice", "exp": exp})
    assert _reason(_verifier(), token) in {"invalid claim exp", "malformed"}


def test_future_nbf_and_iat_rejected() -> None:
    """A token not valid yet (nbf) or issued in the future (iat) is rejected."""
    exp = int(NOW) + 3600
    verifier = _verifier()
    assert _reason(verifier, _hs({"sub": "a", "exp": exp, "nbf": NOW + 60})) == "not yet valid"
    assert (
        _reason(verifier, _hs({"sub": "a", "exp": exp, "iat": NOW + 60})) == "issued in the future"
    )
    assert verifier.verify(_hs({"sub": "a", "exp": exp, "nbf": NOW, "iat": NOW}), now=NOW)


def test_bad_signature_rejected() -> None:
    """A token signed with another secret, or with a tampered payload, is rejected."""
    verifier = _verifier()
    other = _hs({"sub": "alice", "exp": int(NOW) + 60}, secret="t" * 32)
    assert _reason(verifier, other) == "bad signature"

    header, _, signature = _hs({"sub": "alice", "exp": int(NOW) + 60}).split(".")
    forged = f"{header}.{_b64json({'sub': 'mallory', 'exp': int(NOW) + 60})}.{signature}"
    assert _reason(verifier, forged) == "bad signature"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_token_rejected(alg: str) -> None:
    """An unsigned token (alg none, empty signature) is never accepted."""
    token = f"{_b64json({'alg': alg, 'typ': 'JWT'})}.{_b64json({'sub': 'alice', 'exp': int(NOW) + 60})}."
    assert _reason(_verifier(), token) == "algorithm not allowed"


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b.c", "x" * 9000, "eyJhbGciOiJIUzI1NiJ9.!!!.sig", "é.é.é"],
)
def test_malformed_token_rejected(token: str) -> None:
    """Garbage, truncated or oversized tokens raise AuthError, nothing else."""
    assert _reason(_verifier(), token) in {"malformed", "token too long", "algorithm not allowed"}


def test_short_secret_is_flagged_weak_and_stays_quiet() -> None:
    """A secret under 32 bytes works, sets weak_secret, and emits no per-token warning."""
    weak = TokenVerifier.from_settings(Settings(jwt_secret="short"))
    assert weak.weak_secret is True
    assert TokenVerifier.from_settings(Settings(jwt_secret=SECRET)).weak_secret is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        token = weak.mint("alice", now=NOW)
        assert weak.verify(token, now=NOW).user == "alice"


def test_pem_looking_secret_refused_at_start_up(rsa_key: rsa.RSAPrivateKey) -> None:
    """A public key pasted into NOTIFYD_JWT_SECRET is a ConfigError, not a per-token failure."""
    with pytest.raises(ConfigError, match="NOTIFYD_JWT_SECRET"):
        TokenVerifier.from_settings(Settings(jwt_secret=_public_pem(rsa_key).decode()))


# --------------------------------------------------------- RS256 / ES256


def test_rs256_token_verifies_with_public_key_file(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """An RSA public key file allows exactly RS256, and a matching token verifies."""
    verifier = TokenVerifier.from_settings(
        Settings(jwt_public_key_file=_write_public_key(tmp_path, rsa_key))
    )
    assert verifier.algorithms == ("RS256",)
    token = jwt.encode({"sub": "alice", "exp": int(NOW) + 60}, rsa_key, algorithm="RS256")
    assert verifier.verify(token, now=NOW) == Identity("alice", NOW + 60)


def test_rs256_token_from_another_key_rejected(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """An RS256 token signed by a different RSA key fails the signature check."""
    verifier = TokenVerifier.from_settings(
        Settings(jwt_public_key_file=_write_public_key(tmp_path, rsa_key))
    )
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode({"sub": "alice", "exp": int(NOW) + 60}, stranger, algorithm="RS256")
    assert _reason(verifier, token) == "bad signature"


def test_es256_token_verifies_with_public_key_file(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """An EC P-256 public key file allows exactly ES256, and a matching token verifies."""
    verifier = TokenVerifier.from_settings(
        Settings(jwt_public_key_file=_write_public_key(tmp_path, ec_key))
    )
    assert verifier.algorithms == ("ES256",)
    token = jwt.encode({"sub": "alice", "exp": int(NOW) + 60}, ec_key, algorithm="ES256")
    assert verifier.verify(token, now=NOW).user == "alice"


def test_token_algorithm_must_match_key_type(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """With an RSA key configured, ES256 and HS256 tokens are refused by algorithm."""
    verifier = TokenVerifier.from_settings(
        Settings(jwt_public_key_file=_write_public_key(tmp_path, rsa_key))
    )
    es = jwt.encode({"sub": "alice", "exp": int(NOW) + 60}, ec_key, algorithm="ES256")
    assert _reason(verifier, es) == "algorithm not allowed"
    assert _reason(verifier, _hs({"sub": "alice", "exp": int(NOW) + 60})) == "algorithm not allowed"


def test_unsupported_ec_curve_refused(tmp_path: Path) -> None:
    """An EC key on a curve other than P-256 is a ConfigError naming the file variable."""
    path = _write_public_key(tmp_path, ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ConfigError, match="NOTIFYD_JWT_PUBLIC_KEY_FILE"):
        TokenVerifier.from_settings(Settings(jwt_public_key_file=path))


def test_algorithm_confusion_with_rsa_public_key_rejected(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """An HS256 token keyed with the RSA public key PEM is rejected, with or without a secret configured."""
    path = _write_public_key(tmp_path, rsa_key)
    pem = path.read_bytes()
    claims = {"sub": "mallory", "exp": int(NOW) + 60}
    forged = _hs256_by_hand({"alg": "HS256", "typ": "JWT"}, claims, pem)

    rsa_only = TokenVerifier.from_settings(Settings(jwt_public_key_file=path))
    assert _reason(rsa_only, forged) == "algorithm not allowed"

    # With both keys, HS256 is allowed but is checked against the secret only.
    both = TokenVerifier.from_settings(Settings(jwt_secret=SECRET, jwt_public_key_file=path))
    assert both.algorithms == ("HS256", "RS256")
    assert _reason(both, forged) == "bad signature"
    rs = jwt.encode({"sub": "alice", "exp": int(NOW) + 60}, rsa_key, algorithm="RS256")
    assert both.verify(rs, now=NOW).user == "alice"
    assert both.verify(_hs({"sub": "bob", "exp": int(NOW) + 60}), now=NOW).user == "bob"


def test_jwt_algorithms_narrows_allowed_set(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """NOTIFYD_JWT_ALGORITHMS=RS256 with both keys configured refuses HS256 tokens."""
    path = _write_public_key(tmp_path, rsa_key)
    verifier = TokenVerifier.from_settings(
        Settings(jwt_secret=SECRET, jwt_public_key_file=path, jwt_algorithms=["rs256"])
    )
    assert verifier.algorithms == ("RS256",)
    assert _reason(verifier, _hs({"sub": "a", "exp": int(NOW) + 60})) == "algorithm not allowed"
    with pytest.raises(ConfigError, match="HS256 in NOTIFYD_JWT_ALGORITHMS"):
        verifier.mint("alice")


@pytest.mark.parametrize("listed", ["RS256", "ES256", "none", "HS512"])
def test_listed_algorithm_not_fitting_key_is_config_error(listed: str) -> None:
    """An algorithm in NOTIFYD_JWT_ALGORITHMS that the configured key cannot verify is a ConfigError."""
    with pytest.raises(ConfigError, match="NOTIFYD_JWT_ALGORITHMS"):
        TokenVerifier.from_settings(Settings(jwt_secret=SECRET, jwt_algorithms=[listed]))


def test_jwt_algorithms_read_comma_separated_from_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The env var form ("HS256, ") reaches the verifier as a narrowed list."""
    monkeypatch.setenv("NOTIFYD_JWT_SECRET", SECRET)
    monkeypatch.setenv("NOTIFYD_JWT_ALGORITHMS", "HS256, ")
    assert TokenVerifier.from_settings(Settings()).algorithms == ("HS256",)


# ------------------------------------------------------------ iss / aud


def test_issuer_checked_when_configured() -> None:
    """With NOTIFYD_JWT_ISSUER set, the right iss passes, a wrong or missing one fails."""
    verifier = _verifier(jwt_issuer="https://id.example")
    exp = int(NOW) + 60
    assert verifier.verify(_hs({"sub": "a", "exp": exp, "iss": "https://id.example"}), now=NOW)
    assert _reason(verifier, _hs({"sub": "a", "exp": exp, "iss": "https://evil"})) == "wrong issuer"
    assert _reason(verifier, _hs({"sub": "a", "exp": exp})) == "missing claim iss"


def test_audience_checked_when_configured() -> None:
    """With NOTIFYD_JWT_AUDIENCE set, the right aud (string or list) passes, a wrong or missing one fails."""
    verifier = _verifier(jwt_audience="notifyd")
    exp = int(NOW) + 60
    assert verifier.verify(_hs({"sub": "a", "exp": exp, "aud": "notifyd"}), now=NOW)
    assert verifier.verify(_hs({"sub": "a", "exp": exp, "aud": ["x", "notifyd"]}), now=NOW)
    assert _reason(verifier, _hs({"sub": "a", "exp": exp, "aud": "billing"})) == "wrong audience"
    assert _reason(verifier, _hs({"sub": "a", "exp": exp})) == "missing claim aud"


def test_any_audience_accepted_when_none_configured() -> None:
    """Without NOTIFYD_JWT_AUDIENCE, a token carrying some aud is still accepted."""
    token = _hs({"sub": "a", "exp": int(NOW) + 60, "aud": "anything", "iss": "whoever"})
    assert _verifier().verify(token, now=NOW).user == "a"


# ------------------------------------------------------------ user claim


def test_custom_user_claim() -> None:
    """NOTIFYD_JWT_USER_CLAIM picks the claim holding the user id; sub is then ignored."""
    verifier = _verifier(jwt_user_claim="uid")
    exp = int(NOW) + 60
    assert verifier.verify(_hs({"uid": "carol", "sub": "x", "exp": exp}), now=NOW).user == "carol"
    assert _reason(verifier, _hs({"sub": "carol", "exp": exp})) == "missing claim uid"


def test_integer_user_claim_becomes_string() -> None:
    """A numeric sub (common with integer primary keys) is accepted as its decimal string."""
    token = _hs({"sub": 42, "exp": int(NOW) + 60})
    assert _verifier().verify(token, now=NOW).user == "42"


@pytest.mark.parametrize(
    "value",
    ["", True, 1.5, ["alice"], {"id": "alice"}, "x" * 256, "a\x00b", "line\nbreak"],
)
def test_invalid_user_claim_rejected(value: object) -> None:
    """Empty, non-string, over-long or control-character user ids are rejected."""
    token = _hs({"sub": value, "exp": int(NOW) + 60})
    assert _reason(_verifier(), token) == "invalid claim sub"


def test_null_user_claim_counts_as_missing() -> None:
    """sub: null is reported like an absent claim."""
    assert _reason(_verifier(), _hs({"sub": None, "exp": int(NOW) + 60})) == "missing claim sub"


def test_longest_and_unicode_user_ids_accepted() -> None:
    """A 255-character id and a non-ASCII id are valid."""
    verifier = _verifier()
    for user in ("u" * 255, "张三"):
        assert verifier.verify(_hs({"sub": user, "exp": int(NOW) + 60}), now=NOW).user == user


# ------------------------------------------------------------------ mint


def test_minted_token_round_trips_with_iss_aud_and_extra() -> None:
    """mint() produces an HS256 token that verify() accepts, carrying iss, aud and extra claims."""
    verifier = _verifier(jwt_issuer="me", jwt_audience="notifyd", jwt_user_claim="uid")
    token = verifier.mint("alice", ttl_s=120, now=NOW, extra={"role": "admin"})
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims == {
        "uid": "alice",
        "iat": int(NOW),
        "exp": int(NOW) + 120,
        "iss": "me",
        "aud": "notifyd",
        "role": "admin",
    }
    assert verifier.verify(token, now=NOW) == Identity("alice", NOW + 120)
    assert _reason(verifier, token, now=NOW + 200) == "expired"


def test_mint_refuses_to_override_its_own_claims() -> None:
    """extra may not replace the user, exp or iat claims."""
    with pytest.raises(ValueError, match="exp"):
        _verifier().mint("alice", extra={"exp": 1})
    with pytest.raises(ValueError, match="sub"):
        _verifier().mint("alice", extra={"sub": "root"})


def test_mint_rejects_invalid_user_and_ttl() -> None:
    """mint() validates the user id and requires a positive ttl."""
    with pytest.raises(ValueError):
        _verifier().mint("")
    with pytest.raises(ValueError):
        _verifier().mint("alice", ttl_s=0)


def test_mint_without_secret_is_config_error(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """With only a public key configured, mint() raises ConfigError naming NOTIFYD_JWT_SECRET."""
    verifier = TokenVerifier.from_settings(
        Settings(jwt_public_key_file=_write_public_key(tmp_path, rsa_key))
    )
    with pytest.raises(ConfigError, match="minting tokens needs NOTIFYD_JWT_SECRET"):
        verifier.mint("alice")


# ---------------------------------------------------------- from_settings


def test_from_settings_without_any_key_is_config_error() -> None:
    """Neither secret nor key file configured: ConfigError telling which variables to set."""
    with pytest.raises(ConfigError) as info:
        TokenVerifier.from_settings(Settings())
    assert str(info.value) == "no JWT key: set NOTIFYD_JWT_SECRET or NOTIFYD_JWT_PUBLIC_KEY_FILE"


def test_empty_secret_counts_as_unset() -> None:
    """NOTIFYD_JWT_SECRET= (an empty line in an env file) is the same as no secret."""
    with pytest.raises(ConfigError, match="no JWT key"):
        TokenVerifier.from_settings(Settings(jwt_secret=""))


def test_missing_key_file_is_one_line_config_error(tmp_path: Path) -> None:
    """A key file that does not exist gives a one-line ConfigError naming the variable."""
    with pytest.raises(ConfigError) as info:
        TokenVerifier.from_settings(Settings(jwt_public_key_file=tmp_path / "nope.pem"))
    message = str(info.value)
    assert "NOTIFYD_JWT_PUBLIC_KEY_FILE" in message and "\n" not in message


def test_directory_as_key_file_is_config_error(tmp_path: Path) -> None:
    """A directory where the key file should be is a ConfigError, not an OSError."""
    with pytest.raises(ConfigError, match="NOTIFYD_JWT_PUBLIC_KEY_FILE"):
        TokenVerifier.from_settings(Settings(jwt_public_key_file=tmp_path))


def test_garbage_key_file_is_one_line_config_error(tmp_path: Path) -> None:
    """A file that is not a PEM public key gives a one-line ConfigError naming the variable."""
    path = tmp_path / "junk.pem"
    path.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError) as info:
        TokenVerifier.from_settings(Settings(jwt_public_key_file=path))
    message = str(info.value)
    assert "NOTIFYD_JWT_PUBLIC_KEY_FILE" in message and "\n" not in message


def test_private_key_file_is_config_error_with_hint(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """Pointing the variable at a private key is refused with a hint to use the public half."""
    path = tmp_path / "private.pem"
    path.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match="public half"):
        TokenVerifier.from_settings(Settings(jwt_public_key_file=path))
