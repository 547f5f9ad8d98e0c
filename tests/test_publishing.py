"""The publishing API served in front of Flask, on a real gateway: `POST /publish/batch`
(validation, all-or-nothing rate limit, order, metrics), wrong methods, and broadcasts
that pause without holding up other publishes or letting them overtake."""
from __future__ import annotations

import email.utils
import json
import socket
import time
from typing import Any

import gevent
import pytest
from gevent.event import Event

from tests.support import TIMEOUT_S
from tests.support.clients import receive_event
from tests.support.gateways import GatewayUnderTest, Reply
from wsgateway.publishing import BATCH_SLICE

PLAYER = 21


def batch(gateway: GatewayUnderTest, token: str, messages: Any) -> Reply:
    return gateway.post("/publish/batch", {"messages": messages}, token=token)


def message(player_id: Any = PLAYER, event: str = "e", payload: Any = None) -> dict[str, Any]:
    return {"player_id": player_id, "event": event, "payload": payload}


def error_of(reply: Reply) -> str:
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    body = reply.json
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


def assert_nothing_happened(gateway: GatewayUnderTest) -> None:
    """No message was published, delivered or queued."""
    assert gateway.metric("ws_messages_published_total") == 0
    assert gateway.metric("ws_messages_delivered_total") == 0
    assert gateway.metric("ws_messages_queued_total") == 0
    assert len(gateway.gateway.offline) == 0


def assert_next_is_marker(gateway: GatewayUnderTest, server_token: str, client: Any) -> None:
    assert gateway.publish(server_token, PLAYER, "marker").status == 200
    assert receive_event(client) == {"event": "marker", "payload": None}




# --- POST /publish/batch ------------------------------------------------------------------------
def test_batch_delivers_each_message_and_answers_in_request_order(gateway, tokens, listener, server_token):
    """Each message goes where a /publish would send it; results come back in request order."""
    other = gateway.connect(tokens.player(5))
    reply = batch(gateway, server_token, [message(PLAYER, "one", 1), message(99, "queued"),
                                          message("5", "to-five", {"x": [1]}), message(PLAYER, "two", 2)])
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json == {"results": [{"delivered": 1, "queued": False}, {"delivered": 0, "queued": True},
                                      {"delivered": 1, "queued": False}, {"delivered": 1, "queued": False}]}
    assert [receive_event(listener) for _ in range(2)] == [{"event": "one", "payload": 1},
                                                           {"event": "two", "payload": 2}]
    assert receive_event(other) == {"event": "to-five", "payload": {"x": [1]}}
    assert gateway.metric("ws_messages_published_total") == 4
    assert gateway.metric("ws_messages_delivered_total") == 3
    assert gateway.metric("ws_messages_queued_total") == 1
    assert gateway.metric("ws_http_requests_total", endpoint="publish_batch", status="200") == 1
    assert gateway.metric("ws_publish_duration_seconds_count", endpoint="publish_batch") == 1


def test_batch_keeps_the_order_of_one_players_messages_across_slices(start_gateway):
    """Messages to one player arrive in request order, also past the slices a big batch is delivered in."""
    gateway = start_gateway("-rate-limit", "0")
    server = gateway.tokens.server()
    client = gateway.connect(gateway.tokens.player(PLAYER))
    count = 2 * BATCH_SLICE + 10
    reply = batch(gateway, server, [message(PLAYER, "n", index) for index in range(count)])
    assert reply.status == 200, reply.body
    assert len(reply.json["results"]) == count
    assert [receive_event(client)["payload"] for _ in range(count)] == list(range(count))


