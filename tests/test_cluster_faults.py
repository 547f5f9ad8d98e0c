"""Faults on the Redis scale-out seams, with two in-process gateways on a real Redis: a
publish racing a clean close, Redis restarting under traffic, one player's keys evicted,
and a Redis that may evict. Every 200 that is not `scope: local` must reach the player
(live, or from its queue when its connection was gone), in order, and nothing is parked
for a player who is connected."""
from __future__ import annotations

import json
import random
import time
from typing import Any

import gevent
import pytest
import redis

import wsgateway.server
from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import receive_event
from tests.support.frames import RawClient
from tests.support.processes import run_gateway_cli
from wsgateway.config import ConfigError
from wsgateway.redis_link import RedisKeys

OP_TEXT, OP_CLOSE = 0x1, 0x8


def cluster_pair(start_cluster_gateway, url: str, *flags: str):
    publisher_side = start_cluster_gateway(*flags, broker_url=url)
    player_side = start_cluster_gateway(*flags, broker_url=url)
    return publisher_side, player_side


def hold_until_set(target, name: str, monkeypatch) -> gevent.event.Event:
    """Make `target.name(...)` wait until the returned event is set (at most TIMEOUT_S),
    then run as before."""
    gate = gevent.event.Event()
    original = getattr(target, name)

    def held_back(*args, **kwargs):
        gate.wait(TIMEOUT_S)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, held_back)
    return gate


def hold_leaves(roster, monkeypatch) -> gevent.event.Event:
    """Make the roster's `leave` wait until the returned event is set: a closed
    connection's seat stays present (and counted) while envelopes travel to it."""
    return hold_until_set(roster, "leave", monkeypatch)


def hold_deliveries(broker, monkeypatch) -> gevent.event.Event:
    """Make what the broker reads wait, before it is delivered, until the returned event
    is set: an envelope or a broadcast travels slowly, past a connection's seat or leaving."""
    return hold_until_set(broker, "_deliver", monkeypatch)


# --- 1. a publish racing a clean close ------------------------------------------------------------
def test_message_reaching_a_gateway_after_its_connection_closed_is_queued_not_dropped(
        start_cluster_gateway, monkeypatch):
    """Answered delivered:1 while the player's close was under way: it reaches the player's next connection."""
    from tests.support.redis_server import REDIS_URL

    publisher_side, player_side = cluster_pair(start_cluster_gateway, REDIS_URL)
    server = publisher_side.tokens.server()
    token = publisher_side.tokens.player(21)
    leaving = hold_leaves(player_side.gateway.roster, monkeypatch)
    client = player_side.connect(token)
    client.close()
    wait_for(lambda: not player_side.gateway.hub.is_connected("21"), what="the connection gone from the hub")
    reply = publisher_side.publish(server, 21, "racing", 1)
    assert reply.json == {"delivered": 1, "queued": False}
    wait_for(lambda: player_side.metric("ws_messages_rerouted_total") == 1, what="the envelope rerouted")
    leaving.set()
    wait_for(lambda: player_side.metric("ws_active_connections") == 0, what="the close finished")
    assert player_side.metric("ws_messages_queued_total") == 1
    again = publisher_side.connect(token)
    assert receive_event(again) == {"event": "racing", "payload": 1}


def test_a_rerouted_copy_given_up_in_the_queue_is_counted_apart(start_cluster_gateway, monkeypatch):
    """A copy answered delivered:1 that found its connection gone waits in the queue; when a
    full queue gives it up, it is counted as dropped and, apart, as a rerouted copy given up
    (so that a soak can tell it from a loss); a message queued as such is not."""
    from tests.support.redis_server import REDIS_URL

    publisher_side, player_side = cluster_pair(start_cluster_gateway, REDIS_URL, "-max-queued", "1")
    server = publisher_side.tokens.server()
    leaving = hold_leaves(player_side.gateway.roster, monkeypatch)
    client = player_side.connect(publisher_side.tokens.player(21))
    client.close()
    wait_for(lambda: not player_side.gateway.hub.is_connected("21"), what="the connection gone from the hub")
    assert publisher_side.publish(server, 21, "racing", 1).json == {"delivered": 1, "queued": False}
    wait_for(lambda: player_side.metric("ws_messages_rerouted_total") == 1, what="the envelope rerouted")
    leaving.set()
    wait_for(lambda: player_side.metric("ws_active_connections") == 0, what="the close finished")
    assert publisher_side.publish(server, 21, "queued", 2).json == {"delivered": 0, "queued": True}
    assert publisher_side.metric("ws_messages_dropped_total", reason="offline_queue_full") == 1
    assert publisher_side.metric("ws_messages_rerouted_given_up_total", reason="in_queue") == 1
    assert publisher_side.publish(server, 21, "queued", 3).json == {"delivered": 0, "queued": True}
    assert publisher_side.metric("ws_messages_dropped_total", reason="offline_queue_full") == 2
    assert publisher_side.metric("ws_messages_rerouted_given_up_total", reason="in_queue") == 1


