"""Server-Sent Events (`GET /events`): the text/event-stream wire format, each message
encoded once. Pure: bytes in, bytes out, no sockets.

A stream opens with a reconnection hint, then carries every message of the player as one
event, and a comment as keepalive (WHATWG HTML, "Server-sent events")::

    retry: 2750                      once, first: the browser's reconnection delay (ms)

    id: k3f9.a81c.17.4               the message's id, when the gateway keeps a history
    event: flag_captured             the message's event
    data: {"target":"web01"}         its payload, compact JSON on one line (null if none)

    : keepalive                      every -ping-period

The `id:` line is the id a WebSocket frame carries as `"id"` (`wsgateway.history`): a
browser sends the last one back as `Last-Event-ID` when it reconnects, and the stream
resumes after it. Without a history there are no ids, and no `id:` line.

The gateway carries every message as its WebSocket frame (`protocol.event_frame`, or the
history's `Stamped` frame with its id): through the roster, the broker, the offline
queues and the hub, the frame is what a message is. A stream turns that frame into its
event here, once per message for all streams: a `Stamped` frame keeps its event in
`Stamped.encodings`, and a plain one (no history, or a `gateway.missed` notice) is one
frame object for all its recipients on this gateway (the hub hands the same bytes to
each), so `EventEncoder` keeps the last few plain encodings by the frame's identity. A
broadcast to 10,000 streams encodes once, like its frame. The id, event and payload come
from `history.message_parts`, which does not parse the payload again: a big integer or a
deep nesting arrives as it was sent.

An event field cannot hold a line break: a message whose event has a CR or LF is sent
as an unnamed event (the browser's `message` type) whose data is the whole frame text,
`{"event":...,"payload":...}`, so nothing is lost and nothing can be injected.

A stream that the gateway ends gets `event: gateway.close`, `data: {"code":N,"reason":"..."}`
first (the codes are the WebSocket close codes of `errors.CloseCode`): an `EventSource`
reconnects by itself after any end, and this says whether it should.
"""
from __future__ import annotations

import orjson

from wsgateway.errors import CloseCode
from wsgateway.frames import OP_TEXT
from wsgateway.history import Stamped, frame_text, message_parts

CLOSE_EVENT = "gateway.close"
KEEPALIVE = b": keepalive\n\n"
ENCODING_NAME = "sse"  # this transport's entry in `Stamped.encodings`
ENCODINGS_KEPT = 16  # plain frames' encodings remembered by identity (a broadcast paused between slices reuses one)
ENCODINGS_KEPT_BYTES = 4 << 20  # ... and at most this many frame and event bytes together
_EVENT_FRAME_START = b'{"event":'


def retry_hint(milliseconds: int) -> bytes:
    """The stream's first bytes: how long the browser waits before reconnecting."""
    return b"retry: %d\n\n" % milliseconds


def stream_event(frame: bytes) -> bytes:
    """The text/event-stream event carrying the message of one event frame."""
    if not isinstance(frame, Stamped):
        text = frame_text(frame)
        if frame[0] & 0x0F != OP_TEXT or not text.startswith(_EVENT_FRAME_START) or not text.endswith(b"}"):
            raise ValueError("not a frame of protocol.event_frame")
    try:
        event_id, event, payload = message_parts(frame)
    except ValueError:  # json.JSONDecodeError: no event string where it must be
        raise ValueError("not a frame of protocol.event_frame") from None
    id_line = b"id: " + event_id.encode("ascii") + b"\n" if event_id else b""
    if "\n" in event or "\r" in event:
        whole = _EVENT_FRAME_START + orjson.dumps(event) + b',"payload":' + payload + b"}"
        return id_line + b"data: " + whole + b"\n\n"
    return id_line + b"event: " + event.encode("utf-8") + b"\ndata: " + payload + b"\n\n"


def close_event(code: CloseCode) -> bytes:
    """The last event of a stream the gateway ends, saying why."""
    data = orjson.dumps({"code": int(code), "reason": code.reason})
    return b"event: " + CLOSE_EVENT.encode() + b"\ndata: " + data + b"\n\n"


class EventEncoder:
    """`stream_event` once per message: in the `Stamped` frame itself, or for plain frames
    the encodings of the last few, kept by the frame's identity (each kept frame is
    referenced, so its id is not reused)."""

    __slots__ = ("_kept", "_kept_bytes", "encoded")

    def __init__(self) -> None:
        self._kept: dict[int, tuple[bytes, bytes]] = {}  # id(frame) -> (frame, its event), oldest first
        self._kept_bytes = 0
        self.encoded = 0  # how many frames were encoded (the rest came from memory)

    def event(self, frame: bytes) -> bytes:
        if isinstance(frame, Stamped):
            event = frame.encodings.get(ENCODING_NAME)
            if event is None:
                event = frame.encodings[ENCODING_NAME] = stream_event(frame)
                self.encoded += 1
            return event
        kept = self._kept.get(id(frame))
        if kept is not None:
            return kept[1]
        event = stream_event(frame)
        self.encoded += 1
        kept_bytes = self._kept_bytes + len(frame) + len(event)
        while self._kept and (len(self._kept) >= ENCODINGS_KEPT or kept_bytes > ENCODINGS_KEPT_BYTES):
            oldest_frame, oldest_event = self._kept.pop(next(iter(self._kept)))
            kept_bytes -= len(oldest_frame) + len(oldest_event)
        self._kept[id(frame)] = (frame, event)
        self._kept_bytes = kept_bytes
        return event


ENCODER = EventEncoder()  # one per process, like the flusher
