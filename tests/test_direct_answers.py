"""Publishing requests that GatewayHandler answers itself, without the WSGI layers, get
byte for byte the answer pywsgi and the WSGI routes give: the same request sent to
`/publish` (answered directly) and to `/publish?` (a query string: the WSGI way)."""
from __future__ import annotations

import re
import socket

import pytest

from tests.helpers import TIMEOUT_S
from wsgateway.app import GatewayHandler

DATE = re.compile(rb"\r\nDate: [^\r]+\r\n")


def exchange(gateway, request: bytes, then_closed: bool = False) -> bytes:
    """Send one request on a new connection; its complete response, the Date value masked.
    `then_closed`: also check that the gateway hangs up after it."""
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(request)
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {response!r}"
            response += chunk
        head, _, body = response.partition(b"\r\n\r\n")
        length = int(re.search(rb"\r\nContent-Length: (\d+)", head).group(1))
        while len(body) < length:
            body += sock.recv(65536)
        if then_closed:
            assert sock.recv(65536) == b"", "the connection stayed open"
    return DATE.sub(b"\r\nDate: -\r\n", head) + b"\r\n\r\n" + body


def request(path: str, body: bytes, *headers: str, length: int | None = None) -> bytes:
    lines = "".join(f"{header}\r\n" for header in headers)
    return (f"POST {path} HTTP/1.1\r\nHost: gateway\r\n{lines}Content-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode() + body


@pytest.fixture
def direct_answers(monkeypatch):
    """The paths of the requests GatewayHandler answered directly, in order."""
    answered = []
    original = GatewayHandler._answer_directly

    def counted(handler):
        answered.append(handler.path)
        return original(handler)
    monkeypatch.setattr(GatewayHandler, "_answer_directly", counted)
    return answered


CASES = {
    "published": ("/publish", b'{"player_id": 7, "event": "e", "payload": {"n": 1}}', ()),
    "broadcast": ("/broadcast", b'{"event": "e"}', ()),
    "batch": ("/publish/batch", b'{"messages": [{"player_id": 7, "event": "e"}, {"player_id": 8, "event": "f"}]}', ()),
    "no token": ("/publish", b"{}", ("Authorization:",)),
    "unknown token": ("/publish", b"{}", ("Authorization: Bearer unknown",)),
    "bad json": ("/publish", b"{nope", ()),
    "bad item": ("/publish/batch", b'{"messages": [{"event": "e"}]}', ()),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_direct_answer_is_the_wsgi_answer(gateway, server_token, direct_answers, case):
    """Status line, headers in order, and body match for successes and refusals."""
    path, body, headers = CASES[case]
    headers = headers or (f"Authorization: Bearer {server_token}",)
    direct = exchange(gateway, request(path, body, *headers))
    through_wsgi = exchange(gateway, request(f"{path}?", body, *headers))
    assert direct_answers == [path]
    assert direct == through_wsgi


def test_idempotent_replays_match(gateway, server_token, direct_answers):
    """A replay's extra header comes in the same place on both ways."""
    body = b'{"player_id": 7, "event": "e"}'
    answers = []
    for path, key in (("/publish", "k1"), ("/publish?", "k2")):
        headers = (f"Authorization: Bearer {server_token}", f"Idempotency-Key: {key}")
        exchange(gateway, request(path, body, *headers))
        answers.append(exchange(gateway, request(path, body, *headers)))
    assert b"\r\nIdempotent-Replayed: true\r\n" in answers[0]
    assert answers[0] == answers[1]
    assert direct_answers == ["/publish", "/publish"]


def test_body_over_the_limit_is_refused_alike_and_hung_up(start_gateway, direct_answers):
    """A declared body over -max-body gets the same 413 both ways, and the connection ends."""
    gateway = start_gateway("-max-body", "100")
    server_token = gateway.tokens.server()
    answers = [exchange(gateway, request(path, b"", f"Authorization: Bearer {server_token}", length=10**9),
                        then_closed=True)
               for path in ("/publish", "/publish?")]
    assert answers[0].startswith(b"HTTP/1.1 413 ")
    assert answers[0] == answers[1]
    assert direct_answers == ["/publish"]


def test_repeated_header_takes_the_wsgi_way(gateway, server_token, direct_answers):
    """pywsgi joins a repeated header's values ("Bearer x,Bearer y"), so such a request is
    not answered directly, and its token is refused as pywsgi's environ has it."""
    headers = ("Authorization: Bearer unknown", f"Authorization: Bearer {server_token}")
    answer = exchange(gateway, request("/publish", b'{"player_id": 7, "event": "e"}', *headers))
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert direct_answers == []
