"""The HTTP publishing surface of a real gateway: /publish, /broadcast, the offline queue,
rate limiting, metrics and the small endpoints, driven over real sockets."""
from __future__ import annotations

import http.client
import json
import socket
import sys
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import receive_event
from tests.support.frames import RawClient
from tests.support.gateways import GatewayUnderTest, Reply

PLAYER = 21




def assert_next_is_marker(gateway: GatewayUnderTest, server_token: str, *clients: Any) -> None:
    """Publish a marker to player 21 and check it is the next thing every client receives."""
    reply = gateway.publish(server_token, PLAYER, "marker", {"n": 1})
    assert reply.status == 200, reply.body
    for client in clients:
        assert receive_event(client) == {"event": "marker", "payload": {"n": 1}}


def assert_nothing_happened(gateway: GatewayUnderTest) -> None:
    """No message was published, delivered or queued."""
    assert gateway.metric("ws_messages_published_total") == 0
    assert gateway.metric("ws_messages_delivered_total") == 0
    assert gateway.metric("ws_messages_queued_total") == 0
    assert len(gateway.gateway.offline) == 0


def error_of(reply: Reply) -> str:
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    body = reply.json
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


def scrape(gateway: GatewayUnderTest) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, parsed: (sample name, sorted labels) -> value."""
    reply = gateway.get("/metrics")
    assert reply.status == 200
    samples = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# --- authentication -------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/publish", "/broadcast"])
@pytest.mark.parametrize("authorization", [None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "Token abc"])
def test_missing_or_non_bearer_authorization_is_401(gateway, path, authorization):
    """Without an `Authorization: Bearer <token>` header the answer is 401 JSON with WWW-Authenticate."""
    headers = {} if authorization is None else {"Authorization": authorization}
    reply = gateway.post(path, {"player_id": PLAYER, "event": "e"}, headers=headers)
    assert reply.status == 401
    assert "token" in error_of(reply)
    assert reply.headers["www-authenticate"] == "Bearer"
    assert_nothing_happened(gateway)


@pytest.mark.parametrize("path", ["/publish", "/broadcast"])
@pytest.mark.parametrize("kind", ["unknown", "expired", "player"])
def test_unknown_expired_or_player_token_is_403(gateway, tokens, path, kind):
    """A bearer token that is unknown, expired or a player's token is refused with 403 JSON."""
    token = {"unknown": lambda: "no-such-token",
             "expired": lambda: tokens.server(ttl_s=-60),
             "player": lambda: tokens.player(PLAYER)}[kind]()
    reply = gateway.post(path, {"player_id": PLAYER, "event": "e"}, token=token)
    assert reply.status == 403
    assert "token" in error_of(reply)
    assert gateway.metric("ws_auth_failures_total", kind="server", reason="invalid") == 1
    assert_nothing_happened(gateway)


@pytest.mark.parametrize("path", ["/publish", "/broadcast"])
def test_server_token_is_accepted(gateway, tokens, listener, path):
    """A valid server token in `Authorization: Bearer` is accepted (also with a lower-case scheme)."""
    server = tokens.server()
    for scheme in ("Bearer", "bearer"):
        reply = gateway.post(path, {"player_id": PLAYER, "event": "hi"}, headers={"Authorization": f"{scheme} {server}"})
        assert reply.status == 200, reply.body
        assert receive_event(listener) == {"event": "hi", "payload": None}


