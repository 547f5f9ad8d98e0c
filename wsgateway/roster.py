"""Where players are and what they are owed: connection seats, the per-player limit, and
the decision, for each message, between live delivery and the offline queue.

This is the state that must be shared when several gateways act as one: a player is
offline only when no gateway holds a connection for it, `-max-conns` counts every
gateway, and a backlog is handed to exactly one connection. `LocalRoster` keeps it in
this process; `roster_redis.RedisRoster` keeps it in Redis for a cluster.

A connection's life in the roster: `reserve` (counts against the limit, before the
upgrade) -> `take_seat` (now present: live messages route to it; returns its backlog,
exactly once) -> `leave`. `cancel` gives back a reservation that never took its seat.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple, Protocol

from wsgateway.history import MemoryHistory, Stamped
from wsgateway.hub import Hub
from wsgateway.offline import Backlog, MemoryOfflineQueue

LOCAL_GATEWAY = ""  # the gateway id routes carry when there is only this process


class Seat(NamedTuple):
    """One connection's place in the roster."""

    player_id: str
    seat_id: str


class Route(NamedTuple):
    """Where a message for one player goes.

    `gateways` hold the player's connections (`connections` of them in all) and must get
    the message live. Otherwise it was `queued` (with `dropped` older messages pushed out of
    a full queue, and the oldest of any player's given up to keep all queues within their
    bounds) or, when queueing was not asked for or is off, it goes nowhere.

    `seats` (a shared roster only; None in process, where the publisher's turn sees the
    connections themselves): the seat ids of the connections it was routed to. Each gateway
    gives the message to those of its connections only, so a connection opened after the
    route (which took the queue's backlog instead) does not get it too, nor out of order.
    """

    gateways: frozenset[str]
    connections: int
    queued: bool = False
    dropped: int = 0  # older frames pushed out of the full queue
    expired: int = 0  # frames found expired in the queue while queueing this one
    over_total_bytes: int = 0  # frames given up for -max-offline-bytes (this one when not queued)
    over_total_players: int = 0  # frames of whole queues given up for -max-offline-players
    queueing_off: bool = False  # the player was offline, queueing was asked, and it is disabled
    stamped: Stamped | None = None  # the message with its id, when the roster keeps a history in process
    sent: bool = False  # the route step also put it on its way to `gateways` (history in Redis: one atomic step)
    seats: frozenset[str] | None = None  # the connections it was routed to (a shared roster)
    given_up_rerouted: int = 0  # of the frames given up above, copies routed again after their connection closed


class Census(NamedTuple):
    """Who is online: players with at least one connection, and their connections."""

    players: int
    connections: int


