"""wsgateway.roster.LocalRoster: seats, the per-player limit, and live-or-queued routing."""
from __future__ import annotations

from tests.support.fakes import FakeClock, FakeConnection
from wsgateway.hub import Hub
from wsgateway.offline import MemoryOfflineQueue
from wsgateway.roster import LOCAL_GATEWAY, LocalRoster


def roster(max_conns: int = 2, max_queued: int = 10, ttl_s: float = 10.0) -> tuple[LocalRoster, Hub]:
    hub = Hub()
    return LocalRoster(hub, MemoryOfflineQueue(max_queued, ttl_s, clock=FakeClock()), max_conns), hub


def seated(local: LocalRoster, hub: Hub, player_id: str) -> FakeConnection:
    """Reserve, add to the hub and take the seat, as delivery.connect does."""
    seat = local.reserve(player_id)
    assert seat is not None
    connection = FakeConnection(player_id)
    hub.add(connection)
    local.take_seat(seat)
    return connection


def test_limit_counts_connections_and_reservations():
    """A player at the limit, counting live connections and pending reservations, gets no seat."""
    local, hub = roster(max_conns=2)
    seated(local, hub, "p")
    assert local.reserve("p") is not None
    assert local.reserve("p") is None
    assert local.reserve("q") is not None, "the limit is per player"


def test_cancel_gives_the_seat_back():
    """A cancelled reservation frees its place under the limit."""
    local, _ = roster(max_conns=1)
    seat = local.reserve("p")
    assert seat is not None and local.reserve("p") is None
    local.cancel(seat)
    assert local.reserve("p") is not None


def test_removed_connection_frees_its_place():
    """Once the hub forgets a connection, the player may connect again."""
    local, hub = roster(max_conns=1)
    connection = seated(local, hub, "p")
    assert local.reserve("p") is None
    hub.remove(connection)
    assert local.reserve("p") is not None


def test_zero_limit_is_unlimited():
    """max_conns 0 never refuses a seat."""
    local, _ = roster(max_conns=0)
    assert all(local.reserve("p") is not None for _ in range(100))


def test_route_live_when_connected_else_queued():
    """A connected player's message goes live to this gateway; an absent player's is queued."""
    local, hub = roster()
    seated(local, hub, "p")
    assert local.route("p", b"f", True).gateways == frozenset((LOCAL_GATEWAY,))
    route = local.route("q", b"f", True)
    assert route.queued and not route.gateways
    assert local.take_seat(local.reserve("q")).frames == [b"f"]


def test_route_without_queueing_goes_nowhere():
    """Broadcast-style routing never queues for an absent player."""
    local, _ = roster()
    route = local.route("q", b"f", False)
    assert not route.queued and not route.gateways and not route.queueing_off


def test_closing_connections_do_not_count_as_present():
    """A player whose only connection is closing gets its message queued, not lost."""
    local, hub = roster()
    seated(local, hub, "p").accepting = False
    assert local.route("p", b"f", True).queued
