"""wsgateway.app's request-header reader gives pywsgi exactly what the email parser would."""
from __future__ import annotations

import io
from typing import Any

import pytest
from gevent import pywsgi
from hypothesis import given
from hypothesis import strategies as st

from wsgateway.app import GatewayHandler, _read_headers

HEADER_BLOCKS = [
    b"Host: x\r\nContent-Length: 5\r\nAuthorization: Bearer  abc \r\n\r\n",
    b"Host: x\r\nX-Folded: a\r\n  b\r\n\r\n",
    b"Host: x\r\nBad Name: v\r\n\r\n",
    b"X_Under: a\r\nX-Under: b\r\nContent-Type: t\r\nX-Pad:  \xa0v\x85 \t\r\n\r\n",
    b"Host:x\r\nEmpty:\r\n\r\n",
    b"Host: x\nContent-Type: a\rb\r\n\r\n",
    b"From nobody\r\nHost: x\r\n\r\n",
    b"\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\nX: \xff\r\n\r\n",
    b"NoColonLine\r\nHost: x\r\n\r\n",
    b"Host: " + b"x" * 70000 + b"\r\n\r\n",
    b"Host: x\nX-Bare-Lf: y\n\n",
    b"Host: x\r\r\nX: y\r\n\r\n",
    b"Host: x\r\nX-Cut-Short: y\r\n",
    b"X:\t \tpadded \r\nY: a: b\r\n\r\n",
]


LOOKED_UP = ("Host", "content-length", "Content-Type", "transfer-encoding", "Connection", "upgrade", "x-folded")


def both(raw: bytes) -> tuple:
    """What pywsgi sees of a header block, through our reader and through its own: the
    lines, the lookups it makes (also of every name present), the environ's HTTP_* items,
    and what a chunked request's `del headers["content-length"]` leaves."""
    names = LOOKED_UP + tuple(line.partition(b":")[0].decode("latin-1") for line in raw.split(b"\r\n"))

    def seen(headers: Any, handler_class: type) -> tuple:
        lookups = [headers.get(name, "-") for name in names]
        handler = handler_class.__new__(handler_class)
        handler.headers = headers
        before = (headers._headers, headers.status, list(headers.headers), lookups, list(handler._headers()))
        del headers["content-length"]
        return before + (headers.get("content-length"), list(headers.headers))

    return (seen(_read_headers(io.BufferedReader(io.BytesIO(raw))), GatewayHandler),
            seen(pywsgi.headers_factory(io.BufferedReader(io.BytesIO(raw))), pywsgi.WSGIHandler))


@pytest.mark.parametrize("raw", HEADER_BLOCKS)
def test_headers_match_the_email_parser(raw):
    """Plain, folded, malformed and overlong header blocks parse exactly as pywsgi's own reader parses them."""
    ours, theirs = both(raw)
    assert ours == theirs


@given(st.lists(st.binary(max_size=40).filter(lambda line: b"\n" not in line), max_size=6))
def test_any_header_lines_match_the_email_parser(lines):
    """Whatever bytes the header lines hold, the result is the email parser's."""
    ours, theirs = both(b"".join(line + b"\r\n" for line in lines) + b"\r\n")
    assert ours == theirs