class Roster(Protocol):
    """Player presence and offline queues. Methods may block the calling greenlet on I/O
    (never the process) and raise `BrokerUnavailable` when shared state is out of reach."""

    gateway_id: str  # this gateway's, which its seat ids start with (`gateway/serial`)

    def reserve(self, player_id: str) -> Seat | None:
        """A seat for a new connection, or None when the player is at `-max-conns`."""

    def cancel(self, seat: Seat) -> tuple[int, int]:
        """Give back a seat whose connection was never seated: the reservation, and what
        `take_seat` did for it if it raised after all was done (its answer lost): the
        backlog it took goes back to the front of the queue. Returns (given up past
        -max-queued as it went back, of them copies routed again)."""

    def take_seat(self, seat: Seat) -> Backlog:
        """Make the seat present and return the player's backlog (empty for all but one
        of simultaneous takers). Live messages routed after this reach the seat's gateway."""

    def leave(self, seat: Seat) -> int:
        """The connection ended. Returns when its seat left, on the shared roster's clock
        (ms, the clock of the broker's `sent_at_ms`); 0 in process."""

    def route(self, player_id: str, frame: bytes, queue_if_offline: bool, keep: bool = True) -> Route:
        """Decide, atomically with presence, whether the frame goes live or to the queue.
        With a history, the same step gives the message its id and keeps it (`history`),
        so that a message has its id before it is sent or queued; `keep` False: not a
        new message (a close request, or a frame routed again), nothing is kept.

        Live means routed to the gateways that hold a connection of the player now. Across
        processes the frame travels on after this answer, and the connection may close
        before it arrives: that gateway then calls `requeue`, so a frame routed live is
        sent to a connection, or queued like any message for an offline player."""

    def requeue(self, player_id: str, frame: bytes, routed_to: frozenset[str], missed: frozenset[str],
                sent_at_ms: int = 0, to_queue: bool = False, queue: bool = True,
                stamped: Stamped | None = None) -> Route:
        """A frame routed live to the seats `routed_to` found the connections of the seats
        `missed` (this gateway's) gone or closing: those seats stop counting as present,
        and the copy they missed is routed again, to a connection the player opened since
        (a seat not in `routed_to`, one per seat missed; never when `to_queue`, a
        broadcast's copy), or else to
        the player's queue, for its next connection, even while other seats it was routed
        to are present (they got their own copies). Queued, it takes its place by
        `sent_at_ms` (when it was sent live), before what was queued for the player after
        it: in publish order. `queue` False (live connections only): never to the queue.
        `stamped`: the message as the history keeps it, if it does: queued, it is marked
        queued in the history in the same step, so that a connection resuming with an
        empty id gets it from its replay whenever it takes the queue."""

    def reach(self) -> int:
        """Connections on every gateway: what a broadcast is sent to."""

    def counted_at(self, number: int) -> dict[str, str]:
        """The seats (seat id -> player) this gateway's heartbeat numbered `number` set
        its broadcast count to (a roster that tells the broker's stream, see
        `Delivery._count_changed`)."""

    def refresh(self, force: bool = False) -> list[Seat]:
        """Keep this gateway's presence alive when due (or now, when `force`d); return the
        seats the shared state lost, for `restore`."""

    def restore(self, seats: list[Seat]) -> dict[str, Backlog]:
        """Make lost seats present again; returns, by player, what was queued meanwhile
        (as `take_seat` would): it belongs to the connections that were there all along."""

    def return_backlog(self, player_id: str, frames: list[bytes]) -> tuple[int, int]:
        """Put back a backlog `restore` took for a connection that closed meanwhile, at
        the front of the player's queue and in its order: everything in it was queued
        before anything queued since, and before any message routed live since. Past
        `-max-queued` its oldest are given up (counted like any queue overflow). Returns
        how many were given up, and of them the copies routed again."""

    def presence(self, player_id: str) -> int:
        """The player's connections on every gateway that took their seat: those a
        message would reach now (in Redis, a closing one counts until its handshake ends)."""

    def census(self) -> Census:
        """Players and connections on every gateway. Costs the same however many
        players are online (it never walks them)."""

    def maintain(self) -> tuple[int, int]:
        """Periodic upkeep (expire queued frames); returns frames expired, and of them
        the copies routed again after their connection closed (`requeue`)."""

    def close(self) -> None:
        """This gateway is leaving: forget what it registered."""