# --- body validation --------------------------------------------------------------------------
DEEP = b"[" * 100_000
BAD_BODIES = [
    # (id, paths, raw body, words the error must contain)
    ("empty", b"", "json"),
    ("invalid-json", b'{"player_id": 21, "event": ', "json"),
    ("trailing-garbage", b'{"player_id": 21, "event": "e"} x', "json"),
    ("invalid-utf8", b'{"player_id": 21, "event": "\xff\xfe"}', "utf-8"),
    ("array", b'[{"player_id": 21, "event": "e"}]', "object"),
    ("string", b'"hello"', "object"),
    ("number", b"21", "object"),
    ("null", b"null", "object"),
    ("nan", b'{"player_id": 21, "event": "e", "payload": NaN}', "nan"),
    ("infinity", b'{"player_id": 21, "event": "e", "payload": Infinity}', "infinity"),
    ("minus-infinity", b'{"player_id": 21, "event": "e", "payload": -Infinity}', "infinity"),
    ("overflow", b'{"player_id": 21, "event": "e", "payload": 1e999}', "range"),
    ("deep-nesting", DEEP, "nested"),
    ("deep-nesting-in-payload", b'{"player_id": 21, "event": "e", "payload": ' + DEEP + b"}", "nested"),
    ("event-missing", b'{"player_id": 21}', "event"),
    ("event-empty", b'{"player_id": 21, "event": ""}', "event"),
    ("event-null", b'{"player_id": 21, "event": null}', "event"),
    ("event-number", b'{"player_id": 21, "event": 5}', "event"),
    ("event-object", b'{"player_id": 21, "event": {"a": 1}}', "event"),
    ("invalid-utf8-surrogate-bytes", b'{"player_id": 21, "event": "e", "payload": "\xed\xa0\x80"}', "unicode"),
    ("event-lone-surrogate", b'{"player_id": 21, "event": "\\ud800"}', "unicode"),
    ("payload-lone-surrogate", b'{"player_id": 21, "event": "e", "payload": "a\\udfffb"}', "unicode"),
    ("player-id-empty", b'{"player_id": "", "event": "e"}', "player_id"),
    ("player-id-negative", b'{"player_id": -1, "event": "e"}', "player_id"),
    ("player-id-true", b'{"player_id": true, "event": "e"}', "player_id"),
    ("player-id-false", b'{"player_id": false, "event": "e"}', "player_id"),
    ("player-id-float", b'{"player_id": 21.0, "event": "e"}', "player_id"),
    ("player-id-object", b'{"player_id": {"id": 21}, "event": "e"}', "player_id"),
    ("player-id-array", b'{"player_id": [21], "event": "e"}', "player_id"),
    ("player-id-65-chars", b'{"player_id": "' + b"p" * 65 + b'", "event": "e"}', "player_id"),
    ("player-id-65-digits", b'{"player_id": 1' + b"0" * 64 + b', "event": "e"}', "player_id"),
]


@pytest.mark.parametrize("path", ["/publish", "/broadcast"])
@pytest.mark.parametrize("raw, words", [case[1:] for case in BAD_BODIES], ids=[case[0] for case in BAD_BODIES])
def test_invalid_body_is_400_and_changes_nothing(gateway, tokens, listener, server_token, path, raw, words):
    """An invalid body gets 400 naming the problem, nothing is delivered or queued, and the gateway goes on."""
    reply = gateway.post(path, raw=raw, token=server_token)
    assert reply.status == 400, reply.body
    assert words in error_of(reply).lower()
    assert_nothing_happened(gateway)
    assert_next_is_marker(gateway, server_token, listener)


def test_payload_nested_near_the_parser_limit_is_never_500(gateway, server_token):
    """Payloads nested right around the JSON parser's depth limit are accepted or refused with 400, never 500."""
    statuses = set()
    limit = sys.getrecursionlimit()
    for depth in range(limit - 150, limit + 50, 5):
        raw = b'{"player_id": 5, "event": "e", "payload": ' + b"[" * depth + b"]" * depth + b"}"
        reply = gateway.post("/publish", raw=raw, token=server_token)
        statuses.add(reply.status)
        assert reply.status in (200, 400), (depth, reply.body)
    assert statuses == {200, 400}


