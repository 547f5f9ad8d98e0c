"""The player WebSocket over real sockets: admission before the upgrade, the wire format,
close codes for frames we refuse, keep-alive, and slow consumers."""
from __future__ import annotations

import http.client
import json
import socket
import struct
import time
from typing import Any

import gevent
import pytest
import websocket

from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import receive_event
from tests.support.frames import RawClient, answer_pings
from tests.support.gateways import GatewayUnderTest

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
KEEPALIVE_FLAGS = ("-ping-period", "100ms", "-pong-wait", "300ms")
PONG_WAIT_S = 0.3


def connect_raw(gateway: GatewayUnderTest, token: str) -> RawClient:
    """A hand-driven client past the upgrade, once the gateway has registered it."""
    before = gateway.gateway.hub.connection_count()
    client = RawClient(gateway.host, gateway.port, f"/ws?token={token}")
    assert client.status == 101, client.pending
    wait_for(lambda: gateway.gateway.hub.connection_count() > before, what="raw connection registered")
    return client


def disconnects(gateway: GatewayUnderTest, code: int) -> float:
    return gateway.metric("ws_disconnects_total", code=str(code))


def rejected(gateway: GatewayUnderTest, reason: str) -> float:
    return gateway.metric("ws_connections_rejected_total", reason=reason)


def assert_still_admits(gateway: GatewayUnderTest, player_id: int = 99, **options: Any) -> None:
    """A valid player can connect and receive an event right after a refusal."""
    client = gateway.connect(gateway.tokens.player(player_id), **options)
    assert gateway.publish(gateway.tokens.server(), player_id, "welcome").status == 200
    assert receive_event(client) == {"event": "welcome", "payload": None}


# --- admission, before the upgrade ---------------------------------------------------------------
def test_missing_token_is_refused_401(gateway):
    """A /ws upgrade without a token is answered 401 {"error"} and counted; others still connect."""
    assert gateway.refused("") == (401, {"error": "missing token"})
    assert gateway.refused("?token=") == (401, {"error": "missing token"})
    assert rejected(gateway, "unauthorized") == 2
    assert gateway.gateway.hub.connection_count() == 0
    assert_still_admits(gateway)


@pytest.mark.parametrize("kind", ["unknown", "expired", "server", "overlong"])
def test_invalid_token_is_refused_401(gateway, tokens, kind):
    """Unknown, expired, server and impossibly long tokens are refused 401 before the upgrade."""
    token = {
        "unknown": lambda: "0" * 32,
        "expired": lambda: tokens.player(21, ttl_s=-60),
        "server": lambda: tokens.server(),
        "overlong": lambda: "a" * 33,
    }[kind]()
    assert gateway.refused(f"?token={token}") == (401, {"error": "invalid or expired token"})
    assert rejected(gateway, "unauthorized") == 1
    assert gateway.metric("ws_auth_failures_total", kind="player", reason="invalid") == 1
    assert_still_admits(gateway)


def test_origin_outside_allowed_list_is_refused_403(start_gateway):
    """With -origins, another Origin gets 403; the listed Origin and no Origin are accepted."""
    gateway = start_gateway("-origins", "https://game.example")
    token = gateway.tokens.player(21)
    status, body = gateway.refused(f"?token={token}", origin="https://evil.example")
    assert (status, body) == (403, {"error": "origin not allowed"})
    assert rejected(gateway, "origin") == 1
    gateway.connect(token, origin="https://game.example")
    gateway.connect(token, suppress_origin=True)
    assert_still_admits(gateway, origin="https://game.example")


def test_player_at_connection_limit_is_refused_429(start_gateway):
    """A player at -max-conns gets 429; other players connect, and a freed slot is usable again."""
    gateway = start_gateway("-max-conns", "2")
    token = gateway.tokens.player(21)
    first = gateway.connect(token)
    gateway.connect(token)
    assert gateway.refused(f"?token={token}") == (429, {"error": "player already has 2 connections"})
    assert rejected(gateway, "too_many_connections") == 1
    assert_still_admits(gateway)
    first.close()
    wait_for(lambda: gateway.gateway.hub.connection_count() == 2, what="first connection gone")
    gateway.connect(token)


