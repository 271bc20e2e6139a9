"""
Unit tests for :mod:`notifyd.protocol`: server frame encoding, client frame
parsing and close codes. Pure: no I/O.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from notifyd.client_frames import Auth, Ping, parse_client_frame
from notifyd.exceptions import ProtocolError
from notifyd.protocol import (
    PONG,
    PROTOCOL_VERSION,
    CloseCode,
    close_reason,
    encode,
    encode_error,
    encode_hello,
    encode_message,
    encode_resync,
    encode_unread,
    with_counts,
)

MESSAGE_KEYS = [
    "event",
    "cursor",
    "id",
    "title",
    "content",
    "type",
    "sendUser",
    "toUser",
    "sendTime",
    "skipUrl",
    "isRead",
]


def make_row(**overrides: Any) -> dict[str, Any]:
    """
    A t_message_real_time row as asyncpg returns it (snake_case columns).
    """
    row: dict[str, Any] = {
        "id": 42,
        "title": "Hello",
        "content": "World",
        "type": "notice",
        "send_user": "alice",
        "to_user": "bob",
        "send_time": datetime(2024, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC),
        "skip_url": "/inbox/42",
        "is_read": "0",
    }
    row.update(overrides)
    return row


# --- message frames ----------------------------------------------------------


def test_encode_message_is_compact_json_in_the_documented_key_order() -> None:
    """A message frame is compact JSON with exactly the documented keys, in order."""
    text = encode_message(make_row(), "10-20")
    assert text == (
        '{"event":"message","cursor":"10-20","id":"42","title":"Hello","content":"World",'
        '"type":"notice","sendUser":"alice","toUser":"bob",'
        '"sendTime":"2024-01-02T03:04:05.678+00:00","skipUrl":"/inbox/42","isRead":"0"}'
    )
    assert list(json.loads(text)) == MESSAGE_KEYS


def test_encode_message_ignores_extra_row_columns() -> None:
    """Columns beyond the documented ones (seq, xact_id) do not leak into the frame."""
    text = encode_message(make_row(seq=7, xact_id=1234), "c")
    assert list(json.loads(text)) == MESSAGE_KEYS


def test_encode_message_keeps_non_ascii_text_raw() -> None:
    """Non-ASCII text is written as is, not as \\u escapes."""
    text = encode_message(make_row(title="通知 ✓", content="Grüße 😀"), "c")
    assert "通知 ✓" in text
    assert "Grüße 😀" in text
    assert "\\u" not in text
    assert json.loads(text)["content"] == "Grüße 😀"


def test_encode_message_writes_aware_send_time_with_milliseconds_and_offset() -> None:
    """A timestamptz becomes ISO 8601 with milliseconds and the +00:00 offset."""
    frame = json.loads(encode_message(make_row(), "c"))
    assert frame["sendTime"] == "2024-01-02T03:04:05.678+00:00"


def test_encode_message_writes_other_offsets_as_given() -> None:
    """An aware datetime in another zone keeps that zone's offset."""
    tz = timezone(timedelta(hours=8))
    frame = json.loads(
        encode_message(make_row(send_time=datetime(2024, 1, 2, 11, 4, 5, tzinfo=tz)), "c")
    )
    assert frame["sendTime"] == "2024-01-02T11:04:05.000+08:00"


def test_encode_message_writes_naive_send_time_without_offset() -> None:
    """A timestamp without time zone becomes ISO 8601 with milliseconds and no offset."""
    frame = json.loads(
        encode_message(make_row(send_time=datetime(2024, 1, 2, 3, 4, 5, 678_901)), "c")
    )
    assert frame["sendTime"] == "2024-01-02T03:04:05.678"


@pytest.mark.parametrize("is_read", ["0", "1"])
def test_encode_message_keeps_is_read_a_string(is_read: str) -> None:
    """is_read '0'/'1' is sent as the JSON string, not a number or boolean."""
    text = encode_message(make_row(is_read=is_read), "c")
    assert f'"isRead":"{is_read}"' in text
    assert json.loads(text)["isRead"] == is_read


def test_encode_message_sends_id_as_string_and_nulls_as_null() -> None:
    """A numeric id becomes a string; NULL columns become JSON null."""
    frame = json.loads(
        encode_message(make_row(id=9_007_199_254_740_993, skip_url=None, title=None), "c")
    )
    assert frame["id"] == "9007199254740993"
    assert frame["skipUrl"] is None
    assert frame["title"] is None


# --- other server frames ------------------------------------------------------


