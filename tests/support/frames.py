"""Raw WebSocket frames as a client would build them, and a socket-level client sending them."""
from __future__ import annotations

import socket
import struct
from typing import Any

from tests.support import TIMEOUT_S


CLIENT_MASK = b"\x37\xfa\x21\x3d"  # a fixed mask keeps hand-built frames reproducible


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, masked: bool = True,
                 announced_length: int | None = None) -> bytes:
    """A client frame as a browser sends it (masked, shortest length encoding), or bent
    the ways a hostile client would: unmasked, reserved bits, a length it does not send."""
    length = len(payload) if announced_length is None else announced_length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    if length < 126:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length < 0x10000:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    if not masked:
        return header + payload
    return header + CLIENT_MASK + bytes(byte ^ CLIENT_MASK[index % 4] for index, byte in enumerate(payload))


class RawClient:
    """A hand-driven WebSocket client for frames no well-behaved library would send."""

    def __init__(self, host: str, port: int, path: str, timeout_s: float = TIMEOUT_S) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError(f"connection closed during handshake: {response!r}")
            response += chunk
        head, self.pending = response.split(b"\r\n\r\n", 1)
        self.status = int(head.split(b" ", 2)[1])

    def send_frame(self, opcode: int, payload: bytes, **shape: Any) -> None:
        """Send one frame built by `client_frame` (same keyword arguments)."""
        self.sock.sendall(client_frame(opcode, payload, **shape))

    def read_frame_bits(self) -> tuple[bool, int, int, bool, bytes]:
        """The next server frame as (fin, rsv bits, opcode, masked, payload); raises on EOF."""
        def need(count: int) -> bytes:
            while len(self.pending) < count:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError("connection closed")
                self.pending += chunk
            data, self.pending = self.pending[:count], self.pending[count:]
            return data
        first, second = need(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", need(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", need(8))[0]
        mask = need(4) if second & 0x80 else b""
        return bool(first & 0x80), (first >> 4) & 0x7, first & 0x0F, bool(mask), need(length)

    def read_frame(self) -> tuple[int, bytes]:
        """The next server frame (opcode, payload); raises on EOF."""
        _, _, opcode, _, payload = self.read_frame_bits()
        return opcode, payload

    def read_close(self) -> int:
        """Skip frames until the server's close frame; return its code."""
        while True:
            opcode, payload = self.read_frame()
            if opcode == 0x8:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005

    def close(self) -> None:
        self.sock.close()


def answer_pings(client: RawClient, received: list[bytes]) -> None:
    """Greenlet: a live client that answers every ping and keeps the text it receives."""
    while True:
        opcode, payload = client.read_frame()
        if opcode == 0x9:  # ping
            client.send_frame(0xA, payload)  # pong
        elif opcode == 0x1:  # text
            received.append(payload)
        elif opcode == 0x8:  # close
            return
