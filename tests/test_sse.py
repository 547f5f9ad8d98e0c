"""`GET /events` over real sockets: the text/event-stream wire format, admission exactly as /ws,
one of the player's connections (presence, -max-conns, the offline backlog), keepalive comments,
and every way a stream ends (revalidation, an operator's disconnect, shutdown, a slow reader, the
client), each counted."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import gevent
import pytest

from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import read_until_closed, receive_event, status_and_json
from tests.support.event_streams import EventStreamClient, open_stream
from tests.support.gateways import GatewayUnderTest
from wsgateway.admission import RETRY_HINT_MS
from wsgateway.errors import BrokerUnavailable
from wsgateway.event_stream import ENCODER

PROJECT = Path(__file__).resolve().parent.parent


def refused(gateway: GatewayUnderTest, query: str, headers: dict[str, str] | None = None,
            method: str = "GET") -> EventStreamClient:
    client = EventStreamClient(gateway.host, gateway.port, query, headers, method=method)
    client.close()
    return client


def sse_disconnects(gateway: GatewayUnderTest, code: int) -> float:
    return gateway.metric("ws_sse_disconnects_total", code=str(code))


def test_a_stream_is_an_event_stream_with_a_retry_hint_then_named_events(gateway, tokens):
    """200 text/event-stream, unbuffered and uncached; the retry hint, then each message as event + one-line data."""
    server = tokens.server()
    stream = open_stream(gateway, tokens.player(21))
    assert stream.headers["content-type"] == "text/event-stream"
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    assert stream.headers["connection"] == "close"
    assert "content-length" not in stream.headers and "transfer-encoding" not in stream.headers
    assert RETRY_HINT_MS[0] <= stream.retry_ms <= RETRY_HINT_MS[1]
    assert gateway.publish(server, 21, "flag_captured", {"target": "web01", "points": 100}).status == 200
    block = stream.next_block()
    assert block.fields == [("event", "flag_captured"), ("data", '{"target":"web01","points":100}')]
    assert gateway.publish(server, 21, "hint").status == 200
    assert stream.next_block().fields == [("event", "hint"), ("data", "null")]
    assert gateway.broadcast(server, "round_over", {"round": 3}).json == {"delivered": 1}
    assert (stream.next_block().fields) == [("event", "round_over"), ("data", '{"round":3}')]
    assert gateway.metric("ws_sse_active_connections") == 1 and gateway.metric("ws_active_connections") == 1


def test_payloads_arrive_as_sent_and_an_event_with_a_line_break_cannot_inject_fields(gateway, tokens):
    """Big integers, Unicode and escapes pass unchanged; an event holding CR/LF is an unnamed event with the whole frame."""
    server = tokens.server()
    stream = open_stream(gateway, tokens.player(21))
    payload = {"big": 2 ** 70, "text": "é \n \u2028 \"quoted\"", "list": [1.5, None, True]}
    assert gateway.publish(server, 21, "é vent", payload).status == 200
    block = stream.next_block()
    assert block.event == "é vent" and block.data == payload
    assert gateway.publish(server, 21, "evil\nevent: forged\ndata: 1\r", {"a": 1}).status == 200
    block = stream.next_block()
    assert block.event is None  # the browser's "message" type
    assert block.data == {"event": "evil\nevent: forged\ndata: 1\r", "payload": {"a": 1}}


def test_the_offline_backlog_comes_first_then_live_messages(gateway, tokens):
    """Messages queued while the player was offline arrive first, in order, before a live one."""
    server = tokens.server()
    for number in range(3):
        assert gateway.publish(server, 21, "queued", number).json == {"delivered": 0, "queued": True}
    stream = open_stream(gateway, tokens.player(21))
    assert gateway.publish(server, 21, "live", 3).json == {"delivered": 1, "queued": False}
    assert [(block.event, block.data) for block in (stream.next_event() for _ in range(4))] == \
        [("queued", 0), ("queued", 1), ("queued", 2), ("live", 3)]


def test_a_stream_is_one_of_the_players_connections(start_gateway):
    """With a WebSocket open, a stream is the second connection: presence says 2, both get a publish, -max-conns counts it."""
    gateway = start_gateway("-max-conns", "2")
    server, token = gateway.tokens.server(), gateway.tokens.player(21)
    socket_client = gateway.connect(token)
    stream = open_stream(gateway, token)
    presence = gateway.request("GET", "/presence?player_id=21", headers={"Authorization": f"Bearer {server}"})
    assert presence.json == {"player_id": "21", "connections": 2}
    assert gateway.publish(server, 21, "both").json == {"delivered": 2, "queued": False}
    assert receive_event(socket_client) == {"event": "both", "payload": None}
    assert stream.next_event().event == "both"
    third = refused(gateway, f"?token={token}")
    assert (third.status, third.body) == (429, {"error": "player already has 2 connections"})
    assert gateway.refused(f"?token={token}") == (429, {"error": "player already has 2 connections"})
    stream.close()
    wait_for(lambda: gateway.metric("ws_active_connections") == 1, what="the stream gone")
    assert sse_disconnects(gateway, 1000) == 1 and gateway.metric("ws_disconnects_total", code="1000") == 1
    assert gateway.metric("ws_sse_active_connections") == 0
    open_stream(gateway, token)  # its seat was given back


@pytest.mark.parametrize("query, status, error, reason", [
    ("", 401, "missing token", "unauthorized"),
    ("?token=", 401, "missing token", "unauthorized"),
    ("?token=" + "0" * 32, 401, "invalid or expired token", "unauthorized"),
])
def test_a_stream_without_a_valid_token_is_refused_as_ws_is(gateway, query, status, error, reason):
    """No token or an unknown one: 401 with the JSON error, counted as for /ws."""
    client = refused(gateway, query)
    assert (client.status, client.body) == (status, {"error": error})
    assert client.headers["content-type"] == "application/json"
    assert gateway.metric("ws_connections_rejected_total", reason=reason) == 1


def test_a_server_token_or_an_expired_one_is_refused(gateway, tokens):
    """A server token and an expired player token are both 401."""
    for token in (tokens.server(), tokens.player(21, ttl_s=-60)):
        client = refused(gateway, f"?token={token}")
        assert (client.status, client.body) == (401, {"error": "invalid or expired token"})


def test_an_origin_outside_the_list_is_refused_and_an_allowed_one_gets_cors(start_gateway):
    """With -origins another Origin is 403; the listed one is admitted with Access-Control-Allow-Origin for it."""
    gateway = start_gateway("-origins", "https://game.example")
    token = gateway.tokens.player(21)
    client = refused(gateway, f"?token={token}", {"Origin": "https://evil.example"})
    assert (client.status, client.body) == (403, {"error": "origin not allowed"})
    assert gateway.metric("ws_connections_rejected_total", reason="origin") == 1
    stream = open_stream(gateway, token, headers={"Origin": "https://game.example"})
    assert stream.headers["access-control-allow-origin"] == "https://game.example"
    assert stream.headers["vary"] == "Origin"
    assert "access-control-allow-origin" not in open_stream(gateway, token).headers  # no Origin: not a browser


def test_past_the_auth_fail_limit_a_stream_is_throttled(start_gateway):
    """Refused tokens on /events count against -auth-fail-limit with /ws's; past it even a valid token waits (429)."""
    gateway = start_gateway("-auth-fail-limit", "2")
    for _ in range(2):
        assert refused(gateway, "?token=" + "0" * 32).status == 401
    assert gateway.refused("?token=" + "1" * 32)[0] == 429
    client = refused(gateway, f"?token={gateway.tokens.player(21)}")
    assert client.status == 429 and "retry-after" in client.headers
    assert gateway.metric("ws_connections_rejected_total", reason="throttled") == 2