def test_publish_without_player_id_is_400(gateway, listener, server_token):
    """/publish needs a player_id: without one (or with null) it is 400 and nothing is delivered."""
    for body in ({"event": "e"}, {"event": "e", "player_id": None}):
        reply = gateway.post("/publish", body, token=server_token)
        assert reply.status == 400
        assert "player_id" in error_of(reply)
    assert_nothing_happened(gateway)
    assert_next_is_marker(gateway, server_token, listener)


def test_player_id_of_64_chars_is_accepted(gateway, server_token):
    """A player_id of exactly 64 characters is valid (queued for that offline player)."""
    reply = gateway.publish(server_token, "p" * 64)
    assert reply.status == 200, reply.body
    assert reply.json == {"delivered": 0, "queued": True}


def test_player_id_as_string_or_integer_reaches_the_same_player(gateway, listener, server_token):
    """player_id "21" and 21 both reach player 21."""
    for player_id in ("21", 21):
        reply = gateway.publish(server_token, player_id, "hello", player_id)
        assert reply.json == {"delivered": 1, "queued": False}
        assert receive_event(listener) == {"event": "hello", "payload": player_id}
    reply = gateway.broadcast(server_token, "to-one", player_id="21")
    assert reply.json == {"delivered": 1}
    assert receive_event(listener) == {"event": "to-one", "payload": None}


def test_body_over_max_body_is_413(start_gateway):
    """A body larger than -max-body is refused with 413 JSON; one at the limit is accepted."""
    gateway = start_gateway("-max-body", "1KiB")
    server = gateway.tokens.server()
    client = gateway.connect(gateway.tokens.player(PLAYER))
    for path in ("/publish", "/broadcast"):
        too_big = json.dumps({"player_id": PLAYER, "event": "e", "payload": "x" * 1100}).encode()
        reply = gateway.post(path, raw=too_big, token=server)
        assert reply.status == 413
        assert "1024" in error_of(reply)
    assert_nothing_happened(gateway)
    assert gateway.post("/publish", raw=body_of_size(1024, "at-limit"), token=server).status == 200
    assert receive_event(client)["event"] == "at-limit"
    assert_next_is_marker(gateway, server, client)


