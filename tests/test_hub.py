"""wsgateway.hub: local connections by player, and fan-out counts."""
from __future__ import annotations

from tests.helpers import FakeConnection
from wsgateway.hub import Hub


def connected(hub: Hub, player_id: str, **options) -> FakeConnection:
    """A connection added to the hub."""
    connection = FakeConnection(player_id, **options)
    hub.add(connection)
    return connection


def test_add_and_remove_accounting():
    """add() and remove() keep connection_count and is_connected right."""
    hub = Hub()
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
    hub = Hub()
    held = connected(hub, "p")
    hub.remove(held)
    hub.remove(held)
    hub.remove(FakeConnection("stranger"))
    assert hub.connection_count() == 0


def test_deliver_reaches_only_that_player():
    """deliver() hands the frame to each of the player's connections and no one else."""
    hub = Hub()
    mine = [connected(hub, "p"), connected(hub, "p")]
    other = connected(hub, "q")
    assert hub.deliver("p", b"frame") == 2
    assert [connection.frames for connection in mine] == [[b"frame"], [b"frame"]]
    assert other.frames == []


def test_deliver_counts_only_accepting_connections():
    """deliver() counts only the connections whose send returned True."""
    hub = Hub()
    connected(hub, "p")
    connected(hub, "p", accepting=False)
    assert hub.deliver("p", b"frame") == 1


def test_deliver_to_absent_player():
    """deliver() to a player without connections reaches nobody."""
    assert Hub().deliver("nobody", b"frame") == 0


def test_broadcast_counts_only_accepting_connections():
    """broadcast() reaches every connection and counts those whose send returned True."""
    hub = Hub()
    takers = [connected(hub, "p"), connected(hub, "q"), connected(hub, "q")]
    closing = connected(hub, "r", accepting=False)
    assert hub.broadcast(b"all") == 3
    assert all(connection.frames == [b"all"] for connection in takers)
    assert closing.frames == []


def test_connections_snapshot_safe_while_removing():
    """Iterating connections() while removing them visits every connection once."""
    hub = Hub()
    everyone = {connected(hub, player) for player in ("a", "a", "b", "c")}
    visited = set()
    for connection in hub.connections():
        visited.add(connection)
        hub.remove(connection)
    assert visited == everyone
    assert hub.connection_count() == 0
