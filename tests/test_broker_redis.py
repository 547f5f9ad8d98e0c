"""wsgateway.broker_redis beyond the contract: addressing between gateways (on a single Redis
and on a Redis Cluster), reconnection."""
from __future__ import annotations

from tests.support import TIMEOUT_S, wait_for
from tests.test_broker_contract import messages_into, redis_node
from wsgateway.broker import Envelope
from wsgateway.broker_redis import RedisBroker
from wsgateway.redis_link import RedisKeys, create_client, is_cluster_url


def test_player_envelope_reaches_only_the_named_gateways(redis_url, redis_prefix):
    """An envelope names the gateways holding the player; the others never see it."""
    first, second, third = (redis_node(redis_prefix, redis_url) for _ in range(3))
    try:
        first.broker.publish(Envelope(b"x", "p", frozenset((second.gateway_id, third.gateway_id))))
        first.broker.publish(Envelope(b"y", "p", frozenset((third.gateway_id,))))
        wait_for(lambda: len(third.received) == 2 and len(second.received) == 1, what="deliveries")
        assert first.received == []
        assert [envelope.frame for envelope in third.received] == [b"x", b"y"]
    finally:
        for node in (first, second, third):
            node.broker.close()


def test_broadcast_reaches_every_gateway_once(redis_url, redis_prefix):
    """A broadcast envelope is delivered once on each gateway of the cluster."""
    nodes = [redis_node(redis_prefix, redis_url) for _ in range(3)]
    try:
        nodes[0].broker.publish(Envelope(b"all"))
        wait_for(lambda: all(len(node.received) == 1 for node in nodes), what="broadcast everywhere")
    finally:
        for node in nodes:
            node.broker.close()


def test_clusters_with_other_prefixes_are_separate(redis_url, redis_prefix):
    """Gateways on another key prefix share the Redis but none of its messages."""
    ours, theirs = redis_node(redis_prefix, redis_url), redis_node(redis_prefix + "-other", redis_url)
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
    broker.start(messages_into(received))
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


def reader_through(forwarder_target: str, prefix: str, gateway_id: str, received: list[Envelope], **options):
    """A broker whose every link to Redis goes through a relay the test can cut."""
    from tests.support.processes import TcpForwarder

    host, port = forwarder_target.split("//")[1].split("/")[0].split(":")
    relay = TcpForwarder((host, int(port)))
    broker = RedisBroker(create_client(f"redis://127.0.0.1:{relay.port}/0", TIMEOUT_S), RedisKeys(prefix),
                         gateway_id, **options)
    broker.start(messages_into(received))
    assert broker.wait_subscribed(TIMEOUT_S)
    return broker, relay


def test_envelopes_published_while_a_reader_reconnects_are_caught_up_in_order(redis_prefix):
    """What is published while a gateway's link to Redis is down reaches it, in order, once it is back."""
    from tests.support.redis_server import REDIS_URL

    received: list[Envelope] = []
    reader, relay = reader_through(REDIS_URL, redis_prefix, "gw-away", received)
    publisher = RedisBroker(create_client(REDIS_URL, TIMEOUT_S), RedisKeys(redis_prefix), "gw-publisher")
    try:
        publisher.publish(Envelope(b"before", "p", frozenset(("gw-away",))))
        wait_for(lambda: len(received) == 1, what="delivery before the cut")
        relay.cut()
        wait_for(lambda: reader.state() == "reconnecting", what="the reader noticing the cut")
        for number in range(50):
            publisher.publish(Envelope(str(number).encode(), "p", frozenset(("gw-away",))))
        publisher.publish(Envelope(b"everyone"))
        relay.restore()
        wait_for(lambda: len(received) == 52, TIMEOUT_S * 2, what="catching up after the cut")
        assert [envelope.frame for envelope in received] == [
            b"before", *(str(number).encode() for number in range(50)), b"everyone"]
        assert reader.lost == 0
    finally:
        reader.close()
        publisher.close()
        relay.close()


def test_what_a_full_stream_trimmed_before_its_reader_came_back_is_counted(redis_prefix):
    """Past -broker-stream-length the oldest envelopes are trimmed; the reader counts every one it missed."""
    from tests.support.redis_server import REDIS_URL

    received: list[Envelope] = []
    lost: list[int] = []
    reader, relay = reader_through(REDIS_URL, redis_prefix, "gw-away", received, stream_length=10,
                                   on_lost=lost.append)
    publisher = RedisBroker(create_client(REDIS_URL, TIMEOUT_S), RedisKeys(redis_prefix), "gw-publisher",
                            stream_length=10)
    try:
        publisher.publish(Envelope(b"first", "p", frozenset(("gw-away",))))
        wait_for(lambda: len(received) == 1, what="delivery before the cut")
        relay.cut()
        wait_for(lambda: reader.state() == "reconnecting", what="the reader noticing the cut")
        for number in range(1000):
            publisher.publish(Envelope(str(number).encode(), "p", frozenset(("gw-away",))))
        relay.restore()
        wait_for(lambda: received[-1].frame == b"999", TIMEOUT_S * 2, what="the newest envelope")
        assert sum(lost) == reader.lost > 0
        assert reader.lost + len(received) == 1001, "each envelope either arrived or was counted lost"
        frames = [int(envelope.frame) for envelope in received[1:]]
        assert frames == list(range(1000 - len(frames), 1000)), "the oldest were trimmed, the rest in order"
    finally:
        reader.close()
        publisher.close()
        relay.close()


def test_a_closed_gateways_stream_and_registration_leave_redis(redis_url, redis_prefix):
    """close() removes the gateway's stream and its broadcast registration; nothing is left behind."""
    node = redis_node(redis_prefix, redis_url)
    node.broker.publish(Envelope(b"x", "p", frozenset((node.gateway_id,))))
    wait_for(lambda: len(node.received) == 1, what="delivery")
    node.broker.close()
    client = create_client(redis_url, TIMEOUT_S)
    keys = RedisKeys(redis_prefix, cluster=is_cluster_url(redis_url))
    assert not client.exists(keys.stream(node.gateway_id))
    assert client.zscore(keys.streams, node.gateway_id) is None


def test_a_reader_whose_registration_redis_lost_tells_its_owner_at_its_next_upkeep(redis_url, redis_prefix):
    """A flush or an eviction takes the reader's registration without breaking its link:
    at its next upkeep (within a second) it registers again and calls `on_subscribed`, so
    that the gateway writes back its presence and connection count (a broadcast's reach)
    as soon as broadcasts reach it again."""
    subscriptions: list[int] = []
    keys = RedisKeys(redis_prefix, cluster=is_cluster_url(redis_url))
    broker = RedisBroker(create_client(redis_url, TIMEOUT_S), keys, "gw", on_subscribed=lambda: subscriptions.append(1))
    broker.start(lambda envelope: None)
    try:
        assert broker.wait_subscribed(TIMEOUT_S)
        wait_for(lambda: subscriptions == [1], what="the first subscription's call")
        client = create_client(redis_url, TIMEOUT_S)
        client.zrem(keys.streams, "gw")
        wait_for(lambda: subscriptions == [1, 1], what="the call after the registration was lost")
        assert client.zscore(keys.streams, "gw") is not None
    finally:
        broker.close()
