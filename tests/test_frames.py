"""wsgateway.frames: parsing client frames (RFC 6455 rules, limits, UTF-8) and building server frames."""
from __future__ import annotations

import random
import struct

import pytest

from tests.support.frames import CLIENT_MASK as MASK
from tests.support.frames import client_frame
from wsgateway.errors import CloseCode, ProtocolViolation
from wsgateway.frames import (
    OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, Close, FrameParser, Message, Ping, Pong,
    close_frame, encode_frame, unmask,
)

LIMIT = 1000  # max_message_bytes of the parsers below


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def parse(data: bytes, limit: int = LIMIT) -> list:
    """Events from feeding `data` in one piece."""
    return FrameParser(limit).feed(data)


def violation(data: bytes, limit: int = LIMIT) -> CloseCode:
    """The close code the parser answers `data` with."""
    with pytest.raises(ProtocolViolation) as caught:
        FrameParser(limit).feed(data)
    return caught.value.code


# --- data messages ---------------------------------------------------------------------------

def test_text_message():
    """A masked text frame yields its unmasked UTF-8 bytes as a text Message."""
    assert parse(client_frame(OP_TEXT, "héllo".encode())) == [Message(OP_TEXT, "héllo".encode())]


def test_binary_message():
    """A binary frame yields a binary Message; its bytes need not be UTF-8."""
    assert parse(client_frame(OP_BINARY, b"\xff\x00\xfe")) == [Message(OP_BINARY, b"\xff\x00\xfe")]


def test_empty_message():
    """A zero-length text frame is an empty Message."""
    assert parse(client_frame(OP_TEXT)) == [Message(OP_TEXT, b"")]


def test_extended_lengths():
    """Payloads using the 16-bit and 64-bit length forms are read whole."""
    medium, large = b"m" * 300, b"l" * 70000
    assert parse(client_frame(OP_BINARY, medium)) == [Message(OP_BINARY, medium)]
    assert parse(client_frame(OP_BINARY, large), limit=70000) == [Message(OP_BINARY, large)]


def test_fragmented_message():
    """Fragments of one message are joined into a single Message with the first frame's opcode."""
    data = (client_frame(OP_TEXT, b"one ", fin=False) + client_frame(OP_CONTINUATION, b"two ", fin=False)
            + client_frame(OP_CONTINUATION, b"three"))
    assert parse(data) == [Message(OP_TEXT, b"one two three")]


def test_several_messages_in_one_read():
    """Several frames in one chunk yield all their events in order."""
    data = client_frame(OP_TEXT, b"a") + client_frame(OP_BINARY, b"b") + client_frame(OP_TEXT, b"c")
    assert parse(data) == [Message(OP_TEXT, b"a"), Message(OP_BINARY, b"b"), Message(OP_TEXT, b"c")]


def test_control_frames_interleaved_in_fragmented_message():
    """Ping and pong between fragments are reported at once; the message completes afterwards."""
    data = (client_frame(OP_TEXT, b"ab", fin=False) + client_frame(OP_PING, b"p")
            + client_frame(OP_CONTINUATION, b"cd", fin=False) + client_frame(OP_PONG, b"q")
            + client_frame(OP_CONTINUATION, b"ef"))
    assert parse(data) == [Ping(b"p"), Pong(b"q"), Message(OP_TEXT, b"abcdef")]


def test_multibyte_character_split_across_fragments():
    """A UTF-8 character split between two fragments is valid text."""
    euro = "€".encode()
    data = client_frame(OP_TEXT, b"x" + euro[:1], fin=False) + client_frame(OP_CONTINUATION, euro[1:])
    assert parse(data) == [Message(OP_TEXT, b"x" + euro)]


