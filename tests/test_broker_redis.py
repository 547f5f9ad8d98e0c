"""wsgateway.broker_redis beyond the contract: addressing between gateways, reconnection."""
from __future__ import annotations

from tests.helpers import TIMEOUT_S, wait_for
from tests.test_broker_contract import redis_node
from wsgateway.broker import Envelope
from wsgateway.broker_redis import RedisBroker
from wsgateway.redis_link import RedisKeys, create_client


def test_player_envelope_reaches_only_the_named_gateways(redis_prefix):
    """An envelope names the gateways holding the player; the others never see it."""
    first, second, third = (redis_node(redis_prefix) for _ in range(3))
    try:
        first.broker.publish(Envelope(b"x", "p", frozenset((second.gateway_id, third.gateway_id))))
        first.broker.publish(Envelope(b"y", "p", frozenset((third.gateway_id,))))
        wait_for(lambda: len(third.received) == 2 and len(second.received) == 1, what="deliveries")
        assert first.received == []
        assert [envelope.frame for envelope in third.received] == [b"x", b"y"]
    finally:
        for node in (first, second, third):
            node.broker.close()


def test_broadcast_reaches_every_gateway_once(redis_prefix):
    """A broadcast envelope is delivered once on each gateway of the cluster."""
    nodes = [redis_node(redis_prefix) for _ in range(3)]
    try:
        nodes[0].broker.publish(Envelope(b"all"))
        wait_for(lambda: all(len(node.received) == 1 for node in nodes), what="broadcast everywhere")
    finally:
        for node in nodes:
            node.broker.close()


def test_clusters_with_other_prefixes_are_separate(redis_prefix):
    """Gateways on another key prefix share the Redis but none of its messages."""
    ours, theirs = redis_node(redis_prefix), redis_node(redis_prefix + "-other")
    try:
        ours.broker.publish(Envelope(b"ours"))
        wait_for(lambda: len(ours.received) == 1, what="our broadcast")
        assert theirs.received == []
    finally:
        ours.broker.close()
        theirs.broker.close()


def test_listener_resubscribes_after_redis_restarts(private_redis, redis_prefix):
    """After Redis goes away and comes back, the broker listens again by itself and tells its owner."""
    received: list[Envelope] = []
    subscriptions: list[int] = []
    client = create_client(private_redis.url, TIMEOUT_S)
    broker = RedisBroker(client, RedisKeys(redis_prefix), "gw", on_subscribed=lambda: subscriptions.append(1))
    broker.start(received.append)
    try:
        assert broker.wait_subscribed(TIMEOUT_S)
        private_redis.stop()
        wait_for(lambda: broker.state() == "reconnecting", what="broker noticing the outage")
        private_redis.start()
        assert broker.wait_subscribed(TIMEOUT_S * 2)
        wait_for(lambda: len(subscriptions) == 2, what="second subscription reported")
        broker.publish(Envelope(b"after", "p", frozenset(("gw",))))
        wait_for(lambda: len(received) == 1, what="delivery after restart")
    finally:
        broker.close()