def test_a_copy_that_one_of_two_connections_missed_while_closing_reaches_the_next_one(
        start_cluster_gateway, monkeypatch):
    """Answered delivered:2 while one of the player's two connections was closing: the other
    gets it live, and the closing one's copy waits in the queue for the player's next
    connection, although a connection of the player stayed present all along."""
    from tests.support.redis_server import REDIS_URL

    publisher_side, player_side = cluster_pair(start_cluster_gateway, REDIS_URL)
    server = publisher_side.tokens.server()
    token = publisher_side.tokens.player(21)
    leaving = hold_leaves(player_side.gateway.roster, monkeypatch)
    closing, staying = player_side.connect(token), player_side.connect(token)
    closing.close()
    wait_for(lambda: player_side.gateway.hub.count_of("21") == 1, what="the closing connection gone from the hub")
    assert publisher_side.publish(server, 21, "racing", 1).json == {"delivered": 2, "queued": False}
    assert receive_event(staying) == {"event": "racing", "payload": 1}
    wait_for(lambda: player_side.metric("ws_messages_rerouted_total") == 1, what="the missed copy rerouted")
    leaving.set()
    wait_for(lambda: player_side.metric("ws_active_connections") == 1, what="the close finished")
    assert receive_event(publisher_side.connect(token)) == {"event": "racing", "payload": 1}


def test_a_broadcast_counted_for_a_closing_connection_reaches_the_players_next_one(
        start_cluster_gateway, monkeypatch):
    """A broadcast's answer counts the connections of every gateway (the roster's reach):
    one of them that began closing before the broadcast reached it has its copy queued
    for the player's next connection, as a closing connection's copy of a message is."""
    from tests.support.redis_server import REDIS_URL

    publisher_side, player_side = cluster_pair(start_cluster_gateway, REDIS_URL)
    server = publisher_side.tokens.server()
    token = publisher_side.tokens.player(21)
    leaving = hold_leaves(player_side.gateway.roster, monkeypatch)
    closing = player_side.connect(token)
    wait_for(lambda: publisher_side.gateway.roster.reach() == 1, what="the connection counted in a broadcast's reach")
    closing.close()
    wait_for(lambda: player_side.gateway.hub.count_of("21") == 0, what="the connection closing")
    assert publisher_side.broadcast(server, "all", 1).json == {"delivered": 1}
    wait_for(lambda: player_side.metric("ws_messages_rerouted_total") == 1, what="the missed copy queued")
    leaving.set()
    wait_for(lambda: player_side.metric("ws_active_connections") == 0, what="the close finished")
    assert receive_event(publisher_side.connect(token)) == {"event": "all", "payload": 1}


def test_a_broadcast_counted_for_a_connection_that_left_before_it_arrived_reaches_the_next_one(
        start_cluster_gateway, monkeypatch):
    """A broadcast sent while the player's connection was seated (so counted in its answer)
    that reaches the gateway only after that connection left: its copy is queued for the
    player's next connection (by the roster's clock, the seat left after it was sent)."""
    from tests.support.redis_server import REDIS_URL

    publisher_side, player_side = cluster_pair(start_cluster_gateway, REDIS_URL)
    server = publisher_side.tokens.server()
    token = publisher_side.tokens.player(21)
    leaving = player_side.connect(token)
    wait_for(lambda: publisher_side.gateway.roster.reach() == 1, what="the connection counted in a broadcast's reach")
    gate = hold_deliveries(player_side.gateway.broker, monkeypatch)  # the broadcast: past the leaving
    assert publisher_side.broadcast(server, "all", 1).json == {"delivered": 1}
    leaving.close()
    wait_for(lambda: len(player_side.gateway.delivery._left) == 1, what="the seat left")
    gate.set()
    wait_for(lambda: player_side.metric("ws_messages_rerouted_total") == 1, what="the missed copy queued")
    assert receive_event(publisher_side.connect(token)) == {"event": "all", "payload": 1}


