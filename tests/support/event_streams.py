"""A Server-Sent Events client over a raw socket: `GET /events`, the response head, then
the stream split into blocks as a browser's EventSource parser splits it."""
from __future__ import annotations

import json
import socket
import ssl
import time
from typing import Any

from tests.support import TIMEOUT_S, wait_for


class StreamBlock:
    """One blank-line-terminated block of a stream: its fields in order, comments apart."""

    def __init__(self, text: str) -> None:
        self.fields: list[tuple[str, str]] = []
        self.comments: list[str] = []
        for line in text.split("\n"):
            if line.startswith(":"):
                self.comments.append(line[1:].lstrip(" "))
                continue
            name, _, value = line.partition(":")
            self.fields.append((name, value[1:] if value.startswith(" ") else value))

    def get(self, name: str) -> str | None:
        values = [value for field, value in self.fields if field == name]
        return "\n".join(values) if values else None

    @property
    def event(self) -> str | None:
        return self.get("event")

    @property
    def data(self) -> Any:
        """The data field as JSON."""
        data = self.get("data")
        return None if data is None else json.loads(data)

    def __repr__(self) -> str:
        return f"StreamBlock({self.fields!r}, comments={self.comments!r})"


class EventStreamClient:
    """`GET /events?QUERY` on its own socket; `status`, `headers` (lower-case names) and
    `body` (the refusal's JSON) from the response head; then `next_block()`."""

    retry_ms: int | None = None  # the stream's retry hint, once read (open_stream reads it)

    def __init__(self, host: str, port: int, query: str, headers: dict[str, str] | None = None,
                 method: str = "GET", timeout_s: float = TIMEOUT_S, tls: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname=host)
        lines = [f"{method} /events{query} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream",
                 *(f"{name}: {value}" for name, value in (headers or {}).items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self._buffer = b""
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        status_line, *header_lines = head.split("\r\n")
        self.status = int(status_line.split(" ", 2)[1])
        self.headers = {name.lower(): value.strip() for name, _, value in
                        (line.partition(":") for line in header_lines)}
        self.body: Any = None
        if "content-length" in self.headers:
            length = int(self.headers["content-length"])
            while len(self._buffer) < length:
                self._fill()
            self.body = json.loads(self._buffer[:length])

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(f"the gateway ended the stream; unread: {self._buffer!r}")
        self._buffer += chunk

    def _read_until(self, end: bytes) -> bytes:
        while end not in self._buffer:
            self._fill()
        part, _, self._buffer = self._buffer.partition(end)
        return part

    def next_block(self) -> StreamBlock:
        """The next block (an event, the retry hint, or a keepalive comment)."""
        return StreamBlock(self._read_until(b"\n\n").decode("utf-8"))

    def next_event(self) -> StreamBlock:
        """The next block that carries data, skipping keepalive comments."""
        while True:
            block = self.next_block()
            if block.get("data") is not None:
                return block

    def blocks_until_closed(self, timeout_s: float = TIMEOUT_S) -> list[StreamBlock]:
        """Every block left until the gateway ends the stream (fails if it does not)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self._fill()
            except (EOFError, ConnectionResetError, ssl.SSLEOFError):
                break
        else:
            raise AssertionError(f"the gateway kept the stream open; got {self._buffer!r}")
        text = self._buffer.decode("utf-8")
        self._buffer = b""
        assert text.endswith("\n\n") or not text, text
        return [StreamBlock(part) for part in text[:-2].split("\n\n")] if text else []

    def close(self) -> None:
        self.sock.close()

    shutdown = close  # as GatewayUnderTest.stop hangs up its clients


def open_stream(gateway: Any, token: str, query: str = "", headers: dict[str, str] | None = None) -> EventStreamClient:
    """An admitted stream whose connection the gateway has seated, its retry hint read."""
    before = gateway.metric("ws_active_connections")
    client = EventStreamClient(gateway.host, gateway.port, f"?token={token}{query}", headers)
    assert client.status == 200, (client.status, client.body)
    gateway.clients.append(client)
    client.retry_ms = int(client.next_block().get("retry"))  # the hint leaves with the head
    wait_for(lambda: gateway.metric("ws_active_connections") > before, what="stream registered")
    return client
