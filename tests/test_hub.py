"""wsgateway.hub: local connections by player, the per-player limit, and fan-out counts."""
from __future__ import annotations

from tests.helpers import FakeConnection
from wsgateway.hub import Hub


def connected(hub: Hub, player_id: str, **options) -> FakeConnection:
    """A connection reserved and added the way the web face does it."""
    assert hub.reserve(player_id)
    connection = FakeConnection(player_id, **options)
    hub.add(connection)
    return connection


def test_add_and_remove_accounting():
    """add() and remove() keep connection_count and is_connected right."""
    hub = Hub(max_conns_per_player=0)
    first, second = connected(hub, "p"), connected(hub, "p")
    other = connected(hub, "q")
    assert hub.connection_count() == 3 and hub.is_connected("p")
    hub.remove(first)
    assert hub.connection_count() == 2 and hub.is_connected("p")
    hub.remove(second)
    assert hub.connection_count() == 1 and not hub.is_connected("p")
    hub.remove(other)
    assert hub.connection_count() == 0 and list(hub.connections()) == []


def test_remove_twice_or_unknown_is_harmless():
    """Removing a connection that is not held changes nothing."""
    hub = Hub(max_conns_per_player=0)
    held = connected(hub, "p")
    hub.remove(held)
    hub.remove(held)
    hub.remove(FakeConnection("stranger"))
    assert hub.connection_count() == 0


def test_limit_enforced():
    """A player at max_conns_per_player cannot reserve another slot until one is removed."""
    hub = Hub(max_conns_per_player=2)
    first = connected(hub, "p")
    connected(hub, "p")
    assert not hub.reserve("p")
    assert hub.reserve("q"), "the limit is per player"
    hub.remove(first)
    assert hub.reserve("p")


def test_reservations_count_against_limit():
    """Reserved slots that are not yet connections count toward the limit."""
    hub = Hub(max_conns_per_player=2)
    assert hub.reserve("p")
    assert hub.reserve("p")
    assert not hub.reserve("p")
    assert hub.connection_count() == 0, "reservations are not connections"


def test_release_gives_slot_back():
    """release() returns a reserved slot that will not become a connection."""
    hub = Hub(max_conns_per_player=1)
    assert hub.reserve("p")
    hub.release("p")
    assert hub.reserve("p")


def test_add_consumes_reservation():
    """add() turns the reservation into the connection: the slot is counted once, not twice."""
    hub = Hub(max_conns_per_player=2)
    connected(hub, "p")
    assert hub.reserve("p")
    assert not hub.reserve("p")


def test_release_without_reservation_is_harmless():
    """An extra release() does not create free slots beyond the limit."""
    hub = Hub(max_conns_per_player=1)
    hub.release("p")
    assert hub.reserve("p")
    assert not hub.reserve("p")


def test_zero_limit_is_unlimited():
    """max_conns_per_player 0 accepts any number of connections."""
    hub = Hub(max_conns_per_player=0)
    for _ in range(100):
        connected(hub, "p")
    assert hub.reserve("p")
    assert hub.connection_count() == 100


def test_deliver_reaches_only_that_player():
    """deliver() hands the frame to each of the player's connections and no one else."""
    hub = Hub(max_conns_per_player=0)
    mine = [connected(hub, "p"), connected(hub, "p")]
    other = connected(hub, "q")
    assert hub.deliver("p", b"frame") == 2
    assert [connection.frames for connection in mine] == [[b"frame"], [b"frame"]]
    assert other.frames == []


def test_deliver_counts_only_accepting_connections():
    """deliver() counts only the connections whose send returned True."""
    hub = Hub(max_conns_per_player=0)
    connected(hub, "p")
    connected(hub, "p", accepting=False)
    assert hub.deliver("p", b"frame") == 1


def test_deliver_to_absent_player():
    """deliver() to a player without connections reaches nobody."""
    assert Hub(max_conns_per_player=0).deliver("nobody", b"frame") == 0


def test_broadcast_counts_only_accepting_connections():
    """broadcast() reaches every connection and counts those whose send returned True."""
    hub = Hub(max_conns_per_player=0)
    takers = [connected(hub, "p"), connected(hub, "q"), connected(hub, "q")]
    closing = connected(hub, "r", accepting=False)
    assert hub.broadcast(b"all") == 3
    assert all(connection.frames == [b"all"] for connection in takers)
    assert closing.frames == []


def test_connections_snapshot_safe_while_removing():
    """Iterating connections() while removing them visits every connection once."""
    hub = Hub(max_conns_per_player=0)
    everyone = {connected(hub, player) for player in ("a", "a", "b", "c")}
    visited = set()
    for connection in hub.connections():
        visited.add(connection)
        hub.remove(connection)
    assert visited == everyone
    assert hub.connection_count() == 0


def test_total_limit_counts_connections_and_reservations():
    """With max_total_conns, connections and reservations of all players together are capped."""
    hub = Hub(max_conns_per_player=0, max_total_conns=3)
    first = connected(hub, "p")
    connected(hub, "q")
    assert hub.reserve("r")
    assert hub.at_capacity()
    assert not hub.reserve("s")
    hub.release("r")
    assert not hub.at_capacity() and hub.reserve("s")
    hub.remove(first)
    assert hub.reserve("p"), "a removed connection frees its place"


def test_zero_total_limit_is_unlimited():
    """max_total_conns 0 never reports capacity reached."""
    hub = Hub(max_conns_per_player=0, max_total_conns=0)
    for index in range(100):
        connected(hub, str(index))
    assert not hub.at_capacity()