@pytest.mark.parametrize("flags", [(), ("-history-size", "100")], ids=["plain", "history"])
def test_a_broadcast_never_reaches_a_connection_seated_after_it_was_counted(start_cluster_gateway, monkeypatch,
                                                                             flags):
    """A broadcast answered `delivered: 0` reaches the player's gateway only after the
    player's connection took its seat there: that connection was not counted, so it does
    not get it (the gateway's stream says where the seat was counted, after the broadcast)."""
    from tests.support.redis_server import REDIS_URL

    publisher_side, player_side = cluster_pair(start_cluster_gateway, REDIS_URL, *flags)
    server = publisher_side.tokens.server()
    token = publisher_side.tokens.player(21)
    gate = hold_deliveries(player_side.gateway.broker, monkeypatch)  # the broadcast: past the seat
    assert publisher_side.broadcast(server, "all", 1).json == {"delivered": 0}
    late = player_side.connect(token)
    wait_for(lambda: publisher_side.gateway.roster.presence("21") == 1, what="the connection seated")
    gate.set()
    assert publisher_side.publish(server, 21, "marker", 2).json == {"delivered": 1, "queued": False}
    assert receive_event(late) == {"event": "marker", "payload": 2}
    assert publisher_side.broadcast(server, "all", 3).json == {"delivered": 1}
    assert receive_event(late) == {"event": "all", "payload": 3}


@pytest.mark.parametrize("flags", [(), ("-history-size", "100")], ids=["plain", "history"])
def test_after_a_flush_a_broadcast_reaches_no_connection_its_answer_did_not_count(
        start_cluster_gateway, private_redis, monkeypatch, flags):
    """After FLUSHALL a gateway's reader registers again before its heartbeat has written
    its connection count back: a broadcast sent in between counts none of its connections
    and reaches none of them; once the count is back, broadcasts count and reach them."""
    publisher_side, player_side = cluster_pair(start_cluster_gateway, private_redis.url, *flags)
    server = publisher_side.tokens.server()
    client = player_side.connect(publisher_side.tokens.player(21))
    wait_for(lambda: publisher_side.gateway.roster.reach() == 1, what="the connection counted")
    roster = player_side.gateway.roster
    heartbeats = gevent.event.Event()
    original_refresh = roster.refresh

    def refresh_when_allowed(force=False):
        heartbeats.wait(TIMEOUT_S)
        return original_refresh(force)

    monkeypatch.setattr(roster, "refresh", refresh_when_allowed)
    direct = redis.Redis.from_url(private_redis.url)
    direct.flushall()
    wait_for(lambda: direct.zscore(roster._keys.streams, roster.gateway_id) is not None,
             what="the player side's reader registered again")
    assert publisher_side.broadcast(server, "all", 1).json == {"delivered": 0}
    heartbeats.set()
    wait_for(lambda: publisher_side.gateway.roster.reach() == 1, what="the count written back")
    assert publisher_side.broadcast(server, "all", 2).json == {"delivered": 1}
    assert receive_event(client) == {"event": "all", "payload": 2}


@pytest.mark.parametrize("flags", [(), ("-history-size", "100")], ids=["plain", "history"])
def test_a_broadcast_to_one_player_that_finds_its_connection_closing_is_never_queued(
        start_cluster_gateway, monkeypatch, flags):
    """`/broadcast` with a player id is for live connections only, as on one gateway: the
    copy of a connection that closed on the way is given up (counted), not queued."""
    from tests.support.redis_server import REDIS_URL

    publisher_side, player_side = cluster_pair(start_cluster_gateway, REDIS_URL, *flags)
    server = publisher_side.tokens.server()
    token = publisher_side.tokens.player(21)
    leaving = hold_leaves(player_side.gateway.roster, monkeypatch)
    closing = player_side.connect(token)
    closing.close()
    wait_for(lambda: player_side.gateway.hub.count_of("21") == 0, what="the connection closing")
    assert publisher_side.broadcast(server, "hint", 1, player_id=21).json == {"delivered": 1}
    wait_for(lambda: player_side.metric("ws_messages_dropped_total", reason="connection_gone") == 1,
             what="the copy given up")
    leaving.set()
    wait_for(lambda: player_side.metric("ws_active_connections") == 0, what="the close finished")
    again = publisher_side.connect(token)
    assert publisher_side.publish(server, 21, "marker", 2).json == {"delivered": 1, "queued": False}
    assert receive_event(again) == {"event": "marker", "payload": 2}


@pytest.mark.parametrize("flags", [(), ("-history-size", "100")], ids=["plain", "history"])
def test_a_message_goes_only_to_the_connection_it_was_routed_to(start_cluster_gateway, monkeypatch, flags):
    """A message routed to the player's connection while a newer one of the same player took
    its seat on that gateway (the envelope still on its way) reaches the connection it was
    routed to and not the newer one, which had the queue's backlog instead: none of it is
    received on more connections than the answer said, nor ahead of older messages. With
    a history the route step itself appends the envelope, naming the seats likewise."""
    from tests.support.redis_server import REDIS_URL

    publisher_side, player_side = cluster_pair(start_cluster_gateway, REDIS_URL, *flags)
    server = publisher_side.tokens.server()
    token = publisher_side.tokens.player(21)
    older = player_side.connect(token)
    gate = hold_deliveries(player_side.gateway.broker, monkeypatch)  # past the newer one's seat
    assert publisher_side.publish(server, 21, "routed", 1).json == {"delivered": 1, "queued": False}
    newer = player_side.connect(token)
    gate.set()
    assert receive_event(older) == {"event": "routed", "payload": 1}
    assert publisher_side.publish(server, 21, "after", 2).json == {"delivered": 2, "queued": False}
    assert receive_event(newer) == {"event": "after", "payload": 2}
    assert receive_event(older) == {"event": "after", "payload": 2}


