"""Bodies built to reach past validation: payloads nested right at the interpreter's
recursion limit (where each extra step of work on them, such as the Idempotency-Key
fingerprint, needs more stack than parsing did) and strings that are valid JSON but not
valid Unicode (a lone surrogate, `"\\ud800"`). Each gets a 200 or a 400, never a 500,
and a batch that holds one is refused whole before anything is delivered, with the
in-process broker and with Redis."""
from __future__ import annotations

import itertools
import sys
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.clients import receive_event
from tests.support.gateways import GatewayUnderTest, Reply

PLAYER = 21
_keys = itertools.count()


def nested_body(depth: int, player_id: Any = 5) -> bytes:
    return (b'{"player_id": %s, "event": "e", "payload": ' % str(player_id).encode()
            + b"[" * depth + b"]" * depth + b"}")


def keyed_publish(gateway: GatewayUnderTest, token: str, raw: bytes, path: str = "/publish") -> Reply:
    return gateway.post(path, raw=raw, token=token, headers={"Idempotency-Key": f"k-{next(_keys)}"})


def keyed_batch(gateway: GatewayUnderTest, token: str, raw_item: bytes) -> Reply:
    """A batch of one valid item and `raw_item` with an idempotency_key spliced in."""
    item = raw_item[:-1] + b', "idempotency_key": "b-%d"}' % next(_keys)
    first = b'{"player_id": %d, "event": "first", "idempotency_key": "b-%d"}' % (PLAYER, next(_keys))
    return gateway.post("/publish/batch", raw=b'{"messages": [' + first + b", " + item + b"]}", token=token)


SENDERS: dict[str, Callable[[GatewayUnderTest, str, bytes], Reply]] = {
    "publish": keyed_publish,
    "broadcast": lambda gateway, token, raw: keyed_publish(gateway, token, raw, "/broadcast"),
    "batch": keyed_batch,
}


@pytest.fixture
def deep_target(start_gateway) -> tuple[GatewayUnderTest, str]:
    gateway = start_gateway("-rate-limit", "0")
    return gateway, gateway.tokens.server()


@pytest.mark.parametrize("route", sorted(SENDERS))
def test_keyed_payload_nested_near_the_recursion_limit_is_never_500(deep_target, route):
    """With an idempotency key, payloads nested around the recursion limit get 200 or 400, never 500."""
    gateway, server = deep_target
    limit = sys.getrecursionlimit()
    statuses = set()
    for depth in range(limit - 150, limit + 30):
        reply = SENDERS[route](gateway, server, nested_body(depth))
        statuses.add(reply.status)
        assert reply.status in (200, 400), (depth, reply.status, reply.body)
        if reply.status == 400:
            assert "nested too deeply" in reply.json["error"], reply.json
    assert statuses == {200, 400}
    assert gateway.metric("ws_http_requests_total", endpoint="publish", status="500") == 0


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(depth=st.integers(min_value=1, max_value=sys.getrecursionlimit() + 100),
       route=st.sampled_from(sorted(SENDERS)))
def test_any_nesting_depth_gets_200_or_400(deep_target, depth, route):
    """Whatever the nesting depth, keyed or batched, the answer is 200 or 400 naming the nesting."""
    gateway, server = deep_target
    reply = SENDERS[route](gateway, server, nested_body(depth))
    assert reply.status in (200, 400), (depth, reply.status, reply.body)
    if reply.status == 400:
        assert "nested too deeply" in reply.json["error"], reply.json


def test_batch_with_a_too_deep_item_is_all_or_nothing(deep_target):
    """A keyed batch of a valid item and one nested around the limit delivers both (200) or nothing (400)."""
    gateway, server = deep_target
    limit = sys.getrecursionlimit()
    published = 0.0
    for depth in range(limit - 150, limit + 5):
        reply = keyed_batch(gateway, server, nested_body(depth))
        assert reply.status in (200, 400), (depth, reply.status, reply.body)
        published += 2 if reply.status == 200 else 0
        assert gateway.metric("ws_messages_published_total") == published, (depth, reply.body)


# --- strings that are JSON but not Unicode -------------------------------------------------------
LONE_SURROGATE_BODIES = [
    # (id, path, raw body, words the error must contain)
    ("publish-player-id", "/publish", b'{"player_id": "\\ud800", "event": "e"}', "player_id"),
    ("publish-player-id-low", "/publish", b'{"player_id": "a\\udfffb", "event": "e"}', "player_id"),
    ("publish-event", "/publish", b'{"player_id": 21, "event": "\\ud800"}', "unicode"),
    ("publish-payload-key", "/publish", b'{"player_id": 21, "event": "e", "payload": {"\\ud800": 1}}',
     "unicode"),
    ("broadcast-player-id", "/broadcast", b'{"player_id": "\\ud800", "event": "e"}', "player_id"),
    ("batch-player-id", "/publish/batch",
     b'{"messages": [{"player_id": 21, "event": "first"}, {"player_id": "\\ud800", "event": "e"}]}',
     "messages[1]: player_id"),
    ("batch-event", "/publish/batch",
     b'{"messages": [{"player_id": 21, "event": "first"}, {"player_id": 21, "event": "\\udc00"}]}',
     "messages[1]: event"),
    ("batch-idempotency-key", "/publish/batch",
     b'{"messages": [{"player_id": 21, "event": "first"}, '
     b'{"player_id": 21, "event": "e", "idempotency_key": "\\ud800"}]}', "messages[1]: idempotency_key"),
]


@pytest.fixture(params=["in-process", "broker"])
def any_broker_gateway(request, start_gateway) -> GatewayUnderTest:
    """A gateway with the in-process broker, or one on the shared Redis (a prefix of its own)."""
    if request.param == "in-process":
        return start_gateway()
    return request.getfixturevalue("start_cluster_gateway")()


@pytest.mark.parametrize("path, raw, words", [case[1:] for case in LONE_SURROGATE_BODIES],
                         ids=[case[0] for case in LONE_SURROGATE_BODIES])
def test_lone_surrogate_is_400_and_delivers_nothing(any_broker_gateway, path, raw, words):
    """A lone surrogate in any string field is a 400 naming the field; nothing (no earlier batch item) is sent."""
    gateway = any_broker_gateway
    server = gateway.tokens.server()
    client = gateway.connect(gateway.tokens.player(PLAYER))
    reply = gateway.post(path, raw=raw, token=server)
    assert reply.status == 400, reply.body
    assert words.lower() in reply.json["error"].lower(), reply.json
    assert gateway.metric("ws_messages_published_total") == 0
    assert gateway.metric("ws_messages_delivered_total") == 0
    assert gateway.publish(server, PLAYER, "marker").status == 200
    assert receive_event(client) == {"event": "marker", "payload": None}


def test_lone_surrogate_idempotency_header_is_400(any_broker_gateway):
    """An Idempotency-Key header that is not ASCII (latin-1 bytes) is a 400 before anything is sent."""
    gateway = any_broker_gateway
    server = gateway.tokens.server()
    reply = gateway.post("/publish", raw=b'{"player_id": 21, "event": "e"}', token=server,
                         headers={"Idempotency-Key": "caf\xe9"})
    assert reply.status == 400, reply.body
    assert "Idempotency-Key" in reply.json["error"]
    assert gateway.metric("ws_messages_published_total") == 0