STREAM = (
    client_frame(OP_TEXT, "snowman ☃".encode())
    + client_frame(OP_PING, b"ping")
    + client_frame(OP_BINARY, b"\x00" * 200, fin=False)
    + client_frame(OP_PONG)
    + client_frame(OP_CONTINUATION, b"\x01" * 3)
    + client_frame(OP_TEXT, b"")
    + client_frame(OP_CLOSE, close_payload(1000, b"bye"))
)
STREAM_EVENTS = [
    Message(OP_TEXT, "snowman ☃".encode()), Ping(b"ping"), Pong(b""), Message(OP_BINARY, b"\x00" * 200 + b"\x01" * 3),
    Message(OP_TEXT, b""), Close(1000, "bye"),
]


def test_stream_in_one_piece():
    """A mixed stream of frames yields the expected events."""
    assert parse(STREAM) == STREAM_EVENTS


def test_stream_one_byte_at_a_time():
    """Feeding one byte at a time yields the same events as feeding everything at once."""
    parser = FrameParser(LIMIT)
    events = []
    for index in range(len(STREAM)):
        events += parser.feed(STREAM[index:index + 1])
    assert events == STREAM_EVENTS


def test_stream_split_at_every_boundary():
    """Splitting the stream in two at any byte yields the same events."""
    for split in range(1, len(STREAM)):
        parser = FrameParser(LIMIT)
        assert parser.feed(STREAM[:split]) + parser.feed(STREAM[split:]) == STREAM_EVENTS, f"split at {split}"


# --- control frames --------------------------------------------------------------------------

def test_ping_and_pong_events():
    """Ping and pong frames yield their payloads."""
    assert parse(client_frame(OP_PING, b"abc") + client_frame(OP_PONG, b"xyz")) == [Ping(b"abc"), Pong(b"xyz")]


def test_control_frame_of_125_bytes_allowed():
    """A control frame payload of exactly 125 bytes is allowed."""
    assert parse(client_frame(OP_PING, b"p" * 125)) == [Ping(b"p" * 125)]


def test_close_with_code_and_reason():
    """A close frame yields its code and UTF-8 reason."""
    assert parse(client_frame(OP_CLOSE, close_payload(4321, "fini ✓".encode()))) == [Close(4321, "fini ✓")]


def test_close_without_payload_is_1005():
    """An empty close frame is reported with code 1005 (no status)."""
    assert parse(client_frame(OP_CLOSE)) == [Close(CloseCode.NO_STATUS, "")]


def test_nothing_after_close_is_parsed():
    """Frames after a close frame in the same read are not reported."""
    data = client_frame(OP_CLOSE, close_payload(1000)) + client_frame(OP_TEXT, b"late")
    assert parse(data) == [Close(1000, "")]


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4000, 4999])
def test_valid_close_codes(code):
    """Registered codes in use and the 3000-4999 range are accepted from a client."""
    assert parse(client_frame(OP_CLOSE, close_payload(code))) == [Close(code, "")]


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 1100, 2000, 2999, 5000,
                                  65535])
def test_invalid_close_codes(code):
    """Reserved, unassigned and out-of-range close codes are a protocol error."""
    assert violation(client_frame(OP_CLOSE, close_payload(code))) == CloseCode.PROTOCOL_ERROR


def test_one_byte_close_payload():
    """A close payload of one byte (half a code) is a protocol error."""
    assert violation(client_frame(OP_CLOSE, b"\x03")) == CloseCode.PROTOCOL_ERROR


def test_close_reason_not_utf8():
    """A close reason that is not UTF-8 is answered with 1007."""
    assert violation(client_frame(OP_CLOSE, close_payload(1000, b"\xff\xfe"))) == CloseCode.INVALID_PAYLOAD


# --- protocol errors -------------------------------------------------------------------------

@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
def test_reserved_bits(rsv):
    """Any reserved bit (no extension is negotiated) is a protocol error."""
    assert violation(client_frame(OP_TEXT, b"x", rsv=rsv)) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_reserved_opcodes(opcode):
    """Reserved opcodes are a protocol error."""
    assert violation(client_frame(opcode, b"x")) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY, OP_PING, OP_CLOSE])