def post_chunked(gateway: GatewayUnderTest, path: str, chunks: list[bytes], token: str) -> Reply:
    """POST with `Transfer-Encoding: chunked` and no Content-Length."""
    connection = http.client.HTTPConnection(gateway.host, gateway.port, timeout=TIMEOUT_S)
    try:
        connection.request("POST", path, body=iter(chunks), encode_chunked=True,
                           headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def body_of_size(size: int, event: str = "e") -> bytes:
    """A valid publish body for player 21 of exactly `size` bytes."""
    body = {"player_id": PLAYER, "event": event, "payload": ""}
    body["payload"] = "x" * (size - len(json.dumps(body)))
    raw = json.dumps(body).encode()
    assert len(raw) == size
    return raw


def test_chunked_body_is_read_and_limited(start_gateway):
    """A chunked body without Content-Length is accepted up to -max-body and refused with 413 past it."""
    gateway = start_gateway("-max-body", "1KiB")
    server = gateway.tokens.server()
    client = gateway.connect(gateway.tokens.player(PLAYER))
    small = json.dumps({"player_id": PLAYER, "event": "chunked", "payload": 1}).encode()
    reply = post_chunked(gateway, "/publish", [small[:10], small[10:]], server)
    assert reply.status == 200, reply.body
    assert receive_event(client) == {"event": "chunked", "payload": 1}
    at_limit = body_of_size(1024, "at-limit")
    assert post_chunked(gateway, "/publish", [at_limit[:500], at_limit[500:]], server).status == 200
    assert receive_event(client)["event"] == "at-limit"
    for size in (1025, 3000):
        big = body_of_size(size)
        reply = post_chunked(gateway, "/publish", [big[i:i + 500] for i in range(0, len(big), 500)], server)
        assert reply.status == 413, reply.body
        assert "1024" in error_of(reply)
    assert gateway.metric("ws_messages_published_total") == 2
    assert_next_is_marker(gateway, server, client)


def test_chunked_body_over_limit_is_not_cut_to_a_valid_prefix(start_gateway):
    """A chunked body whose first -max-body bytes are valid JSON but which goes on is 413, not published."""
    gateway = start_gateway("-max-body", "1KiB")
    server = gateway.tokens.server()
    client = gateway.connect(gateway.tokens.player(PLAYER))
    prefix = json.dumps({"player_id": PLAYER, "event": "truncated"}).encode()
    chunks = [prefix + b" " * (1024 - len(prefix)), b"garbage that makes the whole body invalid"]
    for path in ("/publish", "/broadcast"):
        reply = post_chunked(gateway, path, chunks, server)
        assert reply.status == 413, reply.body
    assert_nothing_happened(gateway)
    assert_next_is_marker(gateway, server, client)


def test_content_length_one_byte_over_limit_is_413(start_gateway):
    """A body with Content-Length one byte above -max-body is refused with 413."""
    gateway = start_gateway("-max-body", "1KiB")
    server = gateway.tokens.server()
    reply = gateway.post("/publish", raw=body_of_size(1025), token=server)
    assert reply.status == 413
    assert_nothing_happened(gateway)


# --- payload and response shapes ------------------------------------------------------------
def test_payload_is_optional_and_null_on_the_wire(gateway, listener, server_token):
    """Without a payload, the player receives `"payload": null` (exact wire text)."""
    reply = gateway.post("/publish", {"player_id": PLAYER, "event": "bare"}, token=server_token)
    assert reply.json == {"delivered": 1, "queued": False}
    assert listener.recv() == '{"event":"bare","payload":null}'
    reply = gateway.post("/broadcast", {"event": "bare-broadcast"}, token=server_token)
    assert reply.json == {"delivered": 1}
    assert listener.recv() == '{"event":"bare-broadcast","payload":null}'


PAYLOADS = [
    None, 0, -1, 2**70, 1.5, -2.5e-300, True, False, "", "text", "ünïcødé ☃ 😀", "\u0000\n\t\"\\",
    [], {}, [1, "two", None, [3]], {"nested": {"list": [{"a": 1}], "empty": {}}, "k é": "v"},
    [[[[[[[[[[[[[[[[[[[[["deep"]]]]]]]]]]]]]]]]]]]]],
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=[f"payload{index}" for index in range(len(PAYLOADS))])
def test_any_json_payload_round_trips(gateway, listener, server_token, payload):
    """Whatever JSON payload is published arrives unchanged, for /publish and /broadcast."""
    assert gateway.publish(server_token, PLAYER, "p", payload).status == 200
    assert receive_event(listener) == {"event": "p", "payload": payload}
    assert gateway.broadcast(server_token, "b", payload).status == 200
    assert receive_event(listener) == {"event": "b", "payload": payload}


def test_event_name_round_trips(gateway, listener, server_token):
    """Any non-empty event name, unicode included, arrives unchanged."""
    for event in ("x", "score.updated", "événement ☃", "e" * 1000):
        assert gateway.publish(server_token, PLAYER, event).status == 200
        assert receive_event(listener) == {"event": event, "payload": None}


def test_publish_response_shape(gateway, listener, tokens, server_token):
    """/publish answers {"delivered": N, "queued": bool}; N counts the player's connections."""
    second = gateway.connect(tokens.player(PLAYER))
    reply = gateway.publish(server_token, PLAYER, "two")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json == {"delivered": 2, "queued": False}
    assert receive_event(listener) == receive_event(second) == {"event": "two", "payload": None}


# --- broadcast ----------------------------------------------------------------------------------
def test_broadcast_reaches_every_connection_once(gateway, tokens, server_token):
    """A broadcast without player_id reaches every connected player once, each connection of a player."""
    clients = [gateway.connect(tokens.player(player)) for player in (1, 2, 3)]
    clients.append(gateway.connect(tokens.player(3)))  # player 3 has two connections
    reply = gateway.broadcast(server_token, "all", {"x": 1})
    assert reply.status == 200
    assert reply.json == {"delivered": 4}
    assert gateway.metric("ws_messages_queued_total") == 0
    for client in clients:
        assert receive_event(client) == {"event": "all", "payload": {"x": 1}}
    assert gateway.broadcast(server_token, "next").json == {"delivered": 4}
    for client in clients:  # no duplicate of the first broadcast came in between
        assert receive_event(client) == {"event": "next", "payload": None}


def test_broadcast_with_no_connections_delivers_nothing(gateway, server_token):
    """A broadcast with nobody connected answers delivered 0 and queues nothing."""
    assert gateway.broadcast(server_token, "void").json == {"delivered": 0}
    assert gateway.metric("ws_messages_queued_total") == 0
    assert len(gateway.gateway.offline) == 0


def test_broadcast_to_player_reaches_only_its_live_connections(gateway, tokens, server_token):
    """A broadcast with player_id reaches that player's connections only."""
    first, second = gateway.connect(tokens.player(1)), gateway.connect(tokens.player(1))
    other = gateway.connect(tokens.player(2))
    reply = gateway.broadcast(server_token, "only-1", player_id=1)
    assert reply.json == {"delivered": 2}
    assert receive_event(first) == receive_event(second) == {"event": "only-1", "payload": None}
    assert gateway.broadcast(server_token, "everyone").json == {"delivered": 3}
    assert receive_event(other) == {"event": "everyone", "payload": None}


def test_broadcast_to_offline_player_is_never_queued(gateway, tokens, server_token):
    """A broadcast with the player_id of an offline player delivers 0 and is not kept for later."""
    reply = gateway.broadcast(server_token, "lost", player_id=PLAYER)
    assert reply.json == {"delivered": 0}
    assert gateway.metric("ws_messages_queued_total") == 0
    assert len(gateway.gateway.offline) == 0
    client = gateway.connect(tokens.player(PLAYER))
    assert_next_is_marker(gateway, server_token, client)


def test_broadcast_frames_are_byte_identical(start_gateway):
    """A broadcast to many connections sends every one the very same frame bytes."""
    gateway = start_gateway("-max-conns", "0")
    server = gateway.tokens.server()
    raw_clients = []
    try:
        for index in range(12):
            token = gateway.tokens.player(100 + index % 4)
            raw = RawClient(gateway.host, gateway.port, f"/ws?token={token}")
            assert raw.status == 101
            raw_clients.append(raw)
        wait_for(lambda: gateway.gateway.hub.connection_count() == 12, what="12 connections")
        payload = {"score": 12.5, "name": "ünïcødé ☃", "list": [1, None, True]}
        assert gateway.broadcast(server, "board", payload).json == {"delivered": 12}
        frames = [raw.read_frame() for raw in raw_clients]
    finally:
        for raw in raw_clients:
            raw.close()
    expected = json.dumps({"event": "board", "payload": payload}, ensure_ascii=False,
                          separators=(",", ":")).encode()
    assert frames == [(0x1, expected)] * 12


# --- offline queue -------------------------------------------------------------------------------
def test_offline_messages_arrive_first_and_in_order(gateway, tokens, server_token):
    """Messages for an offline player are queued and arrive in order on connect, before live ones."""
    for index in range(3):
        reply = gateway.publish(server_token, PLAYER, "offline", index)
        assert reply.status == 200
        assert reply.json == {"delivered": 0, "queued": True}
    assert gateway.metric("ws_messages_queued_total") == 3
    assert gateway.metric("ws_offline_queue_messages") == 3
    client = gateway.connect(tokens.player(PLAYER))
    assert gateway.publish(server_token, PLAYER, "live", 3).json == {"delivered": 1, "queued": False}
    received = [receive_event(client) for _ in range(4)]
    assert received == [{"event": "offline", "payload": 0}, {"event": "offline", "payload": 1},
                        {"event": "offline", "payload": 2}, {"event": "live", "payload": 3}]
    assert gateway.metric("ws_offline_queue_messages") == 0
    second = gateway.connect(tokens.player(PLAYER))  # the queue is empty: nothing old for it
    assert_next_is_marker(gateway, server_token, client, second)


def test_offline_queue_drops_oldest_past_max_queued(start_gateway):
    """With -max-queued 3, the oldest messages are dropped, counted as offline_queue_full."""
    gateway = start_gateway("-max-queued", "3")
    server = gateway.tokens.server()
    for index in range(5):
        assert gateway.publish(server, PLAYER, "m", index).json == {"delivered": 0, "queued": True}
    assert gateway.metric("ws_messages_dropped_total", reason="offline_queue_full") == 2
    assert gateway.metric("ws_offline_queue_messages") == 3
    client = gateway.connect(gateway.tokens.player(PLAYER))
    assert [receive_event(client)["payload"] for _ in range(3)] == [2, 3, 4]
    assert_next_is_marker(gateway, server, client)


def test_offline_messages_expire_after_offline_ttl(start_gateway):
    """With -offline-ttl 200ms, an unclaimed message expires, is counted, and is never delivered."""
    gateway = start_gateway("-offline-ttl", "200ms")
    server = gateway.tokens.server()
    assert gateway.publish(server, PLAYER, "stale").json == {"delivered": 0, "queued": True}
    wait_for(lambda: gateway.metric("ws_messages_dropped_total", reason="offline_expired") == 1,
             what="offline message expired")
    assert gateway.metric("ws_offline_queue_messages") == 0
    client = gateway.connect(gateway.tokens.player(PLAYER))
    assert_next_is_marker(gateway, server, client)
    assert gateway.metric("ws_messages_delivered_total") == 1


def test_offline_queue_is_per_player(gateway, tokens, server_token):
    """A player's connection receives its own backlog only, not another offline player's."""
    gateway.publish(server_token, 1, "for-1")
    gateway.publish(server_token, 2, "for-2")
    one = gateway.connect(tokens.player(1))
    assert receive_event(one) == {"event": "for-1", "payload": None}
    assert gateway.metric("ws_offline_queue_messages") == 1
    two = gateway.connect(tokens.player(2))
    assert receive_event(two) == {"event": "for-2", "payload": None}


# --- rate limit ----------------------------------------------------------------------------------
@pytest.fixture
def limited(start_gateway) -> GatewayUnderTest:
    return start_gateway("-rate-limit", "3", "-rate-period", "1m")


def assert_rate_limited(reply: Reply) -> None:
    assert reply.status == 429, reply.body
    assert "rate" in error_of(reply)
    assert reply.headers["retry-after"].isdigit() and int(reply.headers["retry-after"]) >= 1


def test_rate_limit_refuses_past_the_burst(limited):
    """-rate-limit 3 per 1m: three publishes pass, the fourth gets 429 with Retry-After and is not sent."""
    server = limited.tokens.server()
    client = limited.connect(limited.tokens.player(PLAYER))
    for index in range(3):
        assert limited.publish(server, PLAYER, "ok", index).status == 200
        assert receive_event(client) == {"event": "ok", "payload": index}
    assert_rate_limited(limited.publish(server, PLAYER, "refused"))
    assert_rate_limited(limited.publish(server, 99, "refused-offline"))
    assert limited.metric("ws_rate_limited_total") == 2
    assert limited.metric("ws_messages_published_total") == 3
    assert limited.metric("ws_messages_queued_total") == 0


def test_rate_limit_is_shared_by_publish_and_broadcast(limited):
    """/publish and /broadcast draw on the same budget of a server subject."""
    server = limited.tokens.server()
    assert limited.publish(server, PLAYER).status == 200
    assert limited.broadcast(server).status == 200
    assert limited.publish(server, PLAYER).status == 200
    assert_rate_limited(limited.broadcast(server))
    assert_rate_limited(limited.publish(server, PLAYER))
    assert limited.metric("ws_rate_limited_total") == 2


def test_rate_limit_is_per_server_subject(limited):
    """Exhausting one server subject's budget leaves another subject's untouched; tokens of a subject share it."""
    first = limited.tokens.server("backend-1")
    first_again = limited.tokens.server("backend-1")
    second = limited.tokens.server("backend-2")
    for _ in range(3):
        assert limited.publish(first, PLAYER).status == 200
    assert_rate_limited(limited.publish(first, PLAYER))
    assert_rate_limited(limited.publish(first_again, PLAYER))
    for _ in range(3):
        assert limited.broadcast(second).status == 200
    assert_rate_limited(limited.broadcast(second))


def test_invalid_requests_do_not_consume_the_budget(limited):
    """Bodies refused with 400 (and refused tokens) take nothing from the rate budget."""
    server = limited.tokens.server()
    for _ in range(5):
        assert limited.post("/publish", raw=b"{", token=server).status == 400
        assert limited.post("/publish", {"player_id": PLAYER}, token=server).status == 400
        assert limited.post("/broadcast", {"event": ""}, token=server).status == 400
        assert limited.post("/publish", {"player_id": PLAYER, "event": "e"}, token="nope").status == 403
    for _ in range(3):
        assert limited.publish(server, PLAYER).status == 200
    assert_rate_limited(limited.publish(server, PLAYER))
    assert limited.metric("ws_rate_limited_total") == 1


# --- metrics and small endpoints -------------------------------------------------------------
METRIC_TYPES = {  # family name as exposed (counters with _total) -> type
    "ws_active_connections": "gauge",
    "ws_messages_published_total": "counter",
    "ws_messages_delivered_total": "counter",
    "ws_messages_queued_total": "counter",
    "ws_offline_queue_messages": "gauge",
    "ws_messages_dropped_total": "counter",
    "ws_rate_limited_total": "counter",
    "ws_auth_failures_total": "counter",
    "ws_connections_rejected_total": "counter",
    "ws_disconnects_total": "counter",
    "ws_http_requests_total": "counter",
    "ws_publish_duration_seconds": "histogram",
}


def test_metrics_endpoint_lists_every_metric(gateway):
    """GET /metrics is Prometheus text declaring every gateway metric, with the echoCTF names."""
    reply = gateway.get("/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    body = reply.body.decode()
    for name, kind in METRIC_TYPES.items():
        assert f"# TYPE {name} {kind}\n" in body, name
    for sample in ("ws_active_connections 0.0", "ws_messages_published_total 0.0",
                   "ws_messages_delivered_total 0.0"):
        assert sample + "\n" in body
    assert "_created" not in body


def test_metric_values_follow_publishing(gateway, tokens, server_token):
    """Published counts each accepted call; delivered counts frames to sockets, offline flushes included."""
    first, second = gateway.connect(tokens.player(PLAYER)), gateway.connect(tokens.player(PLAYER))

    def value(name: str, **labels: str) -> float:
        return scrape(gateway).get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("ws_active_connections") == 2
    gateway.publish(server_token, PLAYER, "to-two")
    receive_event(first), receive_event(second)
    assert (value("ws_messages_published_total"), value("ws_messages_delivered_total")) == (1, 2)
    gateway.publish(server_token, 22, "offline")
    assert (value("ws_messages_published_total"), value("ws_messages_delivered_total")) == (2, 2)
    assert (value("ws_messages_queued_total"), value("ws_offline_queue_messages")) == (1, 1)
    late = gateway.connect(tokens.player(22))
    assert receive_event(late) == {"event": "offline", "payload": None}
    assert (value("ws_messages_delivered_total"), value("ws_offline_queue_messages")) == (3, 0)
    assert value("ws_active_connections") == 3
    gateway.broadcast(server_token, "all")
    assert (value("ws_messages_published_total"), value("ws_messages_delivered_total")) == (3, 6)
    assert value("ws_http_requests_total", endpoint="publish", status="200") == 2
    assert value("ws_publish_duration_seconds_count", endpoint="broadcast") == 1
    late.close()
    wait_for(lambda: value("ws_active_connections") == 2, what="active connections to drop")


def test_healthz(gateway):
    """/healthz answers 200 while the process runs."""
    reply = gateway.get("/healthz")
    assert reply.status == 200
    assert reply.json == {"status": "ok"}


def test_readyz_reports_database_ok(gateway):
    """/readyz answers 200 with the database check ok."""
    reply = gateway.get("/readyz")
    assert reply.status == 200
    assert reply.json == {"status": "ready", "database": "ok", "broker": "ok", "accepting": "ok"}


@pytest.mark.parametrize("path", ["/nope", "/publish/extra", "/ws/x", "/"])
def test_unknown_path_is_404_json(gateway, path):
    """An unknown path answers 404 with a JSON error."""
    reply = gateway.get(path)
    assert reply.status == 404
    assert error_of(reply) == "not found"


@pytest.mark.parametrize("method, path", [("GET", "/publish"), ("PUT", "/broadcast"), ("DELETE", "/publish"),
                                          ("POST", "/metrics"), ("POST", "/healthz"), ("POST", "/ws")])
def test_wrong_method_is_405_json(gateway, method, path):
    """A known path with the wrong method answers 405 with a JSON error and Allow."""
    reply = gateway.request(method, path, b"" if method != "GET" else None)
    assert reply.status == 405
    assert error_of(reply) == "method not allowed"
    assert reply.headers["allow"]


def test_ws_without_upgrade_is_426_json(gateway):
    """GET /ws without an Upgrade answers 426 JSON asking for a WebSocket upgrade."""
    reply = gateway.get("/ws?token=whatever")
    assert reply.status == 426
    assert "upgrade" in error_of(reply).lower()
    assert reply.headers["upgrade"].lower() == "websocket"


# --- MariaDB end to end -----------------------------------------------------------------------
@pytest.fixture
def fresh_mysql_url(mysql_url) -> Iterator[str]:
    engine = create_engine(mysql_url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS ws_token"))
    engine.dispose()
    yield mysql_url


def test_mysql_gateway_publishes_end_to_end(start_gateway, fresh_mysql_url):
    """On MariaDB, the gateway creates ws_token, accepts a player and a server token, and delivers."""
    gateway = start_gateway(database_url=fresh_mysql_url)
    assert gateway.get("/readyz").json["database"] == "ok"
    server = gateway.tokens.server()
    client = gateway.connect(gateway.tokens.player(PLAYER))
    reply = gateway.publish(server, str(PLAYER), "mysql", {"ok": True})
    assert reply.json == {"delivered": 1, "queued": False}
    assert receive_event(client) == {"event": "mysql", "payload": {"ok": True}}
    assert gateway.publish(server, 22, "queued").json == {"delivered": 0, "queued": True}
    assert gateway.post("/publish", {"player_id": PLAYER, "event": "e"}, token=gateway.tokens.player(PLAYER)).status == 403


def test_refused_body_is_not_drained(start_gateway):
    """After a 413 the gateway hangs up instead of reading the rest of a huge declared body."""
    gateway = start_gateway("-max-body", "1KiB")
    server_token = gateway.tokens.server()
    sock = socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S)
    sock.sendall(f"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server_token}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {10 ** 12}\r\n\r\n".encode() + b"{" * 4096)
    response = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        response += chunk
    sock.close()
    assert response.startswith(b"HTTP/1.1 413")
    assert gateway.get("/healthz").status == 200
