"""Hostile input, generated: whatever bytes arrive as a /publish or /broadcast body, header
or query string, or as a /ws upgrade, the answer is 200 or a documented 4xx with a JSON
error, never a 500, a traceback or a hung request, and the gateway stays healthy.

Examples are derandomized (the same on every run) and counted by the "ws-gateway"
hypothesis profile in conftest.py (`WS_GATEWAY_HYPOTHESIS_EXAMPLES` raises the count).
"""
from __future__ import annotations

import http.client
import json
import socket
from typing import Any, Iterator

import gevent
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import TIMEOUT_S
from tests.support.gateways import GatewayUnderTest

DOCUMENTED = {200, 400, 401, 403, 404, 405, 408, 413, 414, 426, 429, 431, 503}  # README, "Errors"
MAX_BODY = 2048
shared_gateway = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # one gateway, many examples


@pytest.fixture
def target(start_gateway, monkeypatch) -> Iterator[tuple[GatewayUnderTest, str]]:
    """A gateway with a small -max-body and no rate limit, a server token, and a check,
    after the test, that it logged no error, saw no greenlet crash and still answers."""
    gateway = start_gateway("-max-body", str(MAX_BODY), "-rate-limit", "0", "-header-timeout", "2s")
    gateway.connect(gateway.tokens.player(21))
    crashes: list[Any] = []
    hub = gevent.get_hub()
    original = hub.handle_error

    def record(context: Any, kind: type, value: BaseException, tb: Any) -> None:
        if not issubclass(kind, (gevent.GreenletExit, KeyboardInterrupt, SystemExit)):
            crashes.append((kind, value))
        original(context, kind, value, tb)

    monkeypatch.setattr(hub, "handle_error", record)
    yield gateway, gateway.tokens.server()
    assert crashes == []
    for sample in gateway.gateway.metrics.http_requests.collect()[0].samples:
        assert not sample.labels["status"].startswith("5") or sample.labels["status"] == "503", sample
    assert gateway.get("/healthz").status == 200
    assert gateway.get("/readyz").status == 200


def exchange(gateway: GatewayUnderTest, request: bytes, *, half_close: bool = False) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, return the response; fail if none comes within the suite's timeout."""
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
        except socket.timeout:
            raise AssertionError(f"no answer within {TIMEOUT_S}s to {request[:200]!r}") from None
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def assert_well_answered(status: int, headers: dict[str, str], body: bytes) -> Any:
    """200, or a documented refusal carrying `{"error": "..."}`; returns the decoded body."""
    assert status in DOCUMENTED, (status, body)
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body)
    decoded = json.loads(body)
    if status != 200:
        assert set(decoded) == {"error"} and isinstance(decoded["error"], str) and decoded["error"], decoded
    assert b"Traceback" not in body
    return decoded


def post(path: str, body: bytes, headers: list[tuple[str, str]], query: str = "") -> bytes:
    lines = [f"POST {path}{'?' + query if query else ''} HTTP/1.1", "Host: gateway", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if not any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --- strategies -------------------------------------------------------------------------------------
json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
player_ids = json_values | st.integers(0, 10**6) | st.text(min_size=1, max_size=80) | st.just(21) | st.just("21")
events = json_values | st.text(min_size=1, max_size=30)


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    """A JSON object shaped like a publish, with any field missing, mistyped or extra."""
    body: dict[str, Any] = {}
    if draw(st.booleans()):
        body["player_id"] = draw(player_ids)
    if draw(st.booleans()) or not body:
        body["event"] = draw(events)
    if draw(st.booleans()):
        body["payload"] = draw(json_values)
    body.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
    text = json.dumps(body, allow_nan=True)  # NaN and Infinity on purpose: not JSON
    return text.encode("utf-8", "surrogatepass")


@st.composite
def mangled(draw: st.DrawFn, source: st.SearchStrategy[bytes]) -> bytes:
    """Valid-looking bytes with a few bytes cut, repeated or replaced."""
    data = bytearray(draw(source))
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["cut", "flip", "repeat"]))
        if action == "cut":
            del data[at:at + draw(st.integers(1, 8))]
        elif action == "flip":
            data[at] = draw(st.integers(0, 255))
        else:
            data[at:at] = data[at:at + draw(st.integers(1, 200))] * draw(st.integers(1, 30))
    return bytes(data)


