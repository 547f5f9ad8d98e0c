"""wsgateway.event_stream, pure: a message's event frame becomes its text/event-stream event, exactly, once."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from wsgateway.errors import CloseCode
from wsgateway.event_stream import (ENCODING_NAME, ENCODINGS_KEPT, ENCODINGS_KEPT_BYTES, KEEPALIVE, EventEncoder,
                                    close_event, retry_hint, stream_event)
from wsgateway.frames import close_frame, text_frame
from wsgateway.history import stamp
from wsgateway.protocol import event_frame, event_json

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def parse(event: bytes) -> tuple[str | None, str]:
    """What a browser's parser makes of one block: (event type or None, data)."""
    assert event.endswith(b"\n\n")
    fields = [line.split(": ", 1) for line in event[:-2].decode("utf-8").split("\n")]
    assert all(len(field) == 2 for field in fields), fields
    names = [name for name, _ in fields]
    assert names in (["event", "data"], ["data"]), names
    return (fields[0][1] if names[0] == "event" else None), fields[-1][1]


@given(st.text(min_size=1).filter(lambda name: "\n" not in name and "\r" not in name), json_values)
def test_an_event_carries_the_name_and_the_payload_on_one_line(name, payload):
    """Any event name without a line break and any payload: event: name, data: the payload's compact JSON."""
    event, data = parse(stream_event(event_frame(name, payload)))
    assert event == name and json.loads(data) == payload


@given(st.tuples(st.text(), st.sampled_from(["\n", "\r", "\r\n"]), st.text()).map("".join), json_values)
def test_an_event_name_with_a_line_break_is_an_unnamed_event_with_the_whole_frame(name, payload):
    """A name holding CR or LF cannot be a field: no event line, and the data is {"event", "payload"}."""
    event, data = parse(stream_event(event_frame(name, payload)))
    assert event is None and json.loads(data) == {"event": name, "payload": payload}


@pytest.mark.parametrize("payload", [2 ** 70, -(2 ** 65), [[[[["deep"]]]]]])
def test_what_orjson_cannot_encode_arrives_as_sent(payload):
    """Integers past 64 bits (the standard library's encoding) pass through unparsed, digit for digit."""
    assert stream_event(event_frame("e", payload)) == b"event: e\ndata: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def test_long_frames_of_every_header_size_are_read():
    """Frames with the 7-bit, 16-bit and 64-bit length forms give the same event."""
    for size in (10, 200, 70_000):
        assert parse(stream_event(event_frame("e", "x" * size)))[1] == json.dumps("x" * size)


def test_a_frame_that_is_not_an_event_is_refused():
    """Only protocol.event_frame's frames are events: a close frame or other text is a ValueError."""
    for frame in (close_frame(1000), text_frame(b'{"payload":1,"event":"e"}'), text_frame(b"[]")):
        with pytest.raises(ValueError):
            stream_event(frame)


def test_the_fixed_parts():
    """The retry hint, the keepalive comment and the close event, byte for byte."""
    assert retry_hint(2500) == b"retry: 2500\n\n"
    assert KEEPALIVE == b": keepalive\n\n"
    assert close_event(CloseCode.POLICY_VIOLATION) == \
        b'event: gateway.close\ndata: {"code":1008,"reason":"token revoked or expired"}\n\n'


def test_the_encoder_encodes_one_frame_once_and_remembers_a_bounded_few():
    """The same frame object again costs nothing; past ENCODINGS_KEPT frames the oldest is forgotten."""
    encoder = EventEncoder()
    first = event_frame("e", 0)
    assert encoder.event(first) is encoder.event(first)
    assert encoder.encoded == 1
    for number in range(1, ENCODINGS_KEPT):
        encoder.event(event_frame("e", number))
    encoder.event(first)
    assert encoder.encoded == ENCODINGS_KEPT  # still kept
    encoder.event(event_frame("e", "newest"))
    encoder.event(first)
    assert encoder.encoded == ENCODINGS_KEPT + 2  # forgotten, encoded again


def test_the_encoder_holds_at_most_its_byte_bound():
    """Large frames push older ones out by bytes, not only by count."""
    encoder = EventEncoder()
    frames = [event_frame("e", "x" * (ENCODINGS_KEPT_BYTES // 4)) for _ in range(3)]
    for frame in frames:
        encoder.event(frame)
    assert encoder._kept_bytes <= ENCODINGS_KEPT_BYTES
    assert len(encoder._kept) == 1


def test_a_stamped_frame_gets_its_id_line_and_is_encoded_once_in_the_frame():
    """A history's frame: id:, event:, data:, the event kept in Stamped.encodings for every stream."""
    frame = stamp(event_json("score", {"points": 5}), "e1.g1.7.2", player_seq=7, broadcast_seq=2)
    encoder = EventEncoder()
    event = encoder.event(frame)
    assert event == b'id: e1.g1.7.2\nevent: score\ndata: {"points":5}\n\n'
    assert encoder.event(frame) is event and frame.encodings[ENCODING_NAME] is event
    assert encoder.encoded == 1


def test_a_stamped_frame_with_a_line_break_in_its_event_keeps_its_id():
    """The unnamed fallback still carries the id (and the data is the message without it)."""
    frame = stamp(event_json("a\nb", 1), "e1.3", player_seq=0, broadcast_seq=3)
    assert stream_event(frame) == b'id: e1.3\ndata: {"event":"a\\nb","payload":1}\n\n'
