"""The gateway's wire format, encoded once per message.

Every recipient of a message receives the same text frame `{"event": E, "payload": P}`
(`payload` is `null` when the publisher sent none), exactly as echoCTF's ws-server
sends it. The frame is built once, header included, and the same bytes object is
handed to every socket: fan-out costs no encoding per recipient.
"""
from __future__ import annotations

import json
from typing import Any

from wsgateway.frames import text_frame

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def event_json(event: str, payload: Any) -> bytes:
    """The UTF-8 JSON text of one event."""
    return _encoder.encode({"event": event, "payload": payload}).encode("utf-8")


def event_frame(event: str, payload: Any) -> bytes:
    """The complete WebSocket text frame carrying one event."""
    return text_frame(event_json(event, payload))
