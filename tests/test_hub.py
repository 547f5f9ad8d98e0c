"""wsgateway.hub: local connections by player, and fan-out counts."""
from __future__ import annotations

from typing import Callable

from tests.support.fakes import FakeConnection
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


# --- broadcasts in slices -------------------------------------------------------------------------
class Pauses:
    """A hub `pause` that runs the test's actions at chosen pauses of a broadcast."""

    def __init__(self) -> None:
        self.count = 0
        self.actions: dict[int, Callable[[], None]] = {}

    def __call__(self) -> None:
        self.count += 1
        action = self.actions.get(self.count)
        if action is not None:
            action()


def sliced_hub(pauses: Pauses, slice_size: int = 2) -> Hub:
    return Hub(pause=pauses, broadcast_slice=slice_size)


def test_broadcast_pauses_between_slices():
    """A broadcast to more connections than a slice pauses between slices and still reaches everyone once."""
    pauses = Pauses()
    hub = sliced_hub(pauses, slice_size=2)
    everyone = [connected(hub, f"p{index}") for index in range(5)]
    assert hub.broadcast(b"all") == 5
    assert pauses.count == 2  # slices of 2, 2 and 1
    assert all(connection.frames == [b"all"] for connection in everyone)


def test_broadcast_within_one_slice_never_pauses():
    """A broadcast to at most one slice of connections does not pause."""
    pauses = Pauses()
    hub = sliced_hub(pauses, slice_size=4)
    for index in range(4):
        connected(hub, f"p{index}")
    assert hub.broadcast(b"all") == 4
    assert pauses.count == 0


def test_publish_during_a_paused_broadcast_does_not_overtake_it():
    """A publish to a connection the paused broadcast has not reached yet arrives after the broadcast frame, which is not sent twice."""
    pauses = Pauses()
    hub = sliced_hub(pauses, slice_size=2)
    first, second, late = connected(hub, "a"), connected(hub, "b"), connected(hub, "c")
    results = []
    pauses.actions[1] = lambda: results.append(hub.deliver("c", b"later"))
    assert hub.broadcast(b"all") == 3
    assert results == [1]
    assert late.frames == [b"all", b"later"]
    assert first.frames == second.frames == [b"all"]


def test_publish_to_a_connection_already_served_goes_straight_through():
    """A publish during a pause to a connection the broadcast already served is sent at once, after it."""
    pauses = Pauses()
    hub = sliced_hub(pauses, slice_size=2)
    early = connected(hub, "a")
    connected(hub, "b"), connected(hub, "c")
    pauses.actions[1] = lambda: hub.deliver("a", b"later")
    hub.broadcast(b"all")
    assert early.frames == [b"all", b"later"]


def test_overlapping_broadcasts_keep_their_order_everywhere():
    """A broadcast started during another one's pause reaches every connection after the first one's frame."""
    pauses = Pauses()
    hub = sliced_hub(pauses, slice_size=2)
    everyone = [connected(hub, f"p{index}") for index in range(5)]
    second_result = []
    pauses.actions[1] = lambda: second_result.append(hub.broadcast(b"second"))
    assert hub.broadcast(b"first") == 5
    assert second_result == [5]
    assert all(connection.frames == [b"first", b"second"] for connection in everyone)


def test_connection_added_during_a_paused_broadcast_does_not_get_it():
    """A connection that joins while a broadcast is paused is not sent it (it was not there when it was published)."""
    pauses = Pauses()
    hub = sliced_hub(pauses, slice_size=1)
    connected(hub, "a"), connected(hub, "b")
    newcomer = []
    pauses.actions[1] = lambda: newcomer.append(connected(hub, "c"))
    assert hub.broadcast(b"all") == 2
    assert newcomer[0].frames == []
    assert hub.deliver("c", b"live") == 1 and newcomer[0].frames == [b"live"]


def test_connection_closing_during_a_paused_broadcast_is_not_counted():
    """A connection that starts closing during a pause refuses the frame and is not counted as delivered."""
    pauses = Pauses()
    hub = sliced_hub(pauses, slice_size=1)
    connected(hub, "a")
    leaving = connected(hub, "b")

    def close() -> None:
        leaving.accepting = False
        hub.remove(leaving)
    pauses.actions[1] = close
    assert hub.broadcast(b"all") == 1
    assert leaving.frames == []
