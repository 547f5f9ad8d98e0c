"""RFC 6455 framing without sockets: client bytes in, events out; server frames built as bytes.

gevent-websocket 0.10.1 does the opening handshake well, but its frame layer has no size
limit, never sends close codes, unmasks byte by byte and validates UTF-8 only when a
message completes. This module replaces that layer for the gateway:

* a frame announcing more than the message limit is refused from its header, before a
  byte of payload is read (close 1009);
* text is validated incrementally, so invalid UTF-8 is refused as soon as it arrives
  (close 1007), even in the middle of a frame;
* unmasking works on whole chunks at C speed (one big-integer XOR);
* every violation raises `ProtocolViolation` with the close code to answer.

No extensions are negotiated, so any reserved bit is a protocol error.
"""
from __future__ import annotations

import codecs
import struct
from typing import NamedTuple, Union

from wsgateway.errors import CloseCode, ProtocolViolation

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_DATA_OPCODES = (OP_CONTINUATION, OP_TEXT, OP_BINARY)
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)
MAX_CONTROL_PAYLOAD = 125


class Message(NamedTuple):
    """A complete client data message (`opcode` is OP_TEXT or OP_BINARY)."""

    opcode: int
    data: bytes


class Ping(NamedTuple):
    payload: bytes


class Pong(NamedTuple):
    payload: bytes


class Close(NamedTuple):
    """The client's close frame; `code` is 1005 when it carried none."""

    code: int
    reason: str


Event = Union[Message, Ping, Pong, Close]

