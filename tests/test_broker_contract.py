"""The Broker contract, run against every backend: the in-process broker and Redis Streams,
on a single Redis and on a Redis Cluster. (What a cross-process backend keeps for a gateway that is reconnecting is tested in
test_broker_redis.py, since the in-process broker has no link to lose.)"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

from tests.support import TIMEOUT_S, wait_for
from tests.support.redis_server import REDIS_URL
from wsgateway.broker import Broker, Envelope, InProcessBroker
from wsgateway.errors import CloseCode
from wsgateway.frames import close_frame
from wsgateway.roster import LOCAL_GATEWAY


@dataclass
class Node:
    """One gateway's broker, its id, and what its delivery function received."""

    broker: Broker
    gateway_id: str
    received: list[Envelope]


def messages_into(received: list[Envelope]) -> Callable[[Envelope], None]:
    """A delivery function keeping the messages a broker hands over, not the changes of
    the broadcast count it may hand over too (empty frames, see `Envelope.count_change`)."""
    def deliver(envelope: Envelope) -> None:
        if envelope.frame:
            received.append(envelope)
    return deliver


def in_process_node() -> Node:
    received: list[Envelope] = []
    broker = InProcessBroker()
    broker.start(received.append)
    return Node(broker, LOCAL_GATEWAY, received)


def redis_node(prefix: str, url: str = REDIS_URL) -> Node:
    """One gateway's Redis broker on `url` (a single server's or a cluster's), reading already."""
    from wsgateway.broker_redis import RedisBroker
    from wsgateway.redis_link import RedisKeys, create_client, is_cluster_url, new_gateway_id

    received: list[Envelope] = []
    gateway_id = new_gateway_id()
    broker = RedisBroker(create_client(url, TIMEOUT_S), RedisKeys(prefix, cluster=is_cluster_url(url)), gateway_id)
    broker.start(messages_into(received))
    assert broker.wait_subscribed(TIMEOUT_S)
    return Node(broker, gateway_id, received)


@pytest.fixture(params=["in-process", "redis", "redis-cluster"])
def node(request, redis_prefix) -> Iterator[Node]:
    if request.param == "in-process":
        made = in_process_node()
    elif request.param == "redis":
        made = redis_node(redis_prefix)
    else:
        made = redis_node(redis_prefix, request.getfixturevalue("redis_cluster").url)
    yield made
    made.broker.close()


def arrived(node: Node, count: int) -> Callable[[], bool]:
    return lambda: len(node.received) >= count


def test_envelope_for_this_gateway_is_delivered_intact(node):
    """A player envelope addressed to this gateway reaches its delivery function unchanged."""
    envelope = Envelope(b"\x81\x05hello", "player-21", frozenset((node.gateway_id,)))
    node.broker.publish(envelope)
    wait_for(arrived(node, 1), what="delivery")
    assert (node.received[0].frame, node.received[0].player_id) == (envelope.frame, "player-21")


def test_broadcast_envelope_is_delivered(node):
    """An envelope for every player (no player id, no gateways) is delivered as such."""
    node.broker.publish(Envelope(b"frame"))
    wait_for(arrived(node, 1), what="delivery")
    assert node.received[0].player_id is None and node.received[0].frame == b"frame"


def test_publish_order_is_kept(node):
    """Envelopes from one publisher arrive in the order they were published."""
    for number in range(200):
        node.broker.publish(Envelope(str(number).encode(), "p", frozenset((node.gateway_id,))))
    wait_for(arrived(node, 200), what="200 deliveries")
    assert [envelope.frame for envelope in node.received] == [str(n).encode() for n in range(200)]


def test_non_ascii_player_ids_survive(node):
    """Player ids are carried exactly, whatever characters they hold."""
    node.broker.publish(Envelope(b"x", "jö-玩家", frozenset((node.gateway_id,))))
    wait_for(arrived(node, 1), what="delivery")
    assert node.received[0].player_id == "jö-玩家"


def test_state_is_ok_while_running_and_close_is_idempotent(node):
    """A running broker reports ok; closing it twice is harmless."""
    assert node.broker.state() == "ok"
    node.broker.close()
    node.broker.close()


def test_a_close_frame_travels_like_any_other_frame(node):
    """The envelope POST /disconnect sends (a close frame for one player) arrives intact: a broker needs nothing for it."""
    envelope = Envelope(close_frame(CloseCode.DISCONNECTED, CloseCode.DISCONNECTED.reason), "21",
                        frozenset((node.gateway_id,)))
    node.broker.publish(envelope)
    wait_for(arrived(node, 1), what="delivery")
    assert (node.received[0].frame, node.received[0].player_id) == (envelope.frame, "21")
