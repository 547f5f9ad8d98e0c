"""The connections held by this process, by player.

The hub knows nothing of other gateways or of the broker: it is local by definition.

Delivery here never blocks: `send()` on a connection only writes what the kernel takes at
once or appends to that connection's bounded outbox. A publish to one player runs to its
end without yielding. A broadcast to many connections is cut into slices of
`broadcast_slice` connections, and between two slices the hub calls `pause()` (the
gateway passes one turn of the event loop, `scheduling.let_io_in`), so that a broadcast
to thousands of players does not hold up other publishes while it is delivered.

A broadcast hands its frame to `send_later`: the connections queue it and one writer
sends each socket's queue in one syscall, so a burst of broadcasts costs few sends per
socket. A publish to one player uses `send`, which writes at once when nothing is queued;
the messages of a batch use `send_later`, like broadcasts.

Ordering survives the pauses. A broadcast goes to a snapshot of the connections taken
when it starts; while it is unfinished, it remembers which of them it still owes the
frame. Anything sent through the hub to such a connection meanwhile (a publish, another
broadcast) first hands it the frames of the unfinished broadcasts it is owed, oldest
first. So on every socket, a message published after a broadcast started never arrives
before that broadcast's frame, and no connection gets a broadcast twice.

A connection that asked for ids (`wants_ids`, see `history`) gets a message's `stamped`
frame, the same message with its id, built once for all of them; the others get `frame`.
With no history there is no `stamped` frame and nothing is looked at per connection.
"""
from __future__ import annotations

from typing import Callable, Iterator, Protocol

from wsgateway.errors import CloseCode

BROADCAST_SLICE = 4096  # connections a broadcast queues its frame on between two pauses


class Deliverable(Protocol):
    """What the hub needs of a connection."""

    player_id: str
    token: str
    is_open: bool  # False once closing: it takes no more frames
    wants_ids: bool  # it gets messages with their ids (the `stamped` frames), see `history`

    def send(self, frame: bytes) -> bool:
        """Queue a complete frame without blocking; False if the connection is closing."""

    def send_later(self, frame: bytes) -> bool:
        """Like `send`, but the frame may wait for a shared writer, after anything sent
        before it: many connections are served by one pass, and a burst of frames to one
        connection leaves together."""


class Hub:
    """Local connections by player."""

    def __init__(self, *, pause: Callable[[], None] | None = None,
                 broadcast_slice: int = BROADCAST_SLICE) -> None:
        self.pause = pause  # None: a broadcast never pauses (runs to its end at once)
        self.broadcast_slice = broadcast_slice
        self._by_player: dict[str, list[Deliverable]] = {}
        self._count = 0
        self._unfinished: list[_UnfinishedBroadcast] = []  # paused broadcasts, oldest first

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
        for broadcast in self._unfinished:
            broadcast.owed.discard(connection)
        return True

    def deliver(self, player_id: str, frame: bytes, later: bool = False, stamped: bytes | None = None) -> int:
        """Hand `frame` (`stamped` to those that want ids) to each of the player's
        connections; return how many took it.

        `later`: queue it for the flusher (`send_later`) instead of writing at once. A
        batch of messages to random players then costs one send per socket rather than
        one per message whenever its frames, or those of concurrent batches, meet on a
        socket, and the batch is answered before its frames are written."""
        connections = self._by_player.get(player_id)
        if not connections:
            return 0
        return self.deliver_to(connections, frame, later, stamped)

    def deliver_to(self, connections: list[Deliverable], frame: bytes, later: bool = False,
                   stamped: bytes | None = None) -> int:
        """`deliver` to some of a player's connections (those a message was routed to),
        held by this hub; return how many took it."""
        if self._unfinished:
            for connection in connections:
                self._catch_up(connection, None)
        if stamped is not None:
            if later:
                return sum(connection.send_later(stamped if connection.wants_ids else frame)
                           for connection in connections)
            return sum(connection.send(stamped if connection.wants_ids else frame) for connection in connections)
        if later:
            return sum(connection.send_later(frame) for connection in connections)
        return sum(connection.send(frame) for connection in connections)

    def broadcast(self, frame: bytes, stamped: bytes | None = None, to: list[Deliverable] | None = None) -> int:
        """Hand `frame` (`stamped` to those that want ids) to every connection present
        now, or to those of `to` (held by this hub: those a broadcast was counted for);
        return how many took it. May call `pause()` between slices of connections (see
        the module docstring)."""
        snapshot = list(to) if to is not None else \
            [connection for connections in self._by_player.values() for connection in connections]
        if self.pause is None or len(snapshot) <= self.broadcast_slice:
            delivered = 0
            if stamped is not None:
                for connection in snapshot:
                    if self._unfinished:
                        self._catch_up(connection, None)
                    delivered += connection.send_later(stamped if connection.wants_ids else frame)
                return delivered
            for connection in snapshot:
                if self._unfinished:
                    self._catch_up(connection, None)
                delivered += connection.send_later(frame)
            return delivered
        broadcast = _UnfinishedBroadcast(frame, set(snapshot), stamped)
        self._unfinished.append(broadcast)
        try:
            for start in range(0, len(snapshot), self.broadcast_slice):
                if start:
                    self.pause()
                owed = broadcast.owed
                for connection in snapshot[start:start + self.broadcast_slice]:
                    if connection in owed:  # else a publish caught it up during a pause
                        self._catch_up(connection, broadcast)
                        owed.discard(connection)
                        broadcast.delivered += connection.send_later(broadcast.frame_for(connection))
        finally:
            self._unfinished.remove(broadcast)
        return broadcast.delivered

    def _catch_up(self, connection: Deliverable, until: _UnfinishedBroadcast | None) -> None:
        """Send `connection` the frames it is owed by unfinished broadcasts older than
        `until` (all of them when None), oldest first."""
        for broadcast in self._unfinished:
            if broadcast is until:
                return
            if connection in broadcast.owed:
                broadcast.owed.discard(connection)
                broadcast.delivered += connection.send_later(broadcast.frame_for(connection))

    def close_player(self, player_id: str, code: CloseCode) -> int:
        """Start closing each of the player's open connections with `code`; return how
        many. Each leaves the hub once its close handshake ends."""
        closing = [connection for connection in self._by_player.get(player_id, ()) if connection.is_open]
        for connection in closing:
            connection.close(code)
        return len(closing)

    def is_connected(self, player_id: str) -> bool:
        return player_id in self._by_player

    def count_of(self, player_id: str) -> int:
        """How many open connections this process holds for `player_id` (closing ones
        would take nothing: a message for a player with only those is better queued)."""
        count = 0
        for connection in self._by_player.get(player_id, ()):  # a loop: this is on every publish
            if connection.is_open:
                count += 1
        return count

    def connections(self) -> Iterator[Deliverable]:
        """A snapshot of every connection, safe to iterate while connections come and go."""
        return iter([connection for connections in self._by_player.values() for connection in connections])

    def connection_count(self) -> int:
        return self._count

    def player_count(self) -> int:
        """Players with at least one connection here."""
        return len(self._by_player)


class _UnfinishedBroadcast:
    """A broadcast between two slices: its frame, and the connections still owed it."""

    __slots__ = ("frame", "owed", "delivered", "stamped")

    def __init__(self, frame: bytes, owed: set[Deliverable], stamped: bytes | None = None) -> None:
        self.frame = frame
        self.owed = owed
        self.delivered = 0  # connections that took the frame, caught up ones included
        self.stamped = stamped

    def frame_for(self, connection: Deliverable) -> bytes:
        return self.stamped if self.stamped is not None and connection.wants_ids else self.frame
