"""Several in-process gateways on one Redis acting as one gateway: delivery, limits, outages.
The scenarios that take `on_redis` run on a single Redis and on a Redis Cluster."""
from __future__ import annotations

import functools
from typing import Callable

import gevent
import pytest
import websocket

from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import receive_close, receive_event
from tests.support.gateways import GatewayUnderTest


@pytest.fixture
def on_redis(start_cluster_gateway, redis_url) -> Callable[..., GatewayUnderTest]:
    """Start gateways of one cluster on the shared Redis, then (second run) on the Redis Cluster."""
    return functools.partial(start_cluster_gateway, broker_url=redis_url)


def test_publish_on_one_gateway_reaches_players_on_the_others(on_redis):
    """A publish sent to any gateway reaches the player's connections on every gateway."""
    first, second, third = (on_redis() for _ in range(3))
    server = first.tokens.server()
    on_second = second.connect(first.tokens.player(21))
    on_third = third.connect(first.tokens.player(21))
    reply = first.publish(server, 21, "score", {"points": 1})
    assert reply.status == 200 and reply.json == {"delivered": 2, "queued": False}
    assert receive_event(on_second) == receive_event(on_third) == {"event": "score", "payload": {"points": 1}}


def test_publish_order_is_kept_across_gateways(on_redis):
    """Messages from one publisher arrive in publish order on a player held by another gateway."""
    publisher_side, player_side = on_redis(), on_redis()
    server = publisher_side.tokens.server()
    client = player_side.connect(publisher_side.tokens.player(21))
    for number in range(100):
        assert publisher_side.publish(server, 21, "n", number).status == 200
    assert [receive_event(client)["payload"] for _ in range(100)] == list(range(100))


def test_broadcast_reaches_every_player_once(on_redis):
    """A broadcast reaches each connected player of the cluster exactly once."""
    gateways = [on_redis() for _ in range(3)]
    server = gateways[0].tokens.server()
    clients = [gateway.connect(gateways[0].tokens.player(30 + index)) for index, gateway in enumerate(gateways)]
    for gateway in gateways:  # the count a broadcast answers comes from each gateway's heartbeat
        gateway.gateway.roster.refresh()
    reply = gateways[1].broadcast(server, "round_over")
    assert reply.status == 200 and reply.json == {"delivered": 3}
    assert all(receive_event(client)["event"] == "round_over" for client in clients)
    sentinel = gateways[2].broadcast(server, "sentinel")
    assert sentinel.status == 200
    assert all(receive_event(client)["event"] == "sentinel" for client in clients), "no duplicate in between"


def test_offline_queue_is_shared(on_redis):
    """A message queued through one gateway is delivered when the player connects to another."""
    first, second = on_redis(), on_redis()
    server = first.tokens.server()
    reply = first.publish(server, 21, "while_away", 1)
    assert reply.json == {"delivered": 0, "queued": True}
    client = second.connect(first.tokens.player(21))
    assert receive_event(client) == {"event": "while_away", "payload": 1}
    assert second.metric("ws_messages_delivered_total") == 1


def test_queued_messages_go_to_exactly_one_of_simultaneous_connections(on_redis):
    """Connecting one player to two gateways at the same moment hands the backlog to one of them."""
    first, second = on_redis("-max-queued", "50"), on_redis("-max-queued", "50")
    server = first.tokens.server()
    for number in range(20):
        first.publish(server, 21, "queued", number)
    token = first.tokens.player(21)
    connecting = [gevent.spawn(websocket.create_connection, f"{gateway.ws_url}?token={token}", timeout=TIMEOUT_S)
                  for gateway in (first, second)]
    gevent.joinall(connecting, raise_error=True)
    clients = [greenlet.value for greenlet in connecting]
    first.publish(server, 21, "marker", None)  # live: both connections get it, after any backlog
    received = []
    for client in clients:
        events = []
        while (event := receive_event(client))["event"] != "marker":
            events.append(event["payload"])
        received.append(events)
        client.close()
    assert sorted(received, key=len) == [[], list(range(20))]


def test_max_conns_holds_across_gateways(on_redis):
    """-max-conns counts a player's connections on every gateway."""
    first, second = on_redis("-max-conns", "2"), on_redis("-max-conns", "2")
    token = first.tokens.player(21)
    first.connect(token)
    second.connect(token)
    status, body = first.refused(f"?token={token}")
    assert status == 429 and "2 connections" in body["error"]
    assert second.refused(f"?token={token}")[0] == 429


