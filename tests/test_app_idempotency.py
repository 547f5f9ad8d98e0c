"""Idempotent publishing against real gateways: retries and twins deliver once."""
from __future__ import annotations

import json

import gevent
import pytest

from tests.support import wait_for
from tests.support.clients import receive_event

BODY = {"player_id": 21, "event": "flag", "payload": {"n": 1}}


def send(gateway, token, key, body=None, path="/publish"):
    return gateway.post(path, body or BODY, token=token, headers={"Idempotency-Key": key})


def events_until_marker(gateway, server, client):
    """Every event the client got before a marker published now."""
    gateway.publish(server, 21, "marker")
    events = []
    while (event := receive_event(client))["event"] != "marker":
        events.append(event)
    return events


@pytest.fixture
def rig(gateway, tokens):
    return gateway, tokens.server(), gateway.connect(tokens.player(21))


def test_retry_with_the_same_key_is_answered_not_delivered(rig):
    """A retry after the first call succeeded gets the same answer, marked as a replay, and no delivery."""
    gateway, server, client = rig
    first = send(gateway, server, "order-1")
    retry = send(gateway, server, "order-1")
    assert first.status == retry.status == 200
    assert first.json == {"delivered": 1, "queued": False}
    assert retry.json == {"delivered": 1, "queued": False, "replayed": True}
    assert retry.headers["idempotent-replayed"] == "true"
    assert len(events_until_marker(gateway, server, client)) == 1
    assert gateway.metric("ws_idempotent_replays_total") == 1
    assert gateway.metric("ws_messages_published_total") == 2  # the first call and the marker


def test_identical_requests_at_the_same_moment_deliver_once(rig):
    """Two identical keyed requests sent together: both answered 200, one delivery."""
    gateway, server, client = rig
    twins = [gevent.spawn(send, gateway, server, "twin") for _ in range(2)]
    gevent.joinall(twins, raise_error=True)
    replies = [twin.value for twin in twins]
    assert [reply.status for reply in replies] == [200, 200]
    assert sorted(reply.json.get("replayed", False) for reply in replies) == [False, True]
    assert len(events_until_marker(gateway, server, client)) == 1


def test_another_server_subject_may_use_the_same_key(rig):
    """Keys are per server subject: another backend's identical key is its own request."""
    gateway, server, client = rig
    other = gateway.tokens.server("backend-2")
    assert send(gateway, server, "shared").json.get("replayed") is None
    assert send(gateway, other, "shared").json.get("replayed") is None
    assert len(events_until_marker(gateway, server, client)) == 2


def test_key_is_forgotten_after_the_window(start_gateway):
    """After -idempotency-window the same key delivers again."""
    gateway = start_gateway("-idempotency-window", "200ms")
    server = gateway.tokens.server()
    client = gateway.connect(gateway.tokens.player(21))
    assert send(gateway, server, "k").json.get("replayed") is None
    wait_for(lambda: send(gateway, server, "k").json.get("replayed") is None, what="the window to pass")
    assert len(events_until_marker(gateway, server, client)) >= 2


def test_reusing_a_key_for_another_message_is_422(rig):
    """The same key with a different body is a publisher bug: 422, nothing delivered."""
    gateway, server, client = rig
    send(gateway, server, "k")
    reply = send(gateway, server, "k", {**BODY, "event": "other"})
    assert reply.status == 422 and "different request" in reply.json["error"]
    assert [event["event"] for event in events_until_marker(gateway, server, client)] == ["flag"]


def test_refused_call_is_not_remembered(start_gateway):
    """A call refused by the rate limit releases its key: the retry is delivered."""
    gateway = start_gateway("-rate-limit", "1", "-rate-period", "300ms")
    server = gateway.tokens.server()
    client = gateway.connect(gateway.tokens.player(21))
    assert gateway.publish(server, 21, "spend").status == 200
    assert send(gateway, server, "k").status == 429
    retried = wait_for(lambda: (reply := send(gateway, server, "k")).status == 200 and reply, what="budget")
    assert retried.json.get("replayed") is None
    assert receive_event(client)["event"] == "spend"
    assert receive_event(client)["event"] == "flag"


def test_broadcast_is_idempotent_too(rig):
    """/broadcast honours Idempotency-Key the same way."""
    gateway, server, client = rig
    body = {"event": "round"}
    assert send(gateway, server, "b", body, "/broadcast").json == {"delivered": 1}
    assert send(gateway, server, "b", body, "/broadcast").json == {"delivered": 1, "replayed": True}
    assert [event["event"] for event in events_until_marker(gateway, server, client)] == ["round"]


