"""wsgateway.app's request-header reader gives pywsgi exactly what the email parser would."""
from __future__ import annotations

import io

import pytest
from gevent import pywsgi
from hypothesis import given
from hypothesis import strategies as st

from wsgateway.app import _read_headers

HEADER_BLOCKS = [
    b"Host: x\r\nContent-Length: 5\r\nAuthorization: Bearer  abc \r\n\r\n",
    b"Host: x\r\nX-Folded: a\r\n  b\r\n\r\n",
    b"Host: x\r\nBad Name: v\r\n\r\n",
    b"Host:x\r\nEmpty:\r\n\r\n",
    b"Host: x\nContent-Type: a\rb\r\n\r\n",
    b"From nobody\r\nHost: x\r\n\r\n",
    b"\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\nX: \xff\r\n\r\n",
    b"NoColonLine\r\nHost: x\r\n\r\n",
    b"Host: " + b"x" * 70000 + b"\r\n\r\n",
]


def both(raw: bytes) -> tuple:
    ours = _read_headers(io.BufferedReader(io.BytesIO(raw)))
    theirs = pywsgi.headers_factory(io.BufferedReader(io.BytesIO(raw)))
    return (ours._headers, ours.status, list(ours.headers)), (theirs._headers, theirs.status, list(theirs.headers))


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