def test_connection_limit_holds_under_concurrent_connects(start_gateway):
    """Ten simultaneous connects for one player with -max-conns 3: exactly 3 are admitted."""
    gateway = start_gateway("-max-conns", "3")
    token = gateway.tokens.player(21)

    def attempt() -> int:
        try:
            client = websocket.create_connection(f"{gateway.ws_url}?token={token}", timeout=TIMEOUT_S)
        except websocket.WebSocketBadStatusException as refusal:
            return refusal.status_code
        gateway.clients.append(client)
        return 101

    attempts = [gevent.spawn(attempt) for _ in range(10)]
    gevent.joinall(attempts, timeout=TIMEOUT_S, raise_error=True)
    assert sorted(attempt.value for attempt in attempts) == [101] * 3 + [429] * 7
    wait_for(lambda: gateway.gateway.hub.connection_count() == 3, what="3 connections registered")
    assert rejected(gateway, "too_many_connections") == 7
    for client in list(gateway.clients):
        client.close()
    wait_for(lambda: gateway.gateway.hub.connection_count() == 0, what="all connections gone")
    for _ in range(3):  # no slot was leaked by the refused upgrades
        gateway.connect(token)


def hand_made_upgrade(gateway: GatewayUnderTest, request_line: str, headers: str) -> tuple[int, dict, Any]:
    """Send an upgrade request byte for byte; return status, headers and JSON body of the answer."""
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(f"{request_line}\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"{headers}\r\n".encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
        assert response.getheader("Content-Type") == "application/json", body
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(body)


KEY = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


@pytest.mark.parametrize("version, headers, status", [
    ("HTTP/1.0", f"Sec-WebSocket-Version: 13\r\n{KEY}", 400),
    ("HTTP/1.1", KEY, 426),
    ("HTTP/1.1", f"Sec-WebSocket-Version: 12\r\n{KEY}", 426),
    ("HTTP/1.1", "Sec-WebSocket-Version: 13\r\n", 400),
], ids=["http-1.0", "no-version", "unsupported-version", "no-key"])
def test_malformed_handshake_is_refused_as_json(start_gateway, version, headers, status):
    """A malformed upgrade handshake gets a JSON {"error"} refusal and holds no connection slot."""
    gateway = start_gateway("-max-conns", "1")
    token = gateway.tokens.player(21)
    answer_status, answer_headers, body = hand_made_upgrade(gateway, f"GET /ws?token={token} {version}", headers)
    assert answer_status == status and set(body) == {"error"}, body
    if status == 426:
        assert answer_headers["sec-websocket-version"] == "13"
    gateway.connect(token)


# --- wire format -----------------------------------------------------------------------------------
def test_event_is_exactly_one_text_frame(gateway, tokens):
    """Each event reaches the client as one unmasked, unfragmented text frame {"event", "payload"}."""
    client = connect_raw(gateway, tokens.player(21))
    server = tokens.server()
    assert gateway.publish(server, 21, "score", {"points": 5, "team": "ünïcödé"}).status == 200
    assert gateway.publish(server, 21, "bare").status == 200
    for event, payload in (("score", {"points": 5, "team": "ünïcödé"}), ("bare", None)):
        fin, rsv, opcode, masked, data = client.read_frame_bits()
        assert (fin, rsv, opcode, masked) == (True, 0, OP_TEXT, False)
        message = json.loads(data.decode("utf-8"))
        assert list(message) == ["event", "payload"]
        assert message == {"event": event, "payload": payload}


def test_client_messages_are_read_and_ignored(gateway, tokens):
    """Text and binary messages from the client are consumed without effect; events keep coming."""
    client = gateway.connect(tokens.player(21))
    client.send("hello")
    client.send_binary(b"\x00\xff binary")
    client.send(json.dumps({"event": "forged", "payload": 1}))
    client.ping("after the messages")
    opcode, frame = client.recv_data_frame(True)  # pong: the reader got past the messages
    assert (opcode, frame.data) == (OP_PONG, b"after the messages")
    assert gateway.publish(tokens.server(), 21, "later").status == 200
    assert receive_event(client) == {"event": "later", "payload": None}
    assert gateway.gateway.hub.connection_count() == 1


# --- close codes ----------------------------------------------------------------------------------
def _announce_huge(client: RawClient) -> None:
    client.send_frame(OP_BINARY, b"", announced_length=2**40)  # header only, no payload follows


def _complete_too_big(client: RawClient) -> None:
    client.send_frame(OP_TEXT, b"x" * 2000)


def _fragments_too_big(client: RawClient) -> None:
    client.send_frame(OP_TEXT, b"x" * 800, fin=False)
    client.send_frame(OP_CONTINUATION, b"x" * 800)


def _invalid_utf8_then_stall(client: RawClient) -> None:
    """A text frame announcing 500 bytes of which only the first 10, with invalid UTF-8,
    are sent: the close must come without waiting for the rest."""
    mask = b"\x00\x00\x00\x00"
    client.sock.sendall(struct.pack("!BBH", 0x80 | OP_TEXT, 0x80 | 126, 500) + mask + b"ok \xc0\xaf more")


BAD_FRAMES = {
    "announced-2**40": (_announce_huge, 1009),
    "complete-over-limit": (_complete_too_big, 1009),
    "fragments-over-limit": (_fragments_too_big, 1009),
    "invalid-utf8": (lambda client: client.send_frame(OP_TEXT, b"ok \xff\xfe"), 1007),
    "unmasked": (lambda client: client.send_frame(OP_TEXT, b"hi", masked=False), 1002),
    "reserved-bits": (lambda client: client.send_frame(OP_TEXT, b"hi", rsv=0b100), 1002),
    "fragmented-ping": (lambda client: client.send_frame(OP_PING, b"p", fin=False), 1002),
    "invalid-utf8-mid-frame": (_invalid_utf8_then_stall, 1007),
    "reserved-opcode": (lambda client: client.send_frame(0x3, b"hi"), 1002),
    "oversized-ping": (lambda client: client.send_frame(OP_PING, b"p" * 126), 1002),
    "invalid-close-code": (lambda client: client.send_frame(OP_CLOSE, struct.pack("!H", 999)), 1002),
    "close-reason-not-utf8": (lambda client: client.send_frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007),
    "continuation-without-start": (lambda client: client.send_frame(OP_CONTINUATION, b"x"), 1002),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_bad_frame_closes_only_that_connection(start_gateway, case):
    """A frame we refuse closes its connection with the catalogue's code; other players are unaffected."""
    send_bad_frame, code = BAD_FRAMES[case]
    gateway = start_gateway("-max-message-size", "1KiB")
    bystander = gateway.connect(gateway.tokens.player(22))
    offender = connect_raw(gateway, gateway.tokens.player(21))
    started = time.monotonic()
    send_bad_frame(offender)
    assert offender.read_close() == code
    assert time.monotonic() - started < TIMEOUT_S / 2
    offender.close()  # as a client does once it has the server's close frame
    wait_for(lambda: disconnects(gateway, code) == 1, what=f"disconnect {code} counted")
    wait_for(lambda: not gateway.gateway.hub.is_connected("21"), what="offender removed")
    assert gateway.publish(gateway.tokens.server(), 22, "still-here").status == 200
    assert receive_event(bystander) == {"event": "still-here", "payload": None}


@pytest.mark.parametrize("close_payload, echoed, counted", [
    (struct.pack("!H", 1000), 1000, 1000),
    (struct.pack("!H", 4000) + b"bye", 4000, 4000),
    (b"", 1000, 1005),
], ids=["1000", "4000", "no-code"])
def test_client_close_is_echoed(gateway, tokens, close_payload, echoed, counted):
    """A client's close is echoed with its code (1000 when it has none) and counted by that code."""
    client = connect_raw(gateway, tokens.player(21))
    client.send_frame(OP_CLOSE, close_payload)
    assert client.read_close() == echoed
    wait_for(lambda: disconnects(gateway, counted) == 1, what=f"disconnect {counted} counted")
    assert gateway.gateway.hub.connection_count() == 0
    client.close()


def test_client_ping_gets_pong_with_same_payload(gateway, tokens):
    """A client ping is answered by a pong carrying the same payload."""
    client = connect_raw(gateway, tokens.player(21))
    for payload in (b"are you there?", b"", bytes(range(125))):
        client.send_frame(OP_PING, payload)
        assert client.read_frame() == (OP_PONG, payload)


# --- keep-alive -----------------------------------------------------------------------------------
def test_client_that_answers_pings_stays_connected(start_gateway):
    """The server pings every -ping-period; a client answering them outlives several -pong-waits."""
    gateway = start_gateway(*KEEPALIVE_FLAGS)
    client = connect_raw(gateway, gateway.tokens.player(21))
    pings = 0
    until = time.monotonic() + 4 * PONG_WAIT_S
    while time.monotonic() < until:
        opcode, payload = client.read_frame()
        assert opcode == OP_PING, f"expected a ping, got opcode {opcode}"
        client.send_frame(OP_PONG, payload)
        pings += 1
    assert pings >= 4
    assert gateway.publish(gateway.tokens.server(), 21, "alive").status == 200
    while True:
        opcode, payload = client.read_frame()
        if opcode == OP_PING:
            client.send_frame(OP_PONG, payload)
            continue
        assert (opcode, json.loads(payload)) == (OP_TEXT, {"event": "alive", "payload": None})
        break
    assert gateway.gateway.hub.connection_count() == 1


def test_silent_client_is_reaped_within_pong_wait(start_gateway):
    """A client that never answers is closed with 4001 and removed within -pong-wait plus a check or two."""
    gateway = start_gateway(*KEEPALIVE_FLAGS)
    live = connect_raw(gateway, gateway.tokens.player(22))
    keeper = gevent.spawn(answer_pings, live, [])
    silent = connect_raw(gateway, gateway.tokens.player(21))
    try:
        wait_for(lambda: not gateway.gateway.hub.is_connected("21"), PONG_WAIT_S + 1.0, what="silent client reaped")
        assert gateway.gateway.hub.is_connected("22")
        assert gateway.metric("ws_active_connections") == 1
        wait_for(lambda: disconnects(gateway, 4001) == 1, what="disconnect 4001 counted")
        assert silent.read_close() == 4001
    finally:
        keeper.kill()
        silent.close()


# --- slow consumers -------------------------------------------------------------------------------
def test_slow_consumer_is_closed_while_others_receive_everything(start_gateway):
    """A never-reading client is closed with 4000; publishes stay fast and another player gets all, in order."""
    gateway = start_gateway("-max-outbox", "50", "-max-outbox-bytes", "64KiB")
    server = gateway.tokens.server()
    slow = connect_raw(gateway, gateway.tokens.player(21))  # never reads
    fast = gateway.connect(gateway.tokens.player(22))
    received: list[int] = []

    def read_fast() -> None:
        while True:
            received.append(receive_event(fast)["payload"])

    reader = gevent.spawn(read_fast)
    big = "x" * (256 * 1024)
    sent = 0
    try:
        while gateway.gateway.hub.is_connected("21") or sent < 20:
            assert sent < 200, "the slow consumer was never closed"
            for player_id, payload in ((21, big), (22, sent)):
                started = time.monotonic()
                assert gateway.publish(server, player_id, "e", payload).status == 200
                assert time.monotonic() - started < 0.5, "a publish waited for a socket"
            sent += 1
        wait_for(lambda: len(received) == sent, what="every message for the fast player")
        assert received == list(range(sent))
    finally:
        reader.kill()
    wait_for(lambda: disconnects(gateway, 4000) == 1, what="disconnect 4000 counted")
    assert gateway.metric("ws_messages_dropped_total", reason="slow_consumer") >= 1
    assert gateway.gateway.hub.is_connected("22")
    slow.close()


def test_frames_sent_right_behind_the_upgrade_request_are_read(gateway, tokens):
    """A ping sent in the same packet as the upgrade request (read ahead by the HTTP layer) is answered."""
    token = tokens.player(21)
    ping = bytes((0x80 | OP_PING, 0x80 | 5)) + b"\0\0\0\0" + b"early"  # all-zero mask
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(f"GET /ws?token={token} HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n".encode() + ping)
        received = b""
        while b"early" not in received:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    head, frames = received.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101")
    assert frames == bytes((0x80 | OP_PONG, 5)) + b"early"