def test_encode_hello_without_recovered_omits_the_key() -> None:
    """A hello for a fresh session has event, version, user, cursor and the unread counts only."""
    text = encode_hello("bob", "5-5", None, {"comment": 2, "": 1})
    assert text == (
        f'{{"event":"hello","version":{PROTOCOL_VERSION},"user":"bob","cursor":"5-5",'
        '"unread":3,"unreadByType":{"comment":2,"":1}}'
    )
    assert "recovered" not in json.loads(text)


@pytest.mark.parametrize("recovered", [True, False])
def test_encode_hello_includes_recovered_when_given(recovered: bool) -> None:
    """recovered is present, as a JSON boolean, when the client asked to resume."""
    frame = json.loads(encode_hello("bob", "5-5", recovered, {}))
    assert frame == {
        "event": "hello",
        "version": 1,
        "user": "bob",
        "cursor": "5-5",
        "unread": 0,
        "unreadByType": {},
        "recovered": recovered,
    }
    assert list(frame) == [
        "event",
        "version",
        "user",
        "cursor",
        "unread",
        "unreadByType",
        "recovered",
    ]


def test_encode_unread_carries_the_total_and_every_category() -> None:
    """An unread event is the total and the full counts by category after the change."""
    assert json.loads(encode_unread({"comment": 3, "system": 4})) == {
        "event": "unread",
        "count": 7,
        "byType": {"comment": 3, "system": 4},
    }
    assert json.loads(encode_unread({})) == {"event": "unread", "count": 0, "byType": {}}


def test_encode_resync_carries_the_cursor() -> None:
    """A resync frame is exactly event and cursor."""
    assert encode_resync("10-20.12_10-21_3") == '{"event":"resync","cursor":"10-20.12_10-21_3"}'


def test_encode_error_without_request_id() -> None:
    """An error frame has event, code and message, and no id unless given."""
    assert (
        encode_error("invalid", "bad thing")
        == '{"event":"error","code":"invalid","message":"bad thing"}'
    )


def test_encode_error_with_request_id() -> None:
    """A request id given to encode_error is echoed as id."""
    frame = json.loads(encode_error("malformed", "no", request_id=7))
    assert frame == {"event": "error", "code": "malformed", "message": "no", "id": 7}


def test_pong_and_encode_are_compact() -> None:
    """PONG is the compact pong frame, and encode uses no spaces."""
    assert PONG == '{"event":"pong"}'
    assert encode({"a": [1, 2], "b": "é"}) == '{"a":[1,2],"b":"é"}'


# --- client frames ------------------------------------------------------------


def test_parse_ping() -> None:
    """{"action":"ping"} parses to Ping."""
    assert parse_client_frame('{"action":"ping"}') == Ping()


def test_parse_ping_ignores_extra_fields() -> None:
    """Unknown fields next to a known action are ignored."""
    assert parse_client_frame('{"action":"ping","id":3,"x":[1]}') == Ping()


def test_parse_auth_without_since() -> None:
    """An auth frame without since parses with since None."""
    assert parse_client_frame('{"action":"auth","token":"t0k"}') == Auth("t0k", None)


def test_parse_auth_with_since() -> None:
    """An auth frame with a since cursor keeps it verbatim."""
    assert parse_client_frame('{"action":"auth","token":"t0k","since":"10-20_10-21_3"}') == Auth(
        "t0k", "10-20_10-21_3"
    )


def test_parse_auth_with_null_since() -> None:
    """since: null is the same as no since."""
    assert parse_client_frame('{"action":"auth","token":"t","since":null}') == Auth("t", None)


def _error_code(data: str | bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(data)
    return info.value.code


@pytest.mark.parametrize(
    "data",
    [
        b'{"action":"ping"}',
        b"",
        "",
        "{",
        "not json",
        '{"action":"ping"',
        "[]",
        '[{"action":"ping"}]',
        "42",
        '"ping"',
        "null",
        "true",
        "{}",
        '{"action":null}',
        '{"action":1}',
        '{"action":["ping"]}',
        '{"Action":"ping"}',
        '{"action":"ping","n":' + "1" * 5000 + "}",
    ],
)
def test_parse_rejects_non_action_frames_as_malformed(data: str | bytes) -> None:
    """Binary frames, invalid JSON, non-objects and frames without a string action are 'malformed'."""
    assert _error_code(data) == "malformed"


@pytest.mark.parametrize("action", ["pong", "PING", "subscribe", ""])
def test_parse_rejects_unknown_actions(action: str) -> None:
    """A string action other than ping/auth is 'unknown_action'."""
    assert _error_code(json.dumps({"action": action})) == "unknown_action"


@pytest.mark.parametrize(
    "frame",
    [
        {"action": "auth"},
        {"action": "auth", "token": ""},
        {"action": "auth", "token": None},
        {"action": "auth", "token": 123},
        {"action": "auth", "token": ["t"]},
        {"action": "auth", "token": "t", "since": 5},
        {"action": "auth", "token": "t", "since": ["10-20"]},
        {"action": "auth", "token": "t", "since": {"c": "10-20"}},
        {"action": "auth", "token": "t", "since": True},
    ],
)
def test_parse_rejects_invalid_auth_frames(frame: dict[str, Any]) -> None:
    """auth without a non-empty string token, or with a non-string since, is 'invalid'."""
    assert _error_code(json.dumps(frame)) == "invalid"


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 100_000, "[" * 100_000 + "]" * 100_000])
def test_parse_deeply_nested_json_raises_protocol_error(text: str) -> None:
    """Deeply nested JSON is 'malformed', never a RecursionError."""
    assert _error_code(text) == "malformed"