def test_a_copy_routed_again_never_reaches_a_newer_connection_after_a_later_message(
        start_cluster_gateway, monkeypatch):
    """A copy routed again after its connection closed (its gateway's reader was behind,
    as after a Redis restart) finds a newer connection of the player that has already been
    sent a later message: it is given up, counted, instead of arriving after it."""
    from tests.support.redis_server import REDIS_URL

    publisher_side, player_side = cluster_pair(start_cluster_gateway, REDIS_URL)
    server = publisher_side.tokens.server()
    token = publisher_side.tokens.player(21)
    older = player_side.connect(token)
    wait_for(lambda: publisher_side.gateway.roster.presence("21") == 1, what="the older connection seated")
    gate = hold_deliveries(player_side.gateway.broker, monkeypatch)  # its reader behind
    assert publisher_side.publish(server, 21, "early", 1).json == {"delivered": 1, "queued": False}
    older.close()
    wait_for(lambda: publisher_side.gateway.roster.presence("21") == 0, what="the older connection left")
    newer = publisher_side.connect(token)
    assert publisher_side.publish(server, 21, "later", 2).json == {"delivered": 1, "queued": False}
    assert receive_event(newer) == {"event": "later", "payload": 2}
    gate.set()
    wait_for(lambda: publisher_side.metric("ws_messages_rerouted_given_up_total", reason="out_of_order") == 1,
             what="the late copy given up")
    assert publisher_side.metric("ws_messages_dropped_total", reason="rerouted_out_of_order") == 1
    assert publisher_side.publish(server, 21, "marker", 3).json == {"delivered": 1, "queued": False}
    assert receive_event(newer) == {"event": "marker", "payload": 3}


def test_a_copy_routed_again_reaches_a_newer_connection_sent_nothing_yet_first(start_cluster_gateway, monkeypatch):
    """The same late copy reaches a newer connection that has been sent nothing of its
    player's yet (nothing later can have arrived before it), ahead of what comes next."""
    from tests.support.redis_server import REDIS_URL

    publisher_side, player_side = cluster_pair(start_cluster_gateway, REDIS_URL)
    server = publisher_side.tokens.server()
    token = publisher_side.tokens.player(21)
    older = player_side.connect(token)
    wait_for(lambda: publisher_side.gateway.roster.presence("21") == 1, what="the older connection seated")
    gate = hold_deliveries(player_side.gateway.broker, monkeypatch)
    assert publisher_side.publish(server, 21, "early", 1).json == {"delivered": 1, "queued": False}
    older.close()
    wait_for(lambda: publisher_side.gateway.roster.presence("21") == 0, what="the older connection left")
    newer = publisher_side.connect(token)
    gate.set()
    assert receive_event(newer) == {"event": "early", "payload": 1}
    assert publisher_side.publish(server, 21, "later", 2).json == {"delivered": 1, "queued": False}
    assert receive_event(newer) == {"event": "later", "payload": 2}
    assert publisher_side.metric("ws_messages_rerouted_given_up_total", reason="out_of_order") == 0


def test_a_copy_routed_again_that_comes_while_a_backlog_is_taken_never_follows_that_backlog(
        start_cluster_gateway, monkeypatch):
    """The late copy reaches the newer connection's gateway while that connection is
    taking the queue's backlog (a message queued after the copy was first routed): it is
    given up, counted, rather than sent after that backlog."""
    from tests.support.redis_server import REDIS_URL

    publisher_side, player_side = cluster_pair(start_cluster_gateway, REDIS_URL)
    server = publisher_side.tokens.server()
    token = publisher_side.tokens.player(21)
    older = player_side.connect(token)
    wait_for(lambda: publisher_side.gateway.roster.presence("21") == 1, what="the older connection seated")
    gate = hold_deliveries(player_side.gateway.broker, monkeypatch)
    assert publisher_side.publish(server, 21, "early", 1).json == {"delivered": 1, "queued": False}
    older.close()
    wait_for(lambda: publisher_side.gateway.roster.presence("21") == 0, what="the older connection left")
    assert publisher_side.publish(server, 21, "queued", 2).json == {"delivered": 0, "queued": True}
    broker = publisher_side.gateway.broker
    deliver, arrived = broker._deliver, gevent.event.Event()

    def noting_the_copy(envelope):
        delivered = deliver(envelope)
        if b"early" in envelope.frame:
            arrived.set()
        return delivered

    monkeypatch.setattr(broker, "_deliver", noting_the_copy)
    roster = publisher_side.gateway.roster
    take_seat = roster.take_seat

    def take_seat_while_the_copy_comes(seat):
        backlog = take_seat(seat)
        gate.set()  # the copy is routed again, to this seat, while its backlog is on its way here
        assert arrived.wait(TIMEOUT_S)
        return backlog

    monkeypatch.setattr(roster, "take_seat", take_seat_while_the_copy_comes)
    newer = publisher_side.connect(token)
    assert receive_event(newer) == {"event": "queued", "payload": 2}
    assert publisher_side.publish(server, 21, "marker", 3).json == {"delivered": 1, "queued": False}
    assert receive_event(newer) == {"event": "marker", "payload": 3}
    assert publisher_side.metric("ws_messages_rerouted_given_up_total", reason="out_of_order") == 1


