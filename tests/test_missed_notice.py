"""-notify-missed: a reconnecting player learns what its offline queue lost, before the backlog."""
from __future__ import annotations

import gevent
import websocket

from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import receive_event

MISSED = "gateway.missed"


def test_overflow_is_announced_before_the_backlog(start_gateway):
    """Messages dropped by -max-queued are announced as `dropped`, then the kept ones arrive."""
    gateway = start_gateway("-notify-missed", "-max-queued", "2")
    server = gateway.tokens.server()
    for number in range(5):
        gateway.publish(server, 21, "n", number)
    client = gateway.connect(gateway.tokens.player(21))
    assert receive_event(client) == {"event": MISSED, "payload": {"dropped": 3, "expired": 0}}
    assert [receive_event(client)["payload"] for _ in range(2)] == [3, 4]
    assert gateway.metric("ws_missed_notices_total") == 1


def test_expiry_is_announced(start_gateway):
    """Messages that outlived -offline-ttl are announced as `expired`."""
    gateway = start_gateway("-notify-missed", "-offline-ttl", "200ms")
    server = gateway.tokens.server()
    gateway.publish(server, 21, "old", 1)
    gateway.publish(server, 21, "old", 2)
    wait_for(lambda: gateway.metric("ws_messages_dropped_total", reason="offline_expired") == 2,
             what="the queue to expire")
    gateway.publish(server, 21, "fresh", 3)
    client = gateway.connect(gateway.tokens.player(21))
    assert receive_event(client) == {"event": MISSED, "payload": {"dropped": 0, "expired": 2}}
    assert receive_event(client) == {"event": "fresh", "payload": 3}


def test_no_loss_no_notice_and_counters_reset(start_gateway):
    """A player who lost nothing gets no notice; after one notice the count starts again."""
    gateway = start_gateway("-notify-missed", "-max-queued", "1")
    server = gateway.tokens.server()
    token = gateway.tokens.player(21)
    gateway.publish(server, 21, "kept")
    client = gateway.connect(token)
    assert receive_event(client)["event"] == "kept"
    client.close()
    wait_for(lambda: gateway.gateway.hub.connection_count() == 0, what="disconnect")
    gateway.publish(server, 21, "a")
    gateway.publish(server, 21, "b")
    again = gateway.connect(token)
    assert receive_event(again)["payload"] == {"dropped": 1, "expired": 0}
    assert receive_event(again)["event"] == "b"
    again.close()
    wait_for(lambda: gateway.gateway.hub.connection_count() == 0, what="disconnect")
    gateway.publish(server, 21, "c")
    third = gateway.connect(token)
    assert receive_event(third)["event"] == "c", "no notice: nothing lost since the last connection"


def test_several_connections_get_the_notice_once(start_gateway):
    """Of simultaneous connections, the one that takes the backlog gets the notice; the other neither."""
    gateway = start_gateway("-notify-missed", "-max-queued", "1")
    server = gateway.tokens.server()
    gateway.publish(server, 21, "x")
    gateway.publish(server, 21, "y")
    token = gateway.tokens.player(21)
    connecting = [gevent.spawn(websocket.create_connection, f"{gateway.ws_url}?token={token}", timeout=TIMEOUT_S)
                  for _ in range(2)]
    gevent.joinall(connecting, raise_error=True)
    wait_for(lambda: gateway.gateway.hub.connection_count() == 2, what="both connections")
    gateway.publish(server, 21, "marker")
    seen = []
    for greenlet in connecting:
        events = []
        while (event := receive_event(greenlet.value))["event"] != "marker":
            events.append(event["event"])
        seen.append(events)
        greenlet.value.close()
    assert sorted(seen) == [[], [MISSED, "y"]]
    assert gateway.metric("ws_missed_notices_total") == 1


def test_off_by_default_the_wire_is_unchanged(start_gateway):
    """Without -notify-missed a reconnecting player gets exactly the kept messages, nothing more."""
    gateway = start_gateway("-max-queued", "1")
    server = gateway.tokens.server()
    gateway.publish(server, 21, "lost")
    gateway.publish(server, 21, "kept")
    client = gateway.connect(gateway.tokens.player(21))
    assert receive_event(client)["event"] == "kept"
    assert gateway.metric("ws_missed_notices_total") == 0


def test_counted_the_same_way_with_the_redis_broker(start_cluster_gateway):
    """With -broker, losses on one gateway are announced when the player connects to another."""
    first = start_cluster_gateway("-notify-missed", "-max-queued", "2")
    second = start_cluster_gateway("-notify-missed", "-max-queued", "2")
    server = first.tokens.server()
    for number in range(4):
        first.publish(server, 21, "n", number)
    client = second.connect(first.tokens.player(21))
    assert receive_event(client) == {"event": MISSED, "payload": {"dropped": 2, "expired": 0}}
    assert [receive_event(client)["payload"] for _ in range(2)] == [2, 3]


def test_expiry_counted_by_the_redis_sweep_is_announced(start_cluster_gateway):
    """With -broker, queues that expired unseen are counted by the sweep and announced."""
    gateway = start_cluster_gateway("-notify-missed", "-offline-ttl", "200ms")
    server = gateway.tokens.server()
    gateway.publish(server, 21, "old")
    wait_for(lambda: gateway.metric("ws_messages_dropped_total", reason="offline_expired") == 1,
             TIMEOUT_S, what="the cluster sweep")
    client = gateway.connect(gateway.tokens.player(21))
    assert receive_event(client) == {"event": MISSED, "payload": {"dropped": 0, "expired": 1}}
