"""A test-only WebSocket echo server built from the gateway's own parts, for Autobahn.

Conformance needs an echo route and the product's `/ws` does not echo, so this mounts
`EchoEndpoint` (the gateway's `Connection`: same reader, writer, limits and close
handling) on `/` of the gateway's own `WebServer` and `WebHandler`. Only the limits
differ: Autobahn's section 9 sends 16 MiB messages, so the message limit and the outbox
bounds are raised for the run.

Run alone: `python -m tests.conformance.echo_server --port 9001`.
"""
from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from wsgateway.connection import Connection
from wsgateway.outbox import OutboxLimits
from wsgateway.frames import Message, encode_frame
from wsgateway.web_server import WebLimits, WebServer, WebSocketRequest

# Section 9's largest message is 16 MiB; the echo of one must fit the outbox whole.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
OUTBOX_LIMITS = OutboxLimits(max_frames=100_000, max_bytes=2 * MAX_MESSAGE_BYTES, write_timeout_s=60.0)
LIMITS = WebLimits(request_timeout_s=10.0, tls_handshake_timeout_s=10.0, max_connections=0, max_body_bytes=65536)


class EchoEndpoint:
    """A WebSocket route that echoes every message. It runs the gateway's own
    `Connection`, with the same reader, writer and limits."""

    def __init__(self, max_message_bytes: int, limits: OutboxLimits) -> None:
        self._max_message_bytes = max_message_bytes
        self._limits = limits

    @contextmanager
    def admitted(self, request: WebSocketRequest) -> Iterator[None]:
        yield None  # everyone is admitted; nothing is reserved

    def serve(self, admission: None, sock: Any, rfile: Any, remote: str) -> None:
        connection = Connection(sock, rfile, limits=self._limits, max_message_bytes=self._max_message_bytes,
                                remote=remote, on_message=_echo)
        del rfile
        connection.serve()


def _echo(connection: Connection, message: Message) -> None:
    connection.send(encode_frame(message.opcode, message.data))


def _not_found(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
    body = json.dumps({"error": "WebSocket echo only"}).encode()
    start_response("404 Not Found", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def start_echo_server(host: str = "127.0.0.1", port: int = 0,
                      max_message_bytes: int = MAX_MESSAGE_BYTES) -> WebServer:
    """Bind and serve in the background; the caller stops it with `.stop(timeout)`."""
    server = WebServer((host, port), _not_found, limits=LIMITS,
                       websocket_endpoints={"/": EchoEndpoint(max_message_bytes, OUTBOX_LIMITS)})
    server.start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    options = parser.parse_args()
    server = start_echo_server(options.host, options.port)
    print(f"echo server on ws://{options.host}:{server.server_port}/", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()
    main()