def test_a_copy_routed_again_goes_to_one_newer_connection_per_connection_that_missed_it(
        start_cluster_gateway, monkeypatch):
    """One connection missed the copy (answered `delivered: 1`) and the player opened two
    since: the copy routed again goes to one of them, not both (never received on more
    connections than the answer said)."""
    from tests.support.redis_server import REDIS_URL

    publisher_side, player_side = cluster_pair(start_cluster_gateway, REDIS_URL)
    server = publisher_side.tokens.server()
    token = publisher_side.tokens.player(21)
    older = player_side.connect(token)
    wait_for(lambda: publisher_side.gateway.roster.presence("21") == 1, what="the older connection seated")
    gate = hold_deliveries(player_side.gateway.broker, monkeypatch)
    assert publisher_side.publish(server, 21, "early", 1).json == {"delivered": 1, "queued": False}
    older.close()
    wait_for(lambda: publisher_side.gateway.roster.presence("21") == 0, what="the older connection left")
    newer = [publisher_side.connect(token), publisher_side.connect(token)]
    gate.set()
    wait_for(lambda: player_side.metric("ws_messages_rerouted_total") == 1, what="the copy routed again")
    assert publisher_side.publish(server, 21, "marker", 2).json == {"delivered": 2, "queued": False}
    received = []
    for client in newer:
        events = [receive_event(client)]
        if events[0]["payload"] == 1:
            events.append(receive_event(client))
        received.append(events)
    assert sorted(len(events) for events in received) == [1, 2], received
    assert all(events[-1] == {"event": "marker", "payload": 2} for events in received)


def test_a_backlog_restored_for_a_connection_that_closed_meanwhile_keeps_its_place_in_the_queue(
        start_cluster_gateway, private_redis, monkeypatch):
    """After FLUSHALL a message is queued while the player is connected; the heartbeat
    writes the seat back and takes that backlog for the connection, which closes just then,
    while a later message reaches the closed connection and is queued as its copy: the
    restored backlog goes back to the front of the queue, so the next connection gets both
    in publish order (routed again one by one, it went behind the later one)."""
    publisher_side, player_side = cluster_pair(start_cluster_gateway, private_redis.url)
    server = publisher_side.tokens.server()
    token = publisher_side.tokens.player(21)
    client = player_side.connect(token)
    wait_for(lambda: publisher_side.gateway.roster.presence("21") == 1, what="the connection seated")
    roster = player_side.gateway.roster
    leaving = hold_leaves(roster, monkeypatch)  # the closed connection's seat stays present
    heartbeats = gevent.event.Event()
    original_refresh, original_restore = roster.refresh, roster.restore

    def refresh_when_allowed(force=False):
        heartbeats.wait(TIMEOUT_S)
        return original_refresh(force)

    def restore_as_the_connection_closes(seats):
        backlogs = original_restore(seats)
        client.close()
        wait_for(lambda: player_side.gateway.hub.count_of("21") == 0, what="the connection closing")
        assert publisher_side.publish(server, 21, "later", 2).json == {"delivered": 1, "queued": False}
        wait_for(lambda: player_side.metric("ws_messages_rerouted_total") == 1, what="the later copy queued")
        return backlogs

    monkeypatch.setattr(roster, "refresh", refresh_when_allowed)
    monkeypatch.setattr(roster, "restore", restore_as_the_connection_closes)
    direct = redis.Redis.from_url(private_redis.url)
    direct.flushall()
    assert publisher_side.publish(server, 21, "parked", 1).json == {"delivered": 0, "queued": True}
    heartbeats.set()
    queue = roster._keys.shard_of("21").queue("21")
    wait_for(lambda: direct.llen(queue) == 2, what="both messages back in the queue")
    leaving.set()
    wait_for(lambda: player_side.metric("ws_active_connections") == 0, what="the close finished")
    again = publisher_side.connect(token)
    assert receive_event(again) == {"event": "parked", "payload": 1}
    assert receive_event(again) == {"event": "later", "payload": 2}