def test_unmasked_frame(opcode):
    """A client frame without a mask is a protocol error."""
    assert violation(client_frame(opcode, b"", masked=False)) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_fragmented_control_frame(opcode):
    """A control frame without FIN is a protocol error."""
    assert violation(client_frame(opcode, b"", fin=False)) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_control_frame_over_125_bytes(opcode):
    """A control frame longer than 125 bytes is a protocol error."""
    assert violation(client_frame(opcode, b"\x03\xe8" + b"r" * 124)) == CloseCode.PROTOCOL_ERROR


def test_continuation_without_message():
    """A continuation frame with no fragmented message in progress is a protocol error."""
    assert violation(client_frame(OP_CONTINUATION, b"x")) == CloseCode.PROTOCOL_ERROR


def test_continuation_after_complete_message():
    """A continuation after a message that ended with FIN is a protocol error."""
    assert violation(client_frame(OP_TEXT, b"done") + client_frame(OP_CONTINUATION, b"x")) == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_new_message_inside_fragmented_one(opcode):
    """A new text or binary frame before the fragmented message ended is a protocol error."""
    data = client_frame(OP_TEXT, b"part", fin=False) + client_frame(opcode, b"new")
    assert violation(data) == CloseCode.PROTOCOL_ERROR


def test_violation_raised_from_header_bytes_alone():
    """A bad header is refused as soon as its first two bytes arrive."""
    parser = FrameParser(LIMIT)
    with pytest.raises(ProtocolViolation):
        parser.feed(client_frame(OP_TEXT, b"x", masked=False)[:2])


# --- limits ----------------------------------------------------------------------------------

def test_message_at_limit_allowed():
    """A message of exactly max_message_bytes is accepted."""
    assert parse(client_frame(OP_BINARY, b"x" * LIMIT)) == [Message(OP_BINARY, b"x" * LIMIT)]


@pytest.mark.parametrize("announced", [LIMIT + 1, 70000, 2**40])
def test_oversize_frame_refused_from_header(announced):
    """A frame announcing more than the limit is refused with 1009 before any payload arrives."""
    header = client_frame(OP_BINARY, announced_length=announced)
    assert violation(header) == CloseCode.MESSAGE_TOO_BIG


def test_oversize_fragments_refused():
    """Fragments whose total exceeds the limit are refused with 1009 at the frame that crosses it."""
    data = client_frame(OP_TEXT, b"a" * 600, fin=False) + client_frame(OP_CONTINUATION, announced_length=401)
    assert violation(data) == CloseCode.MESSAGE_TOO_BIG


def test_fragments_up_to_limit_allowed():
    """Fragments totalling exactly the limit are accepted."""
    data = client_frame(OP_TEXT, b"a" * 600, fin=False) + client_frame(OP_CONTINUATION, b"b" * 400)
    assert parse(data) == [Message(OP_TEXT, b"a" * 600 + b"b" * 400)]


def test_control_frames_do_not_count_against_limit():
    """Pings inside a fragmented message do not count toward its size."""
    data = (client_frame(OP_BINARY, b"a" * 900, fin=False) + client_frame(OP_PING, b"p" * 125)
            + client_frame(OP_CONTINUATION, b"b" * 100))
    assert parse(data) == [Ping(b"p" * 125), Message(OP_BINARY, b"a" * 900 + b"b" * 100)]


def test_top_bit_of_64bit_length_refused():
    """A 64-bit length with its most significant bit set is a protocol error."""
    header = struct.pack("!BBQ", 0x80 | OP_BINARY, 0x80 | 127, 1 << 63) + MASK
    assert violation(header, limit=2**64) == CloseCode.PROTOCOL_ERROR


# --- UTF-8 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80"])
def test_invalid_utf8_refused_before_frame_completes(bad):
    """Invalid UTF-8 is answered with 1007 as soon as it arrives, mid-frame."""
    frame = client_frame(OP_TEXT, b"ok " + bad + b"x" * 200)
    parser = FrameParser(LIMIT)
    header_size = 2 + 2 + 4  # 16-bit length form, then the mask
    assert parser.feed(frame[:header_size + 3]) == []
    with pytest.raises(ProtocolViolation) as caught:
        parser.feed(frame[header_size + 3:header_size + 3 + len(bad)])
    assert caught.value.code == CloseCode.INVALID_PAYLOAD