class LocalRoster:
    """`Roster` for a single gateway: presence is the hub, the queue is in memory.
    Nothing here yields, so route/take_seat are atomic by construction."""

    def __init__(self, hub: Hub, offline: MemoryOfflineQueue, max_conns_per_player: int) -> None:
        self.max_conns_per_player = max_conns_per_player  # 0 = unlimited
        self.gateway_id = LOCAL_GATEWAY
        self._hub = hub
        self._offline = offline
        self._reserved: dict[str, int] = {}
        self._seat_numbers = itertools.count(1)

    def reserve(self, player_id: str) -> Seat | None:
        held = self._hub.count_of(player_id) + self._reserved.get(player_id, 0)
        if self.max_conns_per_player and held >= self.max_conns_per_player:
            return None
        self._reserved[player_id] = self._reserved.get(player_id, 0) + 1
        return Seat(player_id, f"local/{next(self._seat_numbers)}")

    def cancel(self, seat: Seat) -> tuple[int, int]:
        left = self._reserved.get(seat.player_id, 0) - 1
        if left > 0:
            self._reserved[seat.player_id] = left
        else:
            self._reserved.pop(seat.player_id, None)
        return 0, 0  # take_seat never fails here

    def take_seat(self, seat: Seat) -> Backlog:
        self.cancel(seat)  # the hub now counts the connection itself
        return self._offline.take(seat.player_id)

    def leave(self, seat: Seat) -> int:
        return 0  # the hub forgets the connection; nothing else is kept per seat

    def route(self, player_id: str, frame: bytes, queue_if_offline: bool, keep: bool = True) -> Route:
        connections = self._hub.count_of(player_id)
        if connections:
            return Route(frozenset((LOCAL_GATEWAY,)), connections)
        if not queue_if_offline:
            return Route(frozenset(), 0)
        if not self._offline.enabled:
            return Route(frozenset(), 0, queueing_off=True)
        pushed = self._offline.push(player_id, frame)
        return Route(frozenset(), 0, queued=pushed.queued, dropped=pushed.over_player_bound,
                     over_total_bytes=pushed.over_total_bytes, over_total_players=pushed.over_total_players)

    def requeue(self, player_id: str, frame: bytes, routed_to: frozenset[str], missed: frozenset[str],
                sent_at_ms: int = 0, to_queue: bool = False, queue: bool = True,
                stamped: Stamped | None = None) -> Route:
        return self.route(player_id, frame, queue_if_offline=queue, keep=False)  # in the publisher's turn: in order

    def reach(self) -> int:
        return self._hub.connection_count()

    def counted_at(self, number: int) -> dict[str, str]:
        return {}  # never asked: the in-process broker counts broadcasts as it delivers them

    def refresh(self, force: bool = False) -> list[Seat]:
        return []  # presence is the hub itself: nothing to lose

    def restore(self, seats: list[Seat]) -> dict[str, Backlog]:
        return {}

    def return_backlog(self, player_id: str, frames: list[bytes]) -> tuple[int, int]:
        return 0, 0  # never asked: nothing is restored in process

    def presence(self, player_id: str) -> int:
        return self._hub.count_of(player_id)

    def census(self) -> Census:
        return Census(self._hub.player_count(), self._hub.connection_count())

    def maintain(self) -> tuple[int, int]:
        return self._offline.purge_expired(), 0  # nothing is routed again in process

    def close(self) -> None:
        pass


class HistoryLocalRoster(LocalRoster):
    """`LocalRoster` whose route step gives each new message its id and keeps it in the
    history (in process, nothing yields between the two): the Route carries the stamped
    frame. A roster without history stays `LocalRoster`, and costs nothing more."""

    def __init__(self, hub: Hub, offline: MemoryOfflineQueue, max_conns_per_player: int,
                 history: MemoryHistory) -> None:
        super().__init__(hub, offline, max_conns_per_player)
        self._history = history

    def route(self, player_id: str, frame: bytes, queue_if_offline: bool, keep: bool = True) -> Route:
        if not keep:
            return super().route(player_id, frame, queue_if_offline)
        stamped = self._history.record(player_id, frame)
        route = super().route(player_id, frame, queue_if_offline)
        if route.queued:
            self._history.note_queued(player_id, stamped)
        return route._replace(stamped=stamped)

    def requeue(self, player_id: str, frame: bytes, routed_to: frozenset[str], missed: frozenset[str],
                sent_at_ms: int = 0, to_queue: bool = False, queue: bool = True,
                stamped: Stamped | None = None) -> Route:
        route = super().requeue(player_id, frame, routed_to, missed, sent_at_ms, to_queue, queue)
        if route.queued and stamped is not None and stamped.player_seq:
            self._history.note_queued(player_id, stamped)
        return route