def read_until_closed(client: RawClient) -> list[int]:
    """Close from the client side and read every text frame the gateway sent before its close."""
    client.send_frame(OP_CLOSE, b"\x03\xe8")
    payloads = []
    while True:
        opcode, payload = client.read_frame()
        if opcode == OP_CLOSE:
            return payloads
        if opcode == OP_TEXT:
            payloads.append(json.loads(payload)["payload"])


def test_publishes_racing_clean_closes_are_each_sent_or_queued(start_cluster_gateway):
    """Rounds of publish-during-close: every publish answered 200 reaches the player, before the close or after."""
    from tests.support.redis_server import REDIS_URL

    publisher_side, player_side = cluster_pair(start_cluster_gateway, REDIS_URL, "-max-queued", "1000", "-rate-limit", "0")
    server = publisher_side.tokens.server()
    token = publisher_side.tokens.player(21)
    answers: dict[int, Any] = {}
    sequences: list[list[int]] = []  # what each connection received, in arrival order
    numbers = iter(range(10**9))
    for _round in range(12):
        stop = gevent.event.Event()

        def publish_until_stopped() -> None:
            while not stop.is_set():
                number = next(numbers)
                answers[number] = publisher_side.publish(server, 21, "n", number).json

        client = RawClient(player_side.host, player_side.port, f"/ws?token={token}")
        wait_for(lambda: player_side.gateway.hub.is_connected("21"), what="connected")
        wait_for(lambda: publisher_side.publish(server, 21, "n", None).json.get("delivered") == 1,
                 what="the seat taken")
        answered_before = len(answers)
        publisher = gevent.spawn(publish_until_stopped)
        wait_for(lambda: len(answers) >= answered_before + 4, what="publishes flowing")  # however slow the machine
        gevent.sleep(random.uniform(0.0, 0.05))
        sequences.append([number for number in read_until_closed(client) if number is not None])
        client.close()
        wait_for(lambda: player_side.metric("ws_active_connections") == 0, what="the close finished")
        gevent.sleep(0.02)  # publishes now find the player offline
        stop.set()
        publisher.join(TIMEOUT_S)
        backlog_reader = RawClient(player_side.host, player_side.port, f"/ws?token={token}")
        wait_for(lambda: player_side.gateway.hub.is_connected("21"), what="reconnected")
        assert publisher_side.publish(server, 21, "marker", -1).json == {"delivered": 1, "queued": False}
        backlog: list[int] = []
        while (number := json.loads(backlog_reader.read_frame()[1])["payload"]) != -1:
            if number is not None:
                backlog.append(number)
        sequences.append(backlog)
        read_until_closed(backlog_reader)  # nothing is published now: nothing races this close
        backlog_reader.close()
        wait_for(lambda: player_side.metric("ws_active_connections") == 0, what="the reader's close finished")
    received = {number for sequence in sequences for number in sequence}
    accepted = [number for number, answer in answers.items() if answer.get("delivered") or answer.get("queued")]
    assert len(accepted) >= 12 * 4
    assert [number for number in accepted if number not in received] == [], "accepted but never received"
    assert [sequence for sequence in sequences if sequence != sorted(sequence)] == [], "in order on each connection"
    assert sum(len(sequence) for sequence in sequences) == len(received), "none twice"


