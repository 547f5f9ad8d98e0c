"""What a real WebSocket or raw-socket client reads back from the gateway."""
from __future__ import annotations

import json
import re
import socket
import struct
import time
from typing import Any

import websocket

from tests.support import TIMEOUT_S


def receive_event(client: websocket.WebSocket) -> Any:
    """The next event a client receives, decoded."""
    return json.loads(client.recv())


def receive_close(client: websocket.WebSocket) -> tuple[int, str]:
    """Read until the server's close frame; return its code and reason."""
    while True:
        opcode, frame = client.recv_data_frame(True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            data = frame.data
            if len(data) < 2:
                return 1005, ""
            return struct.unpack("!H", data[:2])[0], data[2:].decode("utf-8")


def read_until_closed(sock: socket.socket, timeout_s: float = TIMEOUT_S) -> bytes:
    """Everything the gateway sends until it hangs up (a reset ends it too); fails if it has
    not hung up within `timeout_s`."""
    sock.settimeout(timeout_s)
    received = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the gateway kept the connection open; got {received!r}")


def status_and_json(response: bytes) -> tuple[int, dict]:
    """The status and JSON body of one raw HTTP response."""
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def answers_in(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """The (status, head, body) of each raw HTTP response in `data`, in order."""
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)\r\ncontent-length: (\d+)", head).group(1))
        answers.append((int(head.split(b" ", 2)[1]), head, rest[:length]))
        data = rest[length:]
    return answers