def test_invalid_utf8_in_continuation():
    """Invalid UTF-8 in a later fragment of a text message is answered with 1007."""
    data = client_frame(OP_TEXT, b"fine", fin=False) + client_frame(OP_CONTINUATION, b"\xff")
    assert violation(data) == CloseCode.INVALID_PAYLOAD


def test_truncated_utf8_at_message_end():
    """A text message ending in the middle of a character is answered with 1007."""
    assert violation(client_frame(OP_TEXT, "é".encode()[:1])) == CloseCode.INVALID_PAYLOAD


def test_truncated_utf8_at_fragment_end_then_completed():
    """Only the end of the whole message counts: a fragment may end mid-character."""
    data = client_frame(OP_TEXT, b"\xc3", fin=False) + client_frame(OP_CONTINUATION, b"\xa9")
    assert parse(data) == [Message(OP_TEXT, "é".encode())]


# --- unmask ----------------------------------------------------------------------------------

def naive_unmask(data: bytes, mask: bytes, offset: int) -> bytes:
    return bytes(byte ^ mask[(offset + index) % 4] for index, byte in enumerate(data))


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4, 7])
def test_unmask_matches_naive_xor(offset):
    """unmask equals a byte-by-byte XOR for every mask offset and many lengths."""
    generator = random.Random(offset)
    for length in [0, 1, 2, 3, 4, 5, 7, 8, 9, 63, 64, 65] + [generator.randrange(1, 5000) for _ in range(20)]:
        data = generator.randbytes(length)
        mask = generator.randbytes(4)
        assert unmask(data, mask, offset) == naive_unmask(data, mask, offset), (length, offset)


# --- server frames ---------------------------------------------------------------------------

@pytest.mark.parametrize("length, header", [
    (0, b"\x81\x00"),
    (125, b"\x81\x7d"),
    (126, b"\x81\x7e\x00\x7e"),
    (65535, b"\x81\x7e\xff\xff"),
    (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
])
def test_encode_frame_length_forms(length, header):
    """encode_frame uses the 7-bit, 16-bit or 64-bit length form, unmasked, FIN set."""
    payload = b"z" * length
    assert encode_frame(OP_TEXT, payload) == header + payload


def test_close_frame_carries_code_and_reason():
    """close_frame is a close frame with the status code then the UTF-8 reason."""
    frame = close_frame(CloseCode.SLOW_CONSUMER, "too slow")
    assert frame == b"\x88" + bytes([2 + 8]) + struct.pack("!H", 4000) + b"too slow"


def test_close_frame_without_reason():
    """A close frame may carry only its code."""
    assert close_frame(1000) == b"\x88\x02\x03\xe8"


@pytest.mark.parametrize("reason", ["r" * 500, "é" * 100, "☃" * 60])
def test_close_frame_truncates_long_reason(reason):
    """A long reason is cut so the payload fits 125 bytes and stays valid UTF-8."""
    frame = close_frame(1001, reason)
    assert frame[0] == 0x88 and frame[1] == len(frame) - 2 <= 125
    assert struct.unpack("!H", frame[2:4])[0] == 1001
    kept = frame[4:].decode("utf-8")
    assert reason.startswith(kept) and len(frame[4:]) > 120


def test_events_before_a_bad_frame_are_kept():
    """A violation carries the events its read completed before the bad frame, so they are handled first."""
    data = client_frame(OP_TEXT, b"first") + client_frame(OP_PING, b"p") + client_frame(OP_TEXT, b"x", rsv=0b010)
    with pytest.raises(ProtocolViolation) as caught:
        FrameParser(LIMIT).feed(data)
    assert caught.value.code == CloseCode.PROTOCOL_ERROR
    assert caught.value.events == [Message(OP_TEXT, b"first"), Ping(b"p")]