# --- 2. Redis restarting under traffic ----------------------------------------------------------
def test_redis_restart_under_traffic_loses_no_accepted_message(start_cluster_gateway, private_redis, monkeypatch):
    """Redis restarts empty mid-traffic: every 200 not scope local reaches the player that stayed connected, in order.

    The player side writes its presence back within about a second, often before any
    publish finds the player offline; its restore is held until one has (queued: true),
    so that the messages parked meanwhile are always part of what is checked."""
    publisher_side, player_side = cluster_pair(start_cluster_gateway, private_redis.url)
    parked = gevent.event.Event()
    roster = player_side.gateway.roster
    original_restore = roster.restore

    def restore_once_a_publish_was_parked(seats):
        parked.wait(TIMEOUT_S)
        return original_restore(seats)

    monkeypatch.setattr(roster, "restore", restore_once_a_publish_was_parked)
    server = publisher_side.tokens.server()
    client = player_side.connect(publisher_side.tokens.player(21))
    received: list[int] = []

    def read_forever() -> None:
        while True:
            received.append(receive_event_forever(client)["payload"])

    reader = gevent.spawn(read_forever)
    answers: dict[int, Any] = {}
    stop = gevent.event.Event()

    def publish_at_200_a_second() -> None:
        number = 0
        while not stop.is_set():
            reply = publisher_side.publish(server, 21, "n", number)
            answers[number] = (reply.status, reply.json)
            if reply.status == 200 and reply.json.get("queued"):
                parked.set()
            number += 1
            gevent.sleep(0.005)

    publisher = gevent.spawn(publish_at_200_a_second)
    try:
        wait_for(lambda: len(answers) >= 50, what="traffic before the restart")
        private_redis.stop()
        wait_for(lambda: any(status == 503 for status, _ in answers.values()), what="the outage seen")
        private_redis.start()
        wait_for(lambda: player_side.get("/readyz").status == 200, TIMEOUT_S * 2, what="the player side back")
        restarted_at = len(answers)
        wait_for(lambda: len(answers) >= restarted_at + 200, TIMEOUT_S * 2, what="traffic after the restart")
        stop.set()
        publisher.join(TIMEOUT_S)
        accepted = [number for number, (status, body) in answers.items()
                    if status == 200 and body.get("scope") != "local"]
        assert any(body.get("queued") for status, body in answers.values() if status == 200), \
            "some publishes found the player offline while its presence was not yet restored"
        wait_for(lambda: set(accepted) <= set(received), TIMEOUT_S * 2,
                 what=f"all {len(accepted)} accepted messages at the connected player")
        assert received == sorted(received), "in publish order"
        assert len(received) == len(set(received)), "none twice"
    finally:
        stop.set()
        reader.kill()


def receive_event_forever(client) -> Any:
    """The next event, however long it takes (the client's own timeout is one test unit)."""
    import websocket

    while True:
        try:
            return receive_event(client)
        except websocket.WebSocketTimeoutException:
            continue


# --- 3. presence lost in Redis -------------------------------------------------------------------
def test_one_players_evicted_presence_is_restored_within_a_heartbeat(start_cluster_gateway, private_redis,
                                                                     redis_prefix):
    """Only one player's keys lost (as maxmemory eviction does): within a heartbeat the player is
    present again and what was queued meanwhile reaches its connection, in order."""
    publisher_side, player_side = cluster_pair(start_cluster_gateway, private_redis.url, "-presence-ttl", "1500ms")
    server = publisher_side.tokens.server()
    client = player_side.connect(publisher_side.tokens.player(21))
    bystander = player_side.connect(publisher_side.tokens.player(22))
    keys = RedisKeys(redis_prefix)
    store = redis.Redis.from_url(private_redis.url)
    store.delete(keys.present("21"), keys.seats("21"))
    assert publisher_side.publish(server, 21, "parked", 1).json == {"delivered": 0, "queued": True}
    assert publisher_side.publish(server, 21, "parked", 2).json == {"delivered": 0, "queued": True}
    started = time.monotonic()
    assert receive_event(client) == {"event": "parked", "payload": 1}
    assert receive_event(client) == {"event": "parked", "payload": 2}
    assert time.monotonic() - started < 1.5 / 3 + 1.0 + 1.0, "within a heartbeat (and one upkeep tick)"
    assert publisher_side.publish(server, 21, "live", 3).json == {"delivered": 1, "queued": False}
    assert receive_event(client) == {"event": "live", "payload": 3}
    assert publisher_side.publish(server, 22, "live", 4).json == {"delivered": 1, "queued": False}
    assert receive_event(bystander) == {"event": "live", "payload": 4}
    store.close()


def test_a_redis_that_may_evict_keys_is_refused_at_start(start_cluster_gateway, private_redis):
    """maxmemory with an evicting policy: the gateway will not start, and says which setting to change."""
    store = redis.Redis.from_url(private_redis.url)
    store.config_set("maxmemory", "64mb")
    store.config_set("maxmemory-policy", "volatile-lru")
    with pytest.raises(ConfigError, match="maxmemory-policy volatile-lru .* noeviction"):
        start_cluster_gateway(broker_url=private_redis.url)
    store.config_set("maxmemory-policy", "noeviction")
    start_cluster_gateway(broker_url=private_redis.url)
    store.close()


def test_the_command_exits_2_naming_the_policy_on_an_evicting_redis(private_redis, sqlite_url, tmp_path):
    """bin/ws-gateway on an evicting Redis: one clear line on stderr, exit 2, no traceback."""
    store = redis.Redis.from_url(private_redis.url)
    store.config_set("maxmemory", "64mb")
    store.config_set("maxmemory-policy", "allkeys-lru")
    result = run_gateway_cli("-dsn", sqlite_url, "-addr", "127.0.0.1:0", "-broker", private_redis.url, cwd=tmp_path)
    assert result.returncode == 2
    assert "-broker: maxmemory-policy allkeys-lru" in result.stderr and "noeviction" in result.stderr
    assert "Traceback" not in result.stderr
    store.close()