def test_at_max_total_conns_a_stream_is_refused_503(start_gateway):
    """-max-total-conns counts open streams, and a stream past it gets the 503 at once."""
    gateway = start_gateway("-max-total-conns", "2")
    streams = [open_stream(gateway, gateway.tokens.player(player_id)) for player_id in (21, 22)]
    client = refused(gateway, f"?token={gateway.tokens.player(23)}")
    assert client.status == 503 and client.headers["retry-after"] == "5"
    streams[0].close()
    wait_for(lambda: gateway.gateway.server.open_connections == 1, what="a place freed")
    open_stream(gateway, gateway.tokens.player(23))


def test_other_methods_are_405(gateway, tokens):
    """POST /events is refused 405 with Allow: GET, before the token is looked up."""
    client = refused(gateway, f"?token={tokens.player(21)}", method="POST")
    assert (client.status, client.headers["allow"]) == (405, "GET")
    assert gateway.gateway.hub.connection_count() == 0


def test_keepalive_comments_keep_a_silent_client_connected(start_gateway):
    """Every -ping-period a comment; a stream's client never speaks, and is never reaped for it."""
    gateway = start_gateway("-ping-period", "100ms", "-pong-wait", "300ms")
    stream = open_stream(gateway, gateway.tokens.player(21))
    comments = 0
    with gevent.Timeout(10 * TIMEOUT_S):
        while comments < 8:  # 800 ms at least: more than twice -pong-wait
            block = stream.next_block()
            assert block.fields == [] and block.comments == ["keepalive"]
            comments += 1
    assert gateway.gateway.hub.is_connected("21")
    assert gateway.metric("ws_disconnects_total", code="4001") == 0


