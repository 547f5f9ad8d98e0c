"""The connections held by this process, by player.

Delivery here never blocks and never yields: `send()` on a connection only writes what
the kernel takes at once or appends to that connection's bounded outbox. So a fan-out
loop runs to its end without another greenlet changing the maps under it.
"""
from __future__ import annotations

from typing import Iterator, Protocol


class Deliverable(Protocol):
    """What the hub needs of a connection."""

    player_id: str
    token: str

    def send(self, frame: bytes) -> bool:
        """Queue a complete frame without blocking; False if the connection is closing."""


class Hub:
    """Local connections by player, with the per-player and the total connection limits.

    A connection is *reserved* (counted against both limits) from the moment its token
    is accepted until it is added or released, so concurrent connects cannot exceed a
    limit while they are being upgraded.
    """

    def __init__(self, max_conns_per_player: int, max_total_conns: int = 0) -> None:
        self.max_conns_per_player = max_conns_per_player  # 0 = unlimited
        self.max_total_conns = max_total_conns  # 0 = unlimited
        self._by_player: dict[str, list[Deliverable]] = {}
        self._reserved: dict[str, int] = {}
        self._reserved_total = 0
        self._count = 0

    def at_capacity(self) -> bool:
        """Whether connections and reservations together have reached `max_total_conns`."""
        return bool(self.max_total_conns) and self._count + self._reserved_total >= self.max_total_conns

    def reserve(self, player_id: str) -> bool:
        """Claim a connection slot for `player_id`; False when the player or the hub is at
        its limit (`at_capacity()` tells which)."""
        held = len(self._by_player.get(player_id, ())) + self._reserved.get(player_id, 0)
        if self.max_conns_per_player and held >= self.max_conns_per_player:
            return False
        if self.at_capacity():
            return False
        self._reserved[player_id] = self._reserved.get(player_id, 0) + 1
        self._reserved_total += 1
        return True

    def release(self, player_id: str) -> None:
        """Give back a reserved slot that will not become a connection."""
        held = self._reserved.get(player_id, 0)
        if not held:
            return
        self._reserved_total -= 1
        if held > 1:
            self._reserved[player_id] = held - 1
        else:
            del self._reserved[player_id]

    def add(self, connection: Deliverable) -> None:
        """Register a connection whose slot was reserved."""
        self.release(connection.player_id)
        self._by_player.setdefault(connection.player_id, []).append(connection)
        self._count += 1

    def remove(self, connection: Deliverable) -> None:
        """Forget a connection; removing one that is not held does nothing."""
        connections = self._by_player.get(connection.player_id)
        if not connections or connection not in connections:
            return
        connections.remove(connection)
        if not connections:
            del self._by_player[connection.player_id]
        self._count -= 1

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

    def connections(self) -> Iterator[Deliverable]:
        """A snapshot of every connection, safe to iterate while connections come and go."""
        return iter([connection for connections in self._by_player.values() for connection in connections])

    def connection_count(self) -> int:
        return self._count