_new_utf8_decoder = codecs.getincrementaldecoder("utf-8")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One unfragmented, unmasked server frame."""
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, length))
    elif length < 0x10000:
        header = struct.pack("!BBH", 0x80 | opcode, 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, length)
    return header + payload


def text_frame(data: bytes) -> bytes:
    """A text frame carrying `data`, which must already be UTF-8."""
    return encode_frame(OP_TEXT, data)


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with a real status code (what gevent-websocket never sends)."""
    # Cut to fit 125 bytes without splitting a character: a peer refuses a non-UTF-8 reason.
    reason_bytes = reason.encode("utf-8")[: MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(OP_CLOSE, struct.pack("!H", code) + reason_bytes)


PING_FRAME = encode_frame(OP_PING, b"")


def is_valid_close_code(code: int) -> bool:
    """Codes a peer may send: the registered ones in use and the 3000-4999 private range."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1011 or 3000 <= code <= 4999


def unmask(data: bytes, mask: bytes, offset: int = 0) -> bytes:
    """XOR `data` with the 4-byte `mask`, starting `offset` bytes into the mask cycle."""
    length = len(data)
    if not length:
        return data
    if offset % 4:
        mask = mask[offset % 4:] + mask[: offset % 4]
    key = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(length, "little")


class FrameParser:
    """Incremental parser for the frames a client sends.

    Feed it whatever the socket returned; it returns the events completed so far and
    keeps partial frames. After a `Close` event, or once it has raised, it must not be
    fed again. Memory held is bounded by `max_message_bytes` plus one frame header.
    """

    __slots__ = (
        "max_message_bytes", "_buffer", "_in_payload", "_opcode", "_fin", "_mask",
        "_remaining", "_offset", "_frame_parts", "_message_opcode", "_message_parts",
        "_message_size", "_utf8",
    )

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._buffer = b""
        self._in_payload = False
        self._opcode = 0
        self._fin = False
        self._mask = b""
        self._remaining = 0
        self._offset = 0
        self._frame_parts: list[bytes] = []
        self._message_opcode = 0  # 0: no fragmented message in progress
        self._message_parts: list[bytes] = []
        self._message_size = 0
        self._utf8: codecs.IncrementalDecoder | None = None

    def feed(self, data: bytes) -> list[Event]:
        """Consume `data`; return the completed events, or raise `ProtocolViolation`
        carrying in its `events` those completed before the bad frame."""
        events: list[Event] = []
        buffer = self._buffer + data if self._buffer else data
        position = 0
        try:
            while True:
                if not self._in_payload:
                    consumed = self._read_header(buffer, position)
                    if not consumed:
                        break
                    position += consumed
                take = min(self._remaining, len(buffer) - position)
                if take:
                    self._consume_payload(buffer[position:position + take])
                    position += take
                    self._remaining -= take
                if self._remaining:
                    break
                event = self._finish_frame()
                if event is not None:
                    events.append(event)
                    if isinstance(event, Close):
                        break
        except ProtocolViolation as violation:
            violation.events = events
            raise
        self._buffer = buffer[position:]
        return events

    def _read_header(self, buffer: bytes, position: int) -> int:
        """Parse a header at `position`; return its size, or 0 when more bytes are needed."""
        available = len(buffer) - position
        if available < 2:
            return 0
        first, second = buffer[position], buffer[position + 1]
        length = second & 0x7F
        header_size = 2 + (2 if length == 126 else 8 if length == 127 else 0) + 4
        fin, opcode = bool(first & 0x80), first & 0x0F
        if first & 0x70:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "reserved bits set")
        if opcode not in _DATA_OPCODES and opcode not in _CONTROL_OPCODES:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode}")
        if not second & 0x80:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "client frame not masked")
        if opcode in _CONTROL_OPCODES:
            if not fin:
                raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
            if length > MAX_CONTROL_PAYLOAD:
                raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "control frame over 125 bytes")
        elif opcode == OP_CONTINUATION and not self._message_opcode:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "continuation without a message")
        elif opcode != OP_CONTINUATION and self._message_opcode:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "new message inside a fragmented one")
        if available < header_size:
            return 0
        if length == 126:
            length = struct.unpack_from("!H", buffer, position + 2)[0]
        elif length == 127:
            length = struct.unpack_from("!Q", buffer, position + 2)[0]
            if length >> 63:
                raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "frame length has its top bit set")
        if opcode in _DATA_OPCODES and self._message_size + length > self.max_message_bytes:
            raise ProtocolViolation(
                CloseCode.MESSAGE_TOO_BIG,
                f"message of {self._message_size + length} bytes exceeds {self.max_message_bytes}")
        self._in_payload = True
        self._fin, self._opcode = fin, opcode
        self._mask = buffer[position + header_size - 4:position + header_size]
        self._remaining, self._offset = length, 0
        if opcode in (OP_TEXT, OP_BINARY):
            self._message_opcode = opcode
            self._utf8 = _new_utf8_decoder() if opcode == OP_TEXT else None
        return header_size

    def _consume_payload(self, masked: bytes) -> None:
        chunk = unmask(masked, self._mask, self._offset)
        self._offset += len(chunk)
        if self._opcode in _CONTROL_OPCODES:
            self._frame_parts.append(chunk)
            return
        if self._utf8 is not None:
            try:
                self._utf8.decode(chunk, False)
            except UnicodeDecodeError:
                raise ProtocolViolation(CloseCode.INVALID_PAYLOAD, "invalid UTF-8 in text message") from None
        self._message_parts.append(chunk)
        self._message_size += len(chunk)

    def _finish_frame(self) -> Event | None:
        self._in_payload = False
        opcode = self._opcode
        if opcode in _CONTROL_OPCODES:
            payload = b"".join(self._frame_parts)
            self._frame_parts = []
            if opcode == OP_PING:
                return Ping(payload)
            if opcode == OP_PONG:
                return Pong(payload)
            return _parse_close(payload)
        if not self._fin:
            return None
        if self._utf8 is not None:
            try:
                self._utf8.decode(b"", True)
            except UnicodeDecodeError:
                raise ProtocolViolation(CloseCode.INVALID_PAYLOAD, "truncated UTF-8 in text message") from None
        message = Message(self._message_opcode, b"".join(self._message_parts))
        self._message_opcode, self._message_parts, self._message_size, self._utf8 = 0, [], 0, None
        return message


def _parse_close(payload: bytes) -> Close:
    if not payload:
        return Close(CloseCode.NO_STATUS, "")
    if len(payload) < 2:
        raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = struct.unpack_from("!H", payload)[0]
    if not is_valid_close_code(code):
        raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(CloseCode.INVALID_PAYLOAD, "close reason is not UTF-8") from None
    return Close(code, reason)