def test_a_publish_right_after_a_batch_arrives_after_the_batchs_messages(gateway, listener, server_token):
    """A batch's frames wait for the flusher; a /publish read from the same packet,
    before the flusher ran, still queues behind them."""
    def request(path: str, body: Any) -> bytes:
        data = json.dumps(body).encode()
        return (f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {server_token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as publisher:
        publisher.sendall(request("/publish/batch", {"messages": [message(PLAYER, "b", index) for index in range(3)]})
                          + request("/publish", message(PLAYER, "after")))
        answers = b""
        while answers.count(b"HTTP/1.1 200") < 2:
            answers += publisher.recv(65536)
    assert [receive_event(listener) for _ in range(4)] == [
        {"event": "b", "payload": 0}, {"event": "b", "payload": 1}, {"event": "b", "payload": 2},
        {"event": "after", "payload": None}]


def test_batch_for_an_offline_player_is_queued_in_order(gateway, tokens, server_token):
    """Batch messages for an offline player wait in its queue and arrive in order when it connects."""
    reply = batch(gateway, server_token, [message(PLAYER, "q", index) for index in range(3)])
    assert reply.json == {"results": [{"delivered": 0, "queued": True}] * 3}
    client = gateway.connect(tokens.player(PLAYER))
    assert [receive_event(client)["payload"] for _ in range(3)] == [0, 1, 2]


BAD_ITEMS = [
    # (id, item, words the error must contain)
    ("not-an-object", "hello", "object"),
    ("array", [PLAYER, "e"], "object"),
    ("null", None, "object"),
    ("player-id-missing", {"event": "e"}, "player_id"),
    ("player-id-null", {"player_id": None, "event": "e"}, "player_id"),
    ("player-id-negative", {"player_id": -1, "event": "e"}, "player_id"),
    ("player-id-bool", {"player_id": True, "event": "e"}, "player_id"),
    ("player-id-float", {"player_id": 21.0, "event": "e"}, "player_id"),
    ("player-id-65-chars", {"player_id": "p" * 65, "event": "e"}, "player_id"),
    ("event-missing", {"player_id": PLAYER}, "event"),
    ("event-empty", {"player_id": PLAYER, "event": ""}, "event"),
    ("event-number", {"player_id": PLAYER, "event": 5}, "event"),
    ("lone-surrogate", {"player_id": PLAYER, "event": "e", "payload": "a\udfffb"}, "unicode"),
]


@pytest.mark.parametrize("item, words", [case[1:] for case in BAD_ITEMS], ids=[case[0] for case in BAD_ITEMS])
def test_one_bad_item_refuses_the_whole_batch_naming_it(gateway, listener, server_token, item, words):
    """An invalid item gets 400 naming its index and the problem, and no message of the batch is sent."""
    messages = [message(PLAYER, "first"), message(PLAYER, "second"), message(PLAYER, "third"), item]
    raw = json.dumps({"messages": messages}).encode("utf-8", "surrogatepass")
    reply = gateway.post("/publish/batch", raw=raw, token=server_token)
    assert reply.status == 400, reply.body
    error = error_of(reply)
    assert error.startswith("messages[3]: ") and words in error.lower(), error
    assert_nothing_happened(gateway)
    assert_next_is_marker(gateway, server_token, listener)


def test_item_errors_are_those_of_publish(gateway, server_token):
    """A batch item is refused with the very words /publish uses for the same body."""
    for body in ({"event": "e"}, {"player_id": -1, "event": "e"}, {"player_id": PLAYER, "event": ""}):
        single = error_of(gateway.post("/publish", body, token=server_token))
        assert error_of(batch(gateway, server_token, [body])) == f"messages[0]: {single}"


@pytest.mark.parametrize("body, words", [
    ({}, "messages"), ({"messages": None}, "messages"), ({"messages": []}, "non-empty"),
    ({"messages": {"0": {"player_id": 1, "event": "e"}}}, "array"), ({"messages": "x"}, "array"),
], ids=["missing", "null", "empty", "object", "string"])
def test_messages_must_be_a_non_empty_array(gateway, listener, server_token, body, words):
    """Without a non-empty `messages` array the batch is 400 and changes nothing."""
    reply = gateway.post("/publish/batch", body, token=server_token)
    assert reply.status == 400
    assert words in error_of(reply)
    assert_nothing_happened(gateway)


@pytest.mark.parametrize("raw, words", [(b"", "json"), (b'{"messages": [', "json"), (b"[]", "object")])
def test_batch_body_must_be_a_json_object(gateway, server_token, raw, words):
    """A batch body that is not a JSON object is refused like a /publish body."""
    reply = gateway.post("/publish/batch", raw=raw, token=server_token)
    assert reply.status == 400
    assert words in error_of(reply).lower()


def test_batch_over_max_batch_is_400_naming_the_limit(start_gateway):
    """More than -max-batch messages is 400 naming the limit; exactly -max-batch passes."""
    gateway = start_gateway("-max-batch", "3")
    server = gateway.tokens.server()
    reply = batch(gateway, server, [message(PLAYER)] * 4)
    assert reply.status == 400
    assert "at most 3" in error_of(reply)
    assert_nothing_happened(gateway)
    assert batch(gateway, server, [message(PLAYER)] * 3).status == 200


def test_batch_authentication_and_body_limit(start_gateway):
    """A batch needs a server bearer token (401/403) and a body within -max-body (413), like /publish."""
    gateway = start_gateway("-max-body", "1KiB")
    body = {"messages": [message()]}
    reply = gateway.post("/publish/batch", body)
    assert reply.status == 401 and reply.headers["www-authenticate"] == "Bearer"
    assert gateway.post("/publish/batch", body, token="unknown").status == 403
    too_big = {"messages": [message(payload="x" * 1100)]}
    reply = gateway.post("/publish/batch", too_big, token=gateway.tokens.server())
    assert reply.status == 413 and "1024" in error_of(reply)
    assert_nothing_happened(gateway)


def test_batch_takes_one_rate_token_per_message_all_or_nothing(start_gateway):
    """With -rate-limit 5: a batch of 3 passes, then one of 3 is 429 and sends nothing, then one of 2 passes."""
    gateway = start_gateway("-rate-limit", "5", "-rate-period", "1m")
    server = gateway.tokens.server()
    client = gateway.connect(gateway.tokens.player(PLAYER))
    assert batch(gateway, server, [message(PLAYER, "a", index) for index in range(3)]).status == 200
    refused = batch(gateway, server, [message(PLAYER, "refused", index) for index in range(3)])
    assert refused.status == 429
    assert "rate" in error_of(refused) and int(refused.headers["retry-after"]) >= 1
    assert batch(gateway, server, [message(PLAYER, "b", index) for index in range(2)]).status == 200
    received = [receive_event(client) for _ in range(5)]
    assert [event["event"] for event in received] == ["a", "a", "a", "b", "b"]
    assert gateway.metric("ws_messages_published_total") == 5
    assert gateway.metric("ws_rate_limited_total") == 1
    assert gateway.publish(server, PLAYER).status == 429, "the budget is shared with /publish"


def test_batch_larger_than_the_bucket_is_400(start_gateway):
    """A batch with more messages than -rate-limit can never pass: 400 saying so, and no budget is taken."""
    gateway = start_gateway("-rate-limit", "5", "-rate-period", "1m")
    server = gateway.tokens.server()
    reply = batch(gateway, server, [message()] * 6)
    assert reply.status == 400
    error = error_of(reply)
    assert "never" in error and "5" in error
    assert gateway.metric("ws_rate_limited_total") == 0
    assert batch(gateway, server, [message()] * 5).status == 200


# --- methods and metrics of the routes in front of Flask -------------------------------------------
@pytest.mark.parametrize("method, path", [("GET", "/publish/batch"), ("PUT", "/publish/batch"),
                                          ("GET", "/publish"), ("DELETE", "/broadcast")])
def test_wrong_method_on_a_publishing_route_is_405(gateway, method, path):
    """A publishing path with another method than POST answers 405 JSON with Allow: POST, counted as unmatched."""
    reply = gateway.request(method, path, b"" if method != "GET" else None)
    assert reply.status == 405
    assert error_of(reply) == "method not allowed"
    assert reply.headers["allow"] == "POST"
    assert gateway.metric("ws_http_requests_total", endpoint="unmatched", status="405") == 1


def test_refusals_are_counted_per_endpoint(gateway, server_token):
    """Refused publishing requests are counted under their endpoint and status, and timed."""
    gateway.post("/publish", {"event": "e"}, token=server_token)
    gateway.post("/broadcast", {"event": "e"})
    gateway.post("/publish/batch", {"messages": []}, token=server_token)
    assert gateway.metric("ws_http_requests_total", endpoint="publish", status="400") == 1
    assert gateway.metric("ws_http_requests_total", endpoint="broadcast", status="401") == 1
    assert gateway.metric("ws_http_requests_total", endpoint="publish_batch", status="400") == 1
    assert gateway.metric("ws_publish_duration_seconds_count", endpoint="publish") == 1


# --- broadcasts that pause ----------------------------------------------------------------------
def test_publish_is_answered_while_a_broadcast_is_paused_and_does_not_overtake_it(gateway, tokens, server_token):
    """While a broadcast waits between slices, a publish is answered; on a socket the broadcast has
    not reached yet, the publish arrives after the broadcast frame, which nobody gets twice."""
    clients = [gateway.connect(tokens.player(player)) for player in range(1, 7)]
    hub = gateway.gateway.hub
    gate = Event()
    hub.broadcast_slice, hub.pause = 2, gate.wait
    broadcaster = gevent.spawn(gateway.broadcast, server_token, "all")
    assert receive_event(clients[0]) == {"event": "all", "payload": None}  # the first slice went out
    reply = gateway.publish(server_token, 6, "later")
    assert reply.json == {"delivered": 1, "queued": False}
    assert not broadcaster.ready(), "the broadcast was still paused"
    gate.set()
    assert broadcaster.get(timeout=TIMEOUT_S).json == {"delivered": 6}
    assert receive_event(clients[5]) == {"event": "all", "payload": None}
    assert receive_event(clients[5]) == {"event": "later", "payload": None}
    for player, client in enumerate(clients[1:5], 2):
        assert receive_event(client) == {"event": "all", "payload": None}
        assert gateway.publish(server_token, player, "marker").status == 200
        assert receive_event(client) == {"event": "marker", "payload": None}
    assert gateway.metric("ws_messages_delivered_total") == 6 + 1 + 4


def test_answers_carry_a_current_date_header(gateway, server_token):
    """The Date header (formatted once a second, not per answer) is an HTTP date of now,
    on the publishing answers and on Flask's alike."""
    for reply in (gateway.publish(server_token, PLAYER, "dated"), gateway.get("/healthz")):
        assert reply.status == 200
        assert abs(email.utils.parsedate_to_datetime(reply.headers["date"]).timestamp() - time.time()) < 5