def test_a_streams_socket_fails_bytes_unacknowledged_for_pong_wait(start_gateway):
    """The stream's socket has TCP_USER_TIMEOUT = -pong-wait: its client's TCP acknowledging is its pong."""
    gateway = start_gateway("-ping-period", "5s", "-pong-wait", "7s")
    open_stream(gateway, gateway.tokens.player(21))
    (connection,) = gateway.gateway.hub.connections()
    assert connection._socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7000


def test_a_vanished_clients_stream_ends_soon_after_pong_wait():
    """A client whose host leaves the network (in a namespace of the test's own) acknowledges nothing more: its
    stream ends with 1006 after about -pong-wait, where the kernel's own retries would take a quarter of an hour."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip for a network namespace")
    finished = subprocess.run(["unshare", "--net", sys.executable, "-m", "tests.support.vanishing_client"],
                              cwd=PROJECT, capture_output=True, text=True, timeout=60 * TIMEOUT_S)
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout.splitlines()[-1])
    assert report["codes"] == {"1006": 1, "4000": 0, "4001": 0}
    assert report["after_s"] >= report["pong_wait_s"]  # not reaped as silent: TCP decided


def test_a_revoked_token_ends_the_stream_with_gateway_close_1008(gateway, tokens):
    """Revalidation ends the stream: gateway.close {code: 1008} is its last event, then the response ends."""
    token = tokens.player(21)
    stream = open_stream(gateway, token)
    tokens.revoke(token)
    assert gateway.gateway.revalidator.run_once() == 1
    (last,) = stream.blocks_until_closed()
    assert (last.event, last.data) == ("gateway.close", {"code": 1008, "reason": "token revoked or expired"})
    wait_for(lambda: sse_disconnects(gateway, 1008) == 1, what="the stream counted")
    assert gateway.gateway.hub.connection_count() == 0


def test_an_operators_disconnect_ends_the_stream_with_4002(gateway, tokens):
    """POST /disconnect ends the player's streams, after what was queued, with gateway.close 4002."""
    server = tokens.server()
    stream = open_stream(gateway, tokens.player(21))
    bystander = open_stream(gateway, tokens.player(22))
    assert gateway.publish(server, 21, "before").status == 200
    assert gateway.post("/disconnect", {"player_id": 21}, token=server).json == {"disconnected": 1}
    blocks = stream.blocks_until_closed()
    assert [(block.event, block.data) for block in blocks] == \
        [("before", None), ("gateway.close", {"code": 4002, "reason": "disconnected by the server"})]
    wait_for(lambda: gateway.gateway.hub.connection_count() == 1, what="the stream gone")
    assert gateway.publish(server, 22, "still").status == 200
    assert bystander.next_event().event == "still"
    assert sse_disconnects(gateway, 4002) == 1