def test_a_redis_reconfigured_to_evict_is_reported_by_readyz(start_cluster_gateway, private_redis, monkeypatch):
    """A policy switched to eviction while running: /readyz, the log and a metric say so; the gateway serves on."""
    monkeypatch.setattr(wsgateway.server, "EVICTION_CHECK_INTERVAL_S", 0.1)
    store = redis.Redis.from_url(private_redis.url)
    store.config_set("maxmemory", "64mb")
    gateway = start_cluster_gateway(broker_url=private_redis.url)
    assert "warnings" not in gateway.get("/readyz").json
    store.config_set("maxmemory-policy", "allkeys-lru")
    wait_for(lambda: "warnings" in gateway.get("/readyz").json, what="the warning in /readyz")
    readiness = gateway.get("/readyz")
    assert readiness.status == 200
    assert "allkeys-lru" in readiness.json["warnings"]["redis_eviction"]
    assert gateway.metric("ws_redis_may_evict") == 1
    store.config_set("maxmemory-policy", "noeviction")
    wait_for(lambda: "warnings" not in gateway.get("/readyz").json, what="the warning gone")
    assert gateway.metric("ws_redis_may_evict") == 0
    store.close()


# --- a seat step's answer lost --------------------------------------------------------------------
@pytest.mark.parametrize("redis_after", ["reachable", "out of reach for a moment"])
def test_a_connection_whose_seat_steps_answer_was_lost_leaves_its_backlog_to_the_next(
        start_cluster_gateway, caplog, redis_after):
    """Redis seats a connection, but the answer never arrives: the connection closes with 1013
    (try again later) and the backlog that step took goes back to the player's queue, in
    order, for the next connection; when Redis is out of reach just then, as soon as it is back."""
    import logging

    import websocket

    from tests.support.clients import receive_close
    from tests.support.redis_server import relay_to_shared_redis, script_sha
    from wsgateway.roster_redis import TAKE_SEAT

    relay, relayed_url = relay_to_shared_redis()
    caplog.set_level(logging.WARNING, logger="wsgateway")

    def logged(event: str) -> bool:
        return any(getattr(record, "event", None) == event for record in caplog.records)

    try:
        publisher_side = start_cluster_gateway()
        player_side = start_cluster_gateway(broker_url=relayed_url)
        server, token = publisher_side.tokens.server(), publisher_side.tokens.player(21)
        player_side.connect(publisher_side.tokens.player(22)).close()  # TAKE_SEAT known to Redis
        for number in (1, 2):
            assert publisher_side.publish(server, 21, "queued", number).json["queued"] is True
        relay.lose_answer_to(script_sha(TAKE_SEAT), then_cut=redis_after != "reachable")
        client = websocket.create_connection(f"{player_side.ws_url}?token={token}", timeout=TIMEOUT_S)
        assert receive_close(client)[0] == 1013
        if redis_after != "reachable":
            wait_for(lambda: logged("cancel_deferred"), what="the seat's give-back waiting for Redis")
            relay.restore()
        wait_for(lambda: logged("backlog_given_back"), TIMEOUT_S * 2, what="the backlog given back")
        again = publisher_side.connect(token)
        assert [receive_event(again)["payload"] for _ in range(2)] == [1, 2]
    finally:
        relay.close()


# --- a rush of connections -------------------------------------------------------------------------
def test_a_rush_of_connections_waits_for_a_pooled_redis_connection_instead_of_a_503(start_cluster_gateway):
    """More players connecting at once than the Redis pool has connections (Redis slow for a moment):
    every one is admitted once Redis answers, none refused with 503."""
    import websocket

    from tests.support.redis_server import relay_to_shared_redis
    from wsgateway.redis_link import POOL_CONNECTIONS

    relay, relayed_url = relay_to_shared_redis()
    try:
        gateway = start_cluster_gateway(broker_url=relayed_url)
        tokens = [gateway.tokens.player(1000 + index) for index in range(POOL_CONNECTIONS + 50)]

        def connect(token: str) -> Any:
            try:
                return websocket.create_connection(f"{gateway.ws_url}?token={token}", timeout=TIMEOUT_S * 2)
            except websocket.WebSocketBadStatusException as refusal:
                return refusal.status_code

        relay.pause()  # Redis silent: every reserve() holds a pooled connection
        attempts = [gevent.spawn(connect, token) for token in tokens]
        wait_for(lambda: len(relay._sockets) >= POOL_CONNECTIONS or any(attempt.ready() for attempt in attempts),
                 what="the pool's connections all waiting on Redis")
        relay.resume()
        gevent.joinall(attempts, timeout=TIMEOUT_S * 4)
        results = [attempt.value for attempt in attempts]
        assert [result for result in results if isinstance(result, int) or result is None] == []
        for client in results:
            client.close()
    finally:
        relay.close()
