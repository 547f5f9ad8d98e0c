"""The gateway's wire format, encoded once per message.

Every recipient of a message receives the same text frame `{"event": E, "payload": P}`
(`payload` is `null` when the publisher sent none), exactly as echoCTF's ws-server
sends it. The frame is built once, header included, and the same bytes object is
handed to every socket: fan-out costs no encoding per recipient.

Encoding runs once per published message, so it uses orjson (0.6 µs for a typical event
where the standard library takes 3.1). orjson refuses integers past 64 bits and nesting
past 254 levels; the standard library encodes those, so a publisher's big integer
arrives unchanged. Either way the text is compact UTF-8. NaN and the infinities are not
JSON and never get here: the publishing API refuses them in the request body.
"""
from __future__ import annotations

import json
from typing import Any

import orjson

from wsgateway.frames import text_frame

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def event_json(event: str, payload: Any) -> bytes:
    """The UTF-8 JSON text of one event. Raises UnicodeEncodeError for a lone surrogate
    and RecursionError for nesting too deep even for the standard library."""
    message = {"event": event, "payload": payload}
    try:
        return orjson.dumps(message)
    except orjson.JSONEncodeError:
        return _encoder.encode(message).encode("utf-8")


def event_frame(event: str, payload: Any) -> bytes:
    """The complete WebSocket text frame carrying one event."""
    return text_frame(event_json(event, payload))