def test_shutdown_ends_every_stream_with_1001_at_once_and_refuses_newcomers(gateway, tokens):
    """Shutdown ends streams with gateway.close 1001 without waiting for any answer; a stream requested meanwhile
    gets 503 "server shutting down"."""
    streams = [open_stream(gateway, tokens.player(player_id)) for player_id in (21, 22)]
    server = gateway.gateway.server
    late = socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S)
    wait_for(lambda: len(server.idle_handlers) == 1, what="gateway waiting for a request line")
    late.sendall(f"GET /events?token={tokens.player(23)} HTTP/1.1\r\n".encode())
    wait_for(lambda: not server.idle_handlers, what="gateway reading the headers")
    stopper = gevent.spawn(gateway.gateway.shutdown, TIMEOUT_S)
    for stream in streams:
        (last,) = stream.blocks_until_closed()
        assert (last.event, last.data) == ("gateway.close", {"code": 1001, "reason": "server shutting down"})
    late.sendall(b"Host: gateway\r\n\r\n")
    status, body = status_and_json(read_until_closed(late))
    assert (status, body) == (503, {"error": "server shutting down"})
    stopper.join(TIMEOUT_S)
    assert stopper.successful()
    assert sse_disconnects(gateway, 1001) == 2
    assert gateway.metric("ws_connections_rejected_total", reason="shutting_down") == 1
    assert gateway.gateway.hub.connection_count() == 0


def test_a_slow_reader_is_cut_off_while_others_receive_everything(start_gateway):
    """A stream that never reads is closed as too slow (4000); another player's stream gets every message, in order."""
    gateway = start_gateway("-max-outbox", "50", "-max-outbox-bytes", "64KiB")
    server = gateway.tokens.server()
    slow = open_stream(gateway, gateway.tokens.player(21))  # never reads again
    fast = open_stream(gateway, gateway.tokens.player(22))
    received: list[int] = []

    def read_fast() -> None:
        while True:
            received.append(fast.next_event().data)

    reader = gevent.spawn(read_fast)
    big = "x" * (256 * 1024)
    sent = 0
    try:
        while gateway.gateway.hub.is_connected("21") or sent < 20:
            assert sent < 200, "the slow reader was never cut off"
            assert gateway.publish(server, 21, "e", big).status == 200
            assert gateway.publish(server, 22, "e", sent).status == 200
            sent += 1
        wait_for(lambda: len(received) == sent, what="every message for the fast stream")
        assert received == list(range(sent))
    finally:
        reader.kill()
        slow.close()
    assert sse_disconnects(gateway, 4000) == 1
    assert gateway.metric("ws_messages_dropped_total", reason="slow_consumer") >= 1


def test_a_broadcast_is_encoded_once_for_every_stream(gateway, tokens):
    """One message to many streams costs one event encoding, as it costs one frame for every socket."""
    server = tokens.server()
    streams = [open_stream(gateway, tokens.player(player_id)) for player_id in range(1, 6)]
    encoded = ENCODER.encoded
    assert gateway.broadcast(server, "round_over", {"round": 3}).json == {"delivered": 5}
    assert [stream.next_event().data for stream in streams] == [{"round": 3}] * 5
    assert ENCODER.encoded == encoded + 1


def test_a_broker_failing_while_the_stream_is_set_up_is_a_503_and_the_seat_comes_back(start_gateway, monkeypatch):
    """Nothing is streamed before the backlog is fetched: a broker that fails then is answered 503, counted, and
    the player's seat is free again."""
    gateway = start_gateway("-max-conns", "1")
    token = gateway.tokens.player(21)
    roster = gateway.gateway.roster
    take_seat = roster.take_seat

    def failing(seat):
        raise BrokerUnavailable("redis went away")
    monkeypatch.setattr(roster, "take_seat", failing)
    client = refused(gateway, f"?token={token}")
    assert (client.status, client.body) == (503, {"error": "broker unavailable, retry later"})
    assert client.headers["retry-after"] == "1"
    assert gateway.metric("ws_connections_rejected_total", reason="broker_unavailable") == 1
    assert gateway.gateway.hub.connection_count() == 0
    monkeypatch.setattr(roster, "take_seat", take_seat)
    open_stream(gateway, token)