bodies = json_bodies() | mangled(json_bodies()) | st.binary(max_size=MAX_BODY + 100) | st.text(max_size=300).map(
    lambda text: text.encode("utf-8", "surrogatepass"))
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60)
paths = st.sampled_from(["/publish", "/broadcast"])


# --- the properties -------------------------------------------------------------------------------------
@shared_gateway
@given(path=paths, body=bodies)
def test_any_body_is_answered_200_or_documented_4xx(target, path, body):
    """Any body, JSON-shaped, mangled or random bytes: 200 or a documented 4xx with a JSON error."""
    gateway, token = target
    status, headers, answer = exchange(gateway, post(path, body, [("Authorization", f"Bearer {token}")]))
    decoded = assert_well_answered(status, headers, answer)
    assert status in (200, 400, 413), (status, decoded)
    if status == 200:
        assert set(decoded) == ({"delivered", "queued"} if path == "/publish" else {"delivered"})


@shared_gateway
@given(path=paths, body=json_bodies(),
       authorization=st.none() | header_text | header_text.map(lambda text: "Bearer " + text)
       | st.sampled_from(["Bearer", "bearer  TOKEN", "Basic dXNlcjpwYXNz", "Bearer TOKEN extra"]),
       extra=st.lists(st.tuples(st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True), header_text),
                      max_size=4),
       content_type=st.none() | header_text)
def test_any_headers_are_answered_200_or_documented_4xx(target, path, body, authorization, extra, content_type):
    """Any Authorization, Content-Type and extra headers: 200 or a documented 4xx, never a 500."""
    gateway, token = target
    headers = [(name, value) for name, value in extra
               if name.lower() not in ("content-length", "transfer-encoding", "host", "connection", "expect")]
    if authorization is not None:
        headers.append(("Authorization", authorization.replace("TOKEN", token)))
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    assert_well_answered(*exchange(gateway, post(path, body, headers)))


@shared_gateway
@given(path=paths | st.sampled_from(["/ws", "/metrics", "/healthz", "/readyz", "/", "/publish/", "//publish"]),
       query=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=200)
       | st.text(max_size=50).map(lambda text: text.encode("utf-8", "surrogatepass").decode("latin-1")
                                  .replace(" ", "+").replace("\r", "").replace("\n", "").replace("\t", "")))
def test_any_query_string_is_answered_200_or_documented_4xx(target, path, query):
    """Any query string on any endpoint, as a POST, a GET or a /ws upgrade: a documented answer."""
    gateway, token = target
    query = query.replace("TOKEN", token)
    assert_well_answered(*exchange(gateway, post(path, b'{"event": "e"}', [("Authorization", f"Bearer {token}")],
                                                 query)))
    upgrade = (f"GET {path}?{query} HTTP/1.1\r\nHost: gateway\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode("latin-1")
    status, headers, body = exchange(gateway, upgrade) if path != "/ws" or "token=" not in query else (
        _upgrade_status(gateway, upgrade))
    if status != 101:
        assert_well_answered(status, headers, body)


def _upgrade_status(gateway: GatewayUnderTest, upgrade: bytes) -> tuple[int, dict[str, str], bytes]:
    """Like `exchange`, but a 101 (an accidentally valid token) is hung up at once."""
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(upgrade)
        response = http.client.HTTPResponse(sock)
        response.begin()
        if response.status == 101:
            return 101, {}, b""
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


@shared_gateway
@given(path=paths, body=json_bodies(), declared=st.integers(0, 3 * MAX_BODY),
       chunked=st.booleans(), chunk_garbage=st.binary(max_size=20))
def test_lying_lengths_and_broken_chunking_are_answered(target, path, body, declared, chunked, chunk_garbage):
    """A Content-Length that lies, or broken chunked encoding, then EOF: a documented answer, never a hang."""
    gateway, token = target
    if chunked:
        framing = [("Transfer-Encoding", "chunked")]
        payload = f"{len(body):x}\r\n".encode() + body + b"\r\n" + chunk_garbage
    else:
        framing = [("Content-Length", str(declared))]
        payload = body
    request = post(path, payload, [("Authorization", f"Bearer {token}"), *framing])
    try:
        status, headers, answer = exchange(gateway, request, half_close=True)
    except (ConnectionResetError, http.client.RemoteDisconnected):
        return  # the gateway hung up on a request it could not frame: also a definite end
    assert_well_answered(status, headers, answer)