def test_rate_limit_holds_across_gateways(on_redis):
    """A server token's budget is spent on whichever gateway it publishes to."""
    first, second = (on_redis("-rate-limit", "3", "-rate-period", "1m") for _ in range(2))
    server = first.tokens.server()
    assert [first.publish(server, 21).status, second.publish(server, 21).status,
            first.publish(server, 21).status] == [200, 200, 200]
    refused = second.publish(server, 21)
    assert refused.status == 429 and int(refused.headers["retry-after"]) >= 1


def test_redis_outage_keeps_local_delivery_and_refuses_the_rest(start_cluster_gateway, private_redis):
    """Without Redis: local players still get messages (scope local), what needs Redis is a 503,
    /readyz says so, and everything comes back by itself when Redis returns."""
    gateway = start_cluster_gateway(broker_url=private_redis.url)
    server = gateway.tokens.server()
    client = gateway.connect(gateway.tokens.player(21))
    other_token = gateway.tokens.player(22)
    private_redis.stop()

    local = gateway.publish(server, 21, "still_here", 1)
    assert local.status == 200 and local.json == {"delivered": 1, "queued": False, "scope": "local"}
    assert receive_event(client) == {"event": "still_here", "payload": 1}
    refused = gateway.publish(server, 22, "nobody_here")
    assert refused.status == 503 and "broker unavailable" in refused.json["error"]
    broadcast = gateway.broadcast(server, "everyone")
    assert broadcast.json == {"delivered": 1, "scope": "local"}
    assert receive_event(client)["event"] == "everyone"
    assert gateway.refused(f"?token={other_token}")[0] == 503
    wait_for(lambda: gateway.get("/readyz").json.get("broker") == "reconnecting", what="readyz showing the outage")
    assert gateway.get("/readyz").status == 503

    private_redis.start()
    wait_for(lambda: gateway.get("/readyz").status == 200, TIMEOUT_S * 2, what="recovery")
    wait_for(lambda: gateway.publish(server, 21, "back", 2).json.get("scope") is None, what="presence restored")
    while receive_event(client)["event"] != "back":
        pass
    other = gateway.connect(other_token)
    assert gateway.publish(server, 22, "hello", None).json == {"delivered": 1, "queued": False}
    assert receive_event(other)["event"] == "hello"


def test_redis_restart_restores_presence_of_connected_players(start_cluster_gateway, private_redis):
    """After Redis restarts empty, connected players are present again and get live messages."""
    first = start_cluster_gateway(broker_url=private_redis.url)
    second = start_cluster_gateway(broker_url=private_redis.url)
    server = first.tokens.server()
    client = second.connect(first.tokens.player(21))
    private_redis.stop()
    private_redis.start()
    wait_for(lambda: first.publish(server, 21, "after_restart", None).json == {"delivered": 1, "queued": False},
             TIMEOUT_S * 2, what="player present again after the restart")
    assert receive_event(client)["event"] == "after_restart"


def test_gateway_leaving_takes_its_players_presence_along(on_redis):
    """When a gateway shuts down, its players are offline for the others at once."""
    first, second = on_redis(), on_redis()
    server = first.tokens.server()
    client = second.connect(first.tokens.player(21))
    stopping = gevent.spawn(second.gateway.shutdown, TIMEOUT_S)
    assert receive_close(client)[0] == 1001
    stopping.join(TIMEOUT_S)
    assert first.publish(server, 21, "later").json == {"delivered": 0, "queued": True}


@pytest.mark.parametrize("history", [(), ("-history-size", "10", "-history-ttl", "1m")], ids=["plain", "history"])
def test_a_broadcast_reaches_every_gateway_its_answer_counted(start_cluster_gateway, redis_prefix, history, monkeypatch):
    """A gateway whose broadcast registration runs out between the count (`delivered`) and
    the append (a gateway cut off from Redis, as its registration expires) still gets the
    broadcast its connections were counted for."""
    import redis

    from tests.support.redis_server import REDIS_URL
    from wsgateway.redis_link import RedisKeys

    cut_off, publishing = start_cluster_gateway(*history), start_cluster_gateway(*history)
    player = cut_off.connect(cut_off.tokens.player(21))
    client = redis.Redis.from_url(REDIS_URL)
    roster, count = publishing.gateway.roster, publishing.gateway.roster.reach

    def count_then_expire() -> int:
        reached = count()
        seconds, microseconds = client.time()
        client.zadd(RedisKeys(redis_prefix).streams, {cut_off.gateway.broker.gateway_id:
                                                      seconds * 1000 + microseconds // 1000 - 1})
        return reached

    monkeypatch.setattr(roster, "reach", count_then_expire)
    assert publishing.broadcast(publishing.tokens.server(), "b", 1).json == {"delivered": 1}
    assert receive_event(player) == {"event": "b", "payload": 1}
    client.close()