def test_protocol_error_carries_code_and_message() -> None:
    """ProtocolError exposes the code and a fixed message for the client."""
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(b"x")
    assert info.value.code == "malformed"
    assert info.value.message == "frames must be JSON text"


# --- close codes --------------------------------------------------------------


def test_close_code_values_are_exactly_the_documented_set() -> None:
    """CloseCode holds exactly 1000,1008,1009,1011,1012,1013,4401,4408,4409,4429."""
    assert sorted(int(code) for code in CloseCode) == [
        1000,
        1008,
        1009,
        1011,
        1012,
        1013,
        4401,
        4408,
        4409,
        4429,
    ]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NORMAL", 1000),
        ("POLICY_VIOLATION", 1008),
        ("MESSAGE_TOO_BIG", 1009),
        ("INTERNAL_ERROR", 1011),
        ("SERVICE_RESTART", 1012),
        ("UNAUTHORIZED", 4401),
        ("AUTH_TIMEOUT", 4408),
        ("REPLACED", 4409),
        ("TOO_SLOW", 4429),
    ],
)
def test_close_code_names_map_to_their_values(name: str, value: int) -> None:
    """Each named close code has its documented numeric value."""
    assert CloseCode[name] == value


@pytest.mark.parametrize("code", list(CloseCode))
def test_every_close_code_has_a_short_reason(code: CloseCode) -> None:
    """close_reason gives every code a non-empty reason within the 123-byte close frame limit."""
    reason = close_reason(code)
    assert isinstance(reason, str) and reason
    assert len(reason.encode()) <= 123


def test_demo_send_is_parsed_with_its_fields_and_request_id() -> None:
    """demo_send carries to, title, content, skipUrl and the echoed id."""
    from notifyd.client_frames import DemoSend

    action = parse_client_frame(
        '{"action":"demo_send","to":"bob","title":"Hi","content":"Hello","skipUrl":"/x","id":4}'
    )
    assert action == DemoSend("bob", "Hi", "Hello", "/x", 4)
    typed = parse_client_frame('{"action":"demo_send","to":"bob","type":"private"}')
    assert typed == DemoSend("bob", None, None, None, None, "private")


@pytest.mark.parametrize(
    "frame",
    [
        '{"action":"demo_send"}',
        '{"action":"demo_send","to":""}',
        '{"action":"demo_send","to":7}',
        '{"action":"demo_send","to":"bob","content":' + '"' + "x" * 2001 + '"}',
        '{"action":"demo_send","to":"bob","title":["x"]}',
    ],
)
def test_demo_send_with_bad_fields_is_invalid(frame: str) -> None:
    """A demo_send without a valid addressee, or with oversized or mistyped fields, is invalid."""
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(frame)
    assert info.value.code == "invalid"


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 70000])
def test_text_frame_is_byte_identical_to_websockets_framing(length: int) -> None:
    """Frames built once for many sessions are exactly what websockets would write."""
    from websockets.frames import Frame, Opcode

    from notifyd.protocol import text_frame

    payload = ("é" * length).encode()[:length]
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    assert text_frame(payload) == expected


def test_with_counts_adds_the_unread_fields_to_an_encoded_message_frame() -> None:
    """A message frame with counts is the same JSON object plus unread and unreadByType."""
    message = encode_message(make_row(title="通知"), "c1").encode()
    carried = json.loads(with_counts(message, {"comment": 3, "": 1}))
    assert carried == {**json.loads(message), "unread": 4, "unreadByType": {"comment": 3, "": 1}}
    assert json.loads(with_counts(message, {}))["unread"] == 0
