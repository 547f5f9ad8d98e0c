"""Micro-benchmark: parse a typical /publish request head and read its body, the way the
gateway's web server does (httptools over the read buffer), and with h11 for comparison.

Run: `.venv/bin/python bench/parse_head.py` (h11 is measured only when it is installed).
Prints microseconds per request, best of 5 x 20,000.
"""
from __future__ import annotations

import io
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httptools  # noqa: E402

from wsgateway.web_server import WebHandler  # noqa: E402

BODY = b'{"player_id":"42","event":"notification","payload":{"title":"Hi","body":"You got a badge"}}'
REQUEST = (b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: echoCTF-publisher/1.0\r\n"
           b"Authorization: Bearer 0123456789abcdef0123456789abcdef\r\nContent-Type: application/json\r\n"
           b"Accept: */*\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY
ROUNDS, REPEAT = 20000, 5


class _Limits:
    request_timeout_s = tls_handshake_timeout_s = 0.0
    max_connections = 0
    max_body_bytes = 1 << 20


class _Server:
    limits = _Limits()


def gateway() -> bytes:
    """What WebHandler does per request: find the head, parse it, read the body."""
    handler = WebHandler.__new__(WebHandler)
    handler.rfile = io.BufferedReader(io.BytesIO(REQUEST))
    handler.limits = _Limits()
    handler.remote = "127.0.0.1"
    handler._parse_head(handler._read_head())  # noqa: SLF001 - the code under measurement
    return handler._read_body()  # noqa: SLF001


def with_h11() -> bytes:
    import h11
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(REQUEST)
    connection.next_event()
    return connection.next_event().data


def main() -> None:
    print(f"httptools {httptools.__version__}, the gateway's reader: "
          f"{min(timeit.repeat(gateway, number=ROUNDS, repeat=REPEAT)) / ROUNDS * 1e6:.2f} µs per request")
    try:
        import h11
    except ImportError:
        print("h11 not installed: skipped")
        return
    print(f"h11 {h11.__version__}: "
          f"{min(timeit.repeat(with_h11, number=ROUNDS, repeat=REPEAT)) / ROUNDS * 1e6:.2f} µs per request")


if __name__ == "__main__":
    main()
