"""The connections held by this process, by player.

Delivery here never blocks and never yields: `send()` on a connection only writes what
the kernel takes at once or appends to that connection's bounded outbox. So a fan-out
loop runs to its end without another greenlet changing the maps under it. The hub
knows nothing of other gateways or of the broker: it is local by definition.
"""
from __future__ import annotations

from typing import Iterator, Protocol


class Deliverable(Protocol):
    """What the hub needs of a connection."""

    player_id: str
    token: str
    is_open: bool  # False once closing: it takes no more frames

    def send(self, frame: bytes) -> bool:
        """Queue a complete frame without blocking; False if the connection is closing."""


class Hub:
    """Local connections by player."""

    def __init__(self) -> None:
        self._by_player: dict[str, list[Deliverable]] = {}
        self._count = 0

    def add(self, connection: Deliverable) -> None:
        self._by_player.setdefault(connection.player_id, []).append(connection)
        self._count += 1

    def remove(self, connection: Deliverable) -> bool:
        """Forget a connection; False (and nothing done) when it was not held."""
        connections = self._by_player.get(connection.player_id)
        if not connections or connection not in connections:
            return False
        connections.remove(connection)
        if not connections:
            del self._by_player[connection.player_id]
        self._count -= 1
        return True

    def deliver(self, player_id: str, frame: bytes) -> int:
        """Hand `frame` to each of the player's connections; return how many took it."""
        return sum(connection.send(frame) for connection in self._by_player.get(player_id, ()))

    def broadcast(self, frame: bytes) -> int:
        """Hand `frame` to every connection; return how many took it."""
        delivered = 0
        for connections in self._by_player.values():
            for connection in connections:
                delivered += connection.send(frame)
        return delivered

    def is_connected(self, player_id: str) -> bool:
        return player_id in self._by_player

    def count_of(self, player_id: str) -> int:
        """How many open connections this process holds for `player_id` (closing ones
        would take nothing: a message for a player with only those is better queued)."""
        return sum(connection.is_open for connection in self._by_player.get(player_id, ()))

    def connections(self) -> Iterator[Deliverable]:
        """A snapshot of every connection, safe to iterate while connections come and go."""
        return iter([connection for connections in self._by_player.values() for connection in connections])

    def connection_count(self) -> int:
        return self._count
