"""wsgateway.delivery: publish, broadcast, offline queueing and backlog, with exact metrics."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from tests.support.fakes import FakeClock, FakeConnection
from wsgateway.broker import COUNTED_BROADCAST, Envelope, InProcessBroker
from wsgateway.delivery import Delivery, Outcome
from wsgateway.hub import Hub
from wsgateway.metrics import GatewayMetrics
from wsgateway.offline import MemoryOfflineQueue
from wsgateway.roster import LocalRoster


@dataclass
class Rig:
    """A Delivery wired to a real hub, an in-memory offline queue on a fake clock and fresh metrics."""

    delivery: Delivery
    offline: MemoryOfflineQueue
    clock: FakeClock
    metrics: GatewayMetrics
    seats: dict = field(default_factory=dict)

    def connect(self, player_id: str, **options) -> FakeConnection:
        """A connection that reserved its seat and was connected, as the web face does it."""
        seat = self.delivery.roster.reserve(player_id)
        assert seat is not None
        connection_class = options.pop("connection_class", FakeConnection)
        connection = connection_class(player_id, **options)
        self.delivery.connect(connection, seat)
        self.seats[id(connection)] = seat
        return connection

    def disconnect(self, connection: FakeConnection) -> None:
        self.delivery.disconnect(connection, self.seats.pop(id(connection)))

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def dropped(self, reason: str) -> float:
        return self.metric("ws_messages_dropped_total", reason=reason)


def rig(max_queued: int = 100, offline_ttl_s: float = 10.0) -> Rig:
    clock = FakeClock()
    offline = MemoryOfflineQueue(max_queued, offline_ttl_s, clock=clock)
    metrics = GatewayMetrics(CollectorRegistry())
    hub = Hub()
    delivery = Delivery(hub, LocalRoster(hub, offline, max_conns_per_player=0), InProcessBroker(), metrics)
    return Rig(delivery, offline, clock, metrics)


@pytest.fixture
def gateway() -> Rig:
    return rig()


def test_publish_to_connected_player(gateway):
    """A message for a connected player reaches each of its connections and nobody else."""
    first, second = gateway.connect("p"), gateway.connect("p")
    other = gateway.connect("q")
    assert gateway.delivery.publish("p", b"f1") == Outcome(delivered=2, queued=False)
    assert first.frames == second.frames == [b"f1"] and other.frames == []
    assert gateway.metric("ws_messages_published_total") == 1
    assert gateway.metric("ws_messages_delivered_total") == 2
    assert len(gateway.offline) == 0


def test_publish_to_offline_player_is_queued(gateway):
    """A message for a player with no connection is queued and counted as queued."""
    assert gateway.delivery.publish("p", b"f1") == Outcome(delivered=0, queued=True)
    assert len(gateway.offline) == 1
    assert gateway.metric("ws_messages_queued_total") == 1
    assert gateway.metric("ws_messages_delivered_total") == 0


def test_publish_to_player_whose_connections_are_closing_is_queued(gateway):
    """When every connection of the player refuses the frame (closing), the message is queued."""
    gateway.connect("p", accepting=False)
    assert gateway.delivery.publish("p", b"f1") == Outcome(delivered=0, queued=True)
    assert gateway.metric("ws_messages_queued_total") == 1


def test_connect_sends_backlog_in_order_before_live_messages(gateway):
    """On connect the backlog arrives in publish order, before any later message; the queue empties."""
    for frame in (b"f1", b"f2", b"f3"):
        gateway.delivery.publish("p", frame)
    connection = gateway.connect("p")
    assert connection.frames == [b"f1", b"f2", b"f3"]
    assert len(gateway.offline) == 0
    gateway.delivery.publish("p", b"live")
    assert connection.frames == [b"f1", b"f2", b"f3", b"live"]
    assert gateway.metric("ws_messages_delivered_total") == 4


def test_backlog_goes_to_first_connection_only(gateway):
    """The backlog is handed over once: a second connection of the player does not get it again."""
    gateway.delivery.publish("p", b"f1")
    first, second = gateway.connect("p"), gateway.connect("p")
    assert (first.frames, second.frames) == ([b"f1"], [])


def test_broadcast_reaches_everyone_and_never_queues(gateway):
    """broadcast goes to every connection and is never queued for offline players."""
    connections = [gateway.connect("p"), gateway.connect("q")]
    assert gateway.delivery.broadcast(b"all") == Outcome(delivered=2, queued=False)
    assert all(connection.frames == [b"all"] for connection in connections)
    assert len(gateway.offline) == 0


def test_a_broadcast_counts_only_the_connections_it_was_handed_to(gateway):
    """A connection still held but closing takes no broadcast, and is not counted in its answer."""
    staying, closing = gateway.connect("p"), gateway.connect("q")
    closing.accepting = False
    assert gateway.delivery.broadcast(b"all") == Outcome(delivered=1, queued=False)
    assert staying.frames == [b"all"] and closing.frames == []


class ClosingAsTooSlow(FakeConnection):
    """Open until it is handed a frame, which it refuses as it closes (its outbox full)."""

    def send_later(self, frame: bytes) -> bool:
        self.accepting = False
        return False


def test_a_counted_broadcast_queues_one_copy_per_counted_connection_it_missed(gateway):
    """A broadcast counted (by the stream's count entries) for a connection already closing
    and one that closes as it is handed the frame: each missed copy is routed again once."""
    delivery = gateway.delivery
    closing, refusing, taking = (gateway.connect("a"), gateway.connect("b", connection_class=ClosingAsTooSlow),
                                 gateway.connect("c"))
    for connection in (closing, refusing, taking):
        seat = gateway.seats[id(connection)]
        delivery._receive(Envelope(b"", count_change=f"+{seat.seat_id}\n{seat.player_id}"))
    closing.accepting = False
    assert delivery._receive(Envelope(b"all", count_change=COUNTED_BROADCAST, sent_at_ms=1)) == 1
    assert taking.frames == [b"all"]
    assert gateway.metric("ws_messages_rerouted_total") == 2


def test_broadcast_with_nobody_connected_is_not_queued(gateway):
    """A broadcast with no connection anywhere reaches nobody and queues nothing."""
    assert gateway.delivery.broadcast(b"all") == Outcome(delivered=0, queued=False)
    assert len(gateway.offline) == 0
    assert gateway.metric("ws_messages_queued_total") == 0


def test_broadcast_to_one_player(gateway):
    """broadcast with a player id reaches only that player's live connections."""
    mine, other = gateway.connect("p"), gateway.connect("q")
    assert gateway.delivery.broadcast(b"yours", player_id="p") == Outcome(delivered=1)
    assert (mine.frames, other.frames) == ([b"yours"], [])


def test_broadcast_to_offline_player_is_not_queued(gateway):
    """broadcast with the id of an offline player queues nothing."""
    assert gateway.delivery.broadcast(b"x", player_id="p") == Outcome(delivered=0, queued=False)
    assert len(gateway.offline) == 0


def test_published_counts_publish_and_broadcast(gateway):
    """ws_messages_published counts every publish and broadcast call."""
    gateway.delivery.publish("p", b"1")
    gateway.delivery.broadcast(b"2")
    gateway.delivery.broadcast(b"3", player_id="p")
    assert gateway.metric("ws_messages_published_total") == 3


def test_queue_full_drops_counted():
    """Each message pushed out of a full offline queue is counted as dropped (offline_queue_full)."""
    gateway = rig(max_queued=2)
    for frame in (b"f1", b"f2", b"f3", b"f4"):
        assert gateway.delivery.publish("p", frame).queued
    assert gateway.dropped("offline_queue_full") == 2
    assert gateway.metric("ws_messages_queued_total") == 4
    assert gateway.connect("p").frames == [b"f3", b"f4"]


def test_expired_backlog_dropped_on_connect(gateway):
    """Messages whose TTL ran out are not delivered on connect and are counted (offline_expired)."""
    gateway.delivery.publish("p", b"old")
    gateway.clock.now += 6
    gateway.delivery.publish("p", b"new")
    gateway.clock.now += 5
    assert gateway.connect("p").frames == [b"new"]
    assert gateway.dropped("offline_expired") == 1
    assert len(gateway.offline) == 0


def test_expired_messages_dropped_on_purge(gateway):
    """maintain() frees expired offline messages and counts them (offline_expired)."""
    gateway.delivery.publish("p", b"1")
    gateway.delivery.publish("q", b"2")
    gateway.clock.now += 10
    gateway.delivery.maintain()
    assert len(gateway.offline) == 0
    assert gateway.dropped("offline_expired") == 2
    assert gateway.connect("p").frames == []


@pytest.mark.parametrize("max_queued, ttl_s", [(0, 10.0), (100, 0.0)])
def test_offline_disabled_drops_counted(max_queued, ttl_s):
    """With offline queueing off, a message for an offline player is dropped and counted (offline_disabled)."""
    gateway = rig(max_queued=max_queued, offline_ttl_s=ttl_s)
    assert gateway.delivery.publish("p", b"lost") == Outcome(delivered=0, queued=False)
    assert gateway.dropped("offline_disabled") == 1
    assert gateway.metric("ws_messages_queued_total") == 0
    assert len(gateway.offline) == 0


def test_disconnect_stops_delivery(gateway):
    """After disconnect a player's messages are queued again instead of delivered."""
    connection = gateway.connect("p")
    gateway.disconnect(connection)
    assert gateway.delivery.publish("p", b"later") == Outcome(delivered=0, queued=True)
    assert connection.frames == []
