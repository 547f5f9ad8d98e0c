"""wsgateway.protocol: the `{"event", "payload"}` text frame every recipient gets."""
from __future__ import annotations

import json

from wsgateway.frames import OP_TEXT
from wsgateway.protocol import event_frame, event_json


def unframe(frame: bytes) -> bytes:
    """The payload of one unmasked server text frame, checking its header."""
    assert frame[0] == 0x80 | OP_TEXT, "a single text frame with FIN set"
    length = frame[1]
    assert not length & 0x80, "server frames are not masked"
    if length == 126:
        length, start = int.from_bytes(frame[2:4], "big"), 4
    elif length == 127:
        length, start = int.from_bytes(frame[2:10], "big"), 10
    else:
        start = 2
    assert len(frame) == start + length
    return frame[start:]


def test_event_frame_is_text_frame_with_event_and_payload():
    """The frame is one text frame holding exactly {"event": E, "payload": P}."""
    payload = {"points": 5, "tags": ["a", "b"], "nested": {"ok": True}}
    assert json.loads(unframe(event_frame("score", payload))) == {"event": "score", "payload": payload}


def test_keys_are_exactly_event_and_payload():
    """The JSON object has the keys event and payload, in that order, and nothing else."""
    assert list(json.loads(unframe(event_frame("e", 1)))) == ["event", "payload"]


def test_none_payload_is_null():
    """A missing payload is sent as JSON null, as the Go server does."""
    assert unframe(event_frame("ping", None)) == b'{"event":"ping","payload":null}'


def test_non_ascii_kept_as_utf8():
    """Non-ASCII text is sent as UTF-8, not as \\u escapes."""
    data = unframe(event_frame("ünïcode", {"msg": "héllo ☃ 🎉"}))
    assert "héllo ☃ 🎉".encode() in data and b"\\u" not in data
    assert json.loads(data.decode("utf-8")) == {"event": "ünïcode", "payload": {"msg": "héllo ☃ 🎉"}}


def test_large_payload_uses_extended_length():
    """A payload too long for the 7-bit length is framed with an extended length."""
    payload = "x" * 70000
    assert json.loads(unframe(event_frame("big", payload)))["payload"] == payload


def test_frame_wraps_event_json():
    """event_frame carries exactly the bytes of event_json."""
    assert unframe(event_frame("e", [1, 2])) == event_json("e", [1, 2])



def test_what_orjson_refuses_is_encoded_unchanged_all_the_same():
    """Integers past 64 bits and nesting past 254 levels take the standard library's path."""
    big = {"score": 2**70, "debt": -(2**64)}
    assert unframe(event_frame("e", big)) == b'{"event":"e","payload":{"score":1180591620717411303424,' \
                                              b'"debt":-18446744073709551616}}'
    deep: list = []
    for _ in range(300):
        deep = [deep]
    assert json.loads(unframe(event_frame("e", deep)))["payload"] == deep