@pytest.mark.parametrize("key", ["", "x" * 256, "naïve", "tab\there"])
def test_malformed_keys_are_400(rig, key):
    """Keys must be 1-255 printable ASCII characters."""
    gateway, server, _ = rig
    reply = gateway.request("POST", "/publish", json.dumps(BODY).encode(),
                            {"Authorization": f"Bearer {server}", "Idempotency-Key": key.encode("utf-8").decode("latin-1")})
    assert reply.status == 400 and "Idempotency-Key" in reply.json["error"]


def test_window_is_shared_by_the_cluster(start_cluster_gateway):
    """With -broker, a retry that lands on another gateway is recognised as a replay."""
    first, second = start_cluster_gateway(), start_cluster_gateway()
    server = first.tokens.server()
    client = second.connect(first.tokens.player(21))
    assert send(first, server, "cluster-key").json == {"delivered": 1, "queued": False}
    assert send(second, server, "cluster-key").json["replayed"] is True
    twins = [gevent.spawn(send, gateway, server, "cluster-twin") for gateway in (first, second)]
    gevent.joinall(twins, raise_error=True)
    assert sorted(twin.value.json.get("replayed", False) for twin in twins) == [False, True]
    assert len(events_until_marker(first, server, client)) == 2


def batch(gateway, token, messages):
    return gateway.post("/publish/batch", {"messages": messages}, token=token)


def test_batch_items_with_keys_are_delivered_once(start_gateway):
    """A batch retried whole delivers nothing again, answers from the first call, and costs no tokens."""
    gateway = start_gateway("-rate-limit", "3", "-rate-period", "1m")
    server = gateway.tokens.server()
    client = gateway.connect(gateway.tokens.player(21))
    messages = [{"player_id": 21, "event": "a", "idempotency_key": "m1"},
                {"player_id": 21, "event": "b", "idempotency_key": "m2"}]
    first = batch(gateway, server, messages)
    assert first.status == 200 and first.json == {"results": [{"delivered": 1, "queued": False}] * 2}
    retry = batch(gateway, server, messages)
    assert retry.json == {"results": [{"delivered": 1, "queued": False, "replayed": True}] * 2}
    assert gateway.publish(server, 21, "marker").status == 200, "the replay took no rate tokens"
    assert [receive_event(client)["event"] for _ in range(3)] == ["a", "b", "marker"]


def test_single_publish_retried_inside_a_batch_is_recognised(rig):
    """A message first sent to /publish with a key is a replay when it comes again as a batch item."""
    gateway, server, client = rig
    assert send(gateway, server, "once").status == 200
    retry = batch(gateway, server, [{**BODY, "idempotency_key": "once"}, {"player_id": 21, "event": "new"}])
    assert retry.json["results"][0]["replayed"] is True
    assert [event["event"] for event in events_until_marker(gateway, server, client)] == ["flag", "new"]


def test_batch_key_errors_name_the_item_and_deliver_nothing(rig):
    """A key repeated within a batch is 400, a key reused for another message 422; nothing is delivered."""
    gateway, server, client = rig
    repeated = batch(gateway, server, [{**BODY, "idempotency_key": "k"}, {**BODY, "idempotency_key": "k"}])
    assert repeated.status == 400 and repeated.json["error"].startswith("messages[1]: idempotency_key repeats")
    send(gateway, server, "taken")
    reused = batch(gateway, server, [{"player_id": 21, "event": "x", "idempotency_key": "free"},
                                     {"player_id": 21, "event": "other", "idempotency_key": "taken"}])
    assert reused.status == 422 and reused.json["error"].startswith("messages[1]:")
    assert batch(gateway, server, [{"player_id": 21, "event": "x", "idempotency_key": "free"}]).status == 200, \
        "the refused batch released the keys it had claimed"
    assert [event["event"] for event in events_until_marker(gateway, server, client)] == ["flag", "x"]


def test_batch_interrupted_by_a_redis_outage_says_what_was_accepted(start_cluster_gateway, private_redis):
    """With Redis down mid-batch, the 503 lists the messages accepted before it (local delivery)."""
    gateway = start_cluster_gateway(broker_url=private_redis.url)
    server = gateway.tokens.server()
    client = gateway.connect(gateway.tokens.player(21))
    private_redis.stop()
    reply = batch(gateway, server, [{"player_id": 21, "event": "here"}, {"player_id": 22, "event": "elsewhere"}])
    assert reply.status == 503 and reply.json["error"].startswith("broker unavailable: messages[1:]")
    assert reply.json["results"] == [{"delivered": 1, "queued": False, "scope": "local"}]
    assert receive_event(client)["event"] == "here"
