"""Getting one encoded message to its players: the fan-out logic, written once for every
broker. The roster decides live or queued, the broker carries live messages to the
gateways that hold the player, and each gateway hands them to its own connections.

Nothing here blocks. A broadcast may yield between slices of connections (the hub keeps
each socket's order across its pauses). `connect` holds the new connection's live frames
behind its backlog, so the backlog comes first even when fetching it yields (Redis).

When the shared broker is unreachable, this gateway's own players still get their
messages (`scope: local` in the answer); what would need the broker is refused with
`BrokerUnavailable` rather than answered 200.

What `delivered` promises across processes: the message was routed to that many
connections, named by their seats, and each one's gateway sends it to that connection
(and to no other of the player's: one opened since took the queue's backlog instead) or,
when the connection closed while the message travelled, routes that copy again
(`Roster.requeue`): to a connection the player opened since (one per connection that
missed it), or to the player's offline queue for its next connection, like any message
for an offline player. A copy routed again never arrives after a later message of its
player's: a connection takes it only while it has been sent nothing of its player's but
such copies from the same gateway (`_admit_rerouted`); else it is given up, counted
(`rerouted_out_of_order`). Nothing routed live is dropped without being counted. Presence the
shared roster lost (Redis restarted, flushed, or evicted a key) is written back within
one heartbeat (`reassert_presence`), and what was queued meanwhile for a player who was
connected all along goes to that connection, before any later live message.

With a history (`history`), a message has its id from the roster's route step and the
hub hands its stamped frame to the connections that asked for ids; a connection that
resumes (`connect` with `last_event_id`) is sent the history's replay instead of its
backlog, then live frames, none twice.

Closing a player's connections (`close_player`) travels like a message: its envelope
carries a WebSocket close frame, and the gateway that receives it closes the player's
sockets with that frame's code instead of sending it (see `broker.Envelope`). So every
broker carries it as it carries a publish, and nothing in a broker knows about it. It
is never routed again: a connection that is gone has nothing left to close.
"""
from __future__ import annotations

import logging
import struct
from collections import deque
from typing import NamedTuple, Protocol

from gevent.lock import BoundedSemaphore

from wsgateway.broker import COUNTED_BROADCAST, UNCOUNTED_BROADCAST, Broker, Envelope
from wsgateway.errors import BrokerUnavailable, CloseCode
from wsgateway.frames import OP_CLOSE, close_frame
from wsgateway.history import MISSED_EVENT, REASON_OFF, History, Stamped, StreamPoint, missed_notice, restamp
from wsgateway.hub import Deliverable, Hub
from wsgateway.metrics import (DROP_CONNECTION_GONE, DROP_OFFLINE_BYTES_LIMIT, DROP_OFFLINE_DISABLED,
                               DROP_OFFLINE_EXPIRED, DROP_OFFLINE_FULL, DROP_OFFLINE_PLAYERS_LIMIT,
                               DROP_REROUTED_OUT_OF_ORDER, DROP_SLOW_CONSUMER, GIVEN_UP_IN_QUEUE,
                               GIVEN_UP_OUT_OF_ORDER, RESUME_MISSED, RESUME_RECOVERED, GatewayMetrics)
from wsgateway.offline import Backlog
from wsgateway.protocol import event_frame
from wsgateway.roster import Roster, Route, Seat

log = logging.getLogger(__name__)

RECENTLY_LEFT_KEEP_MS = 60_000  # how long a seat that left is remembered for broadcasts still on their way
RECENTLY_LEFT_MAX = 100_000  # and how many such seats at most
MAX_CANCELS_DUE = 10_000  # seats waiting for Redis to be given back (`Delivery.cancel`)

_CLOSE_FRAME_FIRST_BYTE = 0x80 | OP_CLOSE  # FIN + close: what `close_frame` starts with


class Outcome(NamedTuple):
    """What became of a message: connections it was sent to, whether it was queued, and
    whether only this gateway's connections could be reached."""

    delivered: int
    queued: bool = False
    local_only: bool = False


class HeldConnection(Deliverable, Protocol):
    """What `connect` needs beyond the hub's view: holding live frames behind the backlog."""

    def hold(self) -> None: ...

    def release(self, first: list[bytes], replayed: frozenset[str] = frozenset(),
                through: StreamPoint | None = None) -> int: ...


class Delivery:
    """Publishes messages and delivers the broker's envelopes to local connections."""

    def __init__(self, hub: Hub, roster: Roster, broker: Broker, metrics: GatewayMetrics,
                 notify_missed: bool = False, history: History | None = None) -> None:
        """`notify_missed`: a connection that takes a backlog from a queue that lost
        messages first gets `{"event": "gateway.missed", "payload": {"dropped", "expired"}}`.
        `history`: messages kept with their ids, for connections that resume (None: off)."""
        self.hub = hub
        self.history = history
        self.notify_missed = notify_missed
        self.roster = roster
        self.metrics = metrics
        self._broker = broker
        self._seated: dict[str, HeldConnection] = {}  # seat id -> its connection, once seated
        self._leaving: dict[str, str] = {}  # seat id -> player, of connections gone whose seat is leaving
        self._left: deque[tuple[int, str, str]] = deque()  # (left at ms, seat id, player) recently left
        # seat id -> player: the seats this gateway's broadcast count holds, as far as its
        # stream has been read (a broker that counts broadcasts per gateway, see `_count_changed`)
        self._counted: dict[str, str] = {}
        # The connections that have been sent nothing of their player's since they opened
        # but copies routed again by one gateway: player -> {seat id: that gateway, "" for
        # none yet}. Only these take a copy routed again (see `_admit_rerouted`).
        self._fresh: dict[str, dict[str, str]] = {}
        # seat id -> the copies routed again that came for it while its backlog was taken
        self._taking: dict[str, list[Envelope]] = {}
        self._restoring = BoundedSemaphore()  # one presence restoration at a time (each holds sockets)
        # seat id -> seat: seats never handed to a connection whose `cancel` could not reach
        # the roster, tried again by `maintain` (at most MAX_CANCELS_DUE, the oldest forgotten)
        self._cancels_due: dict[str, Seat] = {}
        broker.start(self._receive)

    def publish(self, player_id: str, frame: bytes, batched: bool = False) -> Outcome:
        """To every connection of one player, on any gateway, or to its offline queue.
        `batched`: one of a batch; this gateway's sockets may get it a moment later,
        together with the batch's other frames (`Envelope.batched`)."""
        self.metrics.messages_published.inc()
        return self._to_player(player_id, frame, queue_if_offline=True, batched=batched)

    def broadcast(self, frame: bytes, player_id: str | None = None) -> Outcome:
        """To every connected player, or to one player's live connections (never queued).

        A broadcast to all answers the connections it was counted for, and goes to exactly
        those: in process, the open connections it was handed to; across gateways on one
        Redis, those its gateways' counts held in the step that appended it (a connection
        seated a moment later gets nothing, and is not counted); on a Redis Cluster, the
        roster's reach taken just before it is sent (a connection opening meanwhile may
        get it uncounted). It is not queued, except across gateways for a connection its
        answer counted that closed or left before the copy reached it: that copy waits in
        the player's queue, so what `delivered` counted is not lost."""
        self.metrics.messages_published.inc()
        if player_id is not None:
            return self._to_player(player_id, frame, queue_if_offline=False, batched=False)
        try:
            if self.history is not None and self.history.sends:
                return Outcome(self.history.send_broadcast(frame))
            reach = None if self._broker.counts_broadcasts else self.roster.reach()
            stamped = self.history.record_broadcast(frame) if self.history is not None else None
            counted = self._broker.publish(Envelope(frame, stamped=stamped))
        except BrokerUnavailable:
            return Outcome(self._deliver_locally(Envelope(frame)), local_only=True)
        return Outcome(counted if counted is not None else reach or 0)

    def close_player(self, player_id: str, code: CloseCode) -> int:
        """Close every connection of one player, on any gateway, with `code`; return how
        many the roster knew at that moment (as `Roster.presence`). Each gateway starts
        the closing handshakes as soon as the envelope reaches it; a connection still
        being set up (not yet seated) is not among them. Never queued."""
        route = self.roster.route(player_id, b"", queue_if_offline=False, keep=False)
        if route.gateways:
            self._broker.publish(Envelope(close_frame(code, code.reason), player_id, route.gateways))
        return route.connections

    def connect(self, connection: HeldConnection, seat: Seat, last_event_id: str | None = None) -> None:
        """Register the connection, then send the player's backlog before any live frame.

        Live frames that arrive while the backlog is fetched are held behind it. The
        connection counts as open (the gauge) once it took its seat: from then on every
        gateway routes the player's messages to it.

        `last_event_id` (None: the connection did not ask for ids): the connection is
        resuming after that id ("" for none yet). It is sent the history's replay instead
        of the backlog (the backlog's messages are in the history), then live frames with
        their ids, none twice (see `history`); without a history, a `gateway.missed`
        notice (for a non-empty id) and the backlog."""
        connection.hold()
        self.hub.add(connection)
        self._seated[seat.seat_id] = connection  # what is routed to the seat from now on is held for it
        self._fresh.setdefault(seat.player_id, {})[seat.seat_id] = ""
        self._taking[seat.seat_id] = []
        try:
            backlog = self.roster.take_seat(seat)
            replay = self.history.replay(seat.player_id, last_event_id) \
                if self.history is not None and last_event_id is not None else None
            if self.history is not None and last_event_id is None and backlog.frames:
                self.history.note_taken(seat.player_id)
        except BaseException:
            self._seated.pop(seat.seat_id, None)
            self._taking.pop(seat.seat_id, None)
            self._not_fresh(seat.player_id, seat.seat_id)
            self.hub.remove(connection)
            raise
        self.metrics.connection_opened()
        parked = self._taking.pop(seat.seat_id, [])
        if parked and not connection.is_open:  # it closed while its backlog was taken
            parked = self._reroute_parked(seat, parked)
        if replay is None:
            frames = self._backlog_frames(backlog)
            if last_event_id:  # asked to resume, and there is no history to resume from
                self.metrics.resumes.labels(RESUME_MISSED).inc()
                frames = [missed_notice(REASON_OFF, None, len(frames)), *frames]
            self._release(connection, [*frames, *self._after_backlog(seat, connection, bool(backlog.frames), parked)])
            return
        self._count_expired(backlog)
        if last_event_id:
            self.metrics.resumes.labels(RESUME_RECOVERED if replay.recovered else RESUME_MISSED).inc()
        self._release(connection, [*replay.frames, *self._after_backlog(seat, connection, bool(replay.frames), parked)],
                      replay.replayed, replay.through)

    def disconnect(self, connection: Deliverable, seat: Seat) -> None:
        self._seated.pop(seat.seat_id, None)
        self._taking.pop(seat.seat_id, None)
        self._not_fresh(seat.player_id, seat.seat_id)
        self._leaving[seat.seat_id] = seat.player_id  # still counted in the roster until it left
        self._forget(connection)
        try:
            left_at_ms = self.roster.leave(seat)
        except BrokerUnavailable:
            return  # the seat expires by itself in the shared roster
        finally:
            self._leaving.pop(seat.seat_id, None)
        if left_at_ms:
            self._note_left(left_at_ms, seat)

    def cancel(self, seat: Seat) -> None:
        """Give back a seat no connection took: its reservation, and, when `take_seat` was
        carried out for it but its answer was lost (the connection then closes 1013), the
        backlog it took, back at the front of the player's queue. When the roster is out of
        reach, `maintain` tries again until it is back."""
        try:
            dropped, rerouted = self.roster.cancel(seat)
        except BrokerUnavailable as exc:
            if seat.seat_id not in self._cancels_due:
                log.warning("seat not given back yet: broker unavailable",
                            extra={"event": "cancel_deferred", "player_id": seat.player_id, "detail": str(exc)})
            if len(self._cancels_due) >= MAX_CANCELS_DUE:
                forgotten = next(iter(self._cancels_due))
                del self._cancels_due[forgotten]
                log.warning("seat never seated forgotten: too many waiting to be given back",
                            extra={"event": "cancel_given_up", "seat": forgotten})
            self._cancels_due[seat.seat_id] = seat
            return
        self._cancels_due.pop(seat.seat_id, None)
        self._count_given_up_going_back(dropped, rerouted)

    def maintain(self) -> None:
        """Periodic upkeep of the roster: presence kept alive (and written back where it
        was lost), expired offline messages counted as dropped, seats that could not be
        given back given back."""
        for seat in list(self._cancels_due.values()):
            self.cancel(seat)
            if seat.seat_id in self._cancels_due:
                break  # still out of reach
        self.reassert_presence()
        if self.history is not None:
            self.history.maintain()
        expired, rerouted = self.roster.maintain()
        if expired:
            self.metrics.messages_dropped.labels(DROP_OFFLINE_EXPIRED).inc(expired)
        if rerouted:
            self.metrics.messages_rerouted_given_up.labels(GIVEN_UP_IN_QUEUE).inc(rerouted)

    def _to_player(self, player_id: str, frame: bytes, queue_if_offline: bool, batched: bool) -> Outcome:
        try:
            route = self.roster.route(player_id, frame, queue_if_offline)
            if route.gateways and not route.sent:
                self._broker.publish(Envelope(frame, player_id, route.gateways, batched, 0, route.stamped,
                                              seats=route.seats, live_only=not queue_if_offline))
        except BrokerUnavailable:
            delivered = self._deliver_locally(Envelope(frame, player_id, batched=batched))
            if not delivered:
                raise
            return Outcome(delivered, local_only=True)
        self._count_route(route)
        return Outcome(route.connections, route.queued)

    def _count_route(self, route: Route) -> None:
        if route.queued:
            self.metrics.messages_queued.inc()
        if route.dropped:
            self.metrics.messages_dropped.labels(DROP_OFFLINE_FULL).inc(route.dropped)
        if route.expired:
            self.metrics.messages_dropped.labels(DROP_OFFLINE_EXPIRED).inc(route.expired)
        if route.over_total_bytes:
            self.metrics.messages_dropped.labels(DROP_OFFLINE_BYTES_LIMIT).inc(route.over_total_bytes)
        if route.over_total_players:
            self.metrics.messages_dropped.labels(DROP_OFFLINE_PLAYERS_LIMIT).inc(route.over_total_players)
        if route.queueing_off:
            self.metrics.messages_dropped.labels(DROP_OFFLINE_DISABLED).inc()
        if route.given_up_rerouted:
            self.metrics.messages_rerouted_given_up.labels(GIVEN_UP_IN_QUEUE).inc(route.given_up_rerouted)

    def reassert_presence(self, force: bool = False) -> None:
        """Refresh this gateway's presence when due (now, when `force`d: after the broker
        reconnected) and write back what the roster lost. The connections concerned hold
        their live frames while that happens, so the messages queued for them while they
        looked offline reach them first, in order. Lost seats are written back only while
        the broker reads: after a partition, what its stream kept for these players is
        older than what was queued for them and is caught up first (the forced refresh
        after the broker reconnected restores them)."""
        with self._restoring:
            lost = self.roster.refresh(force)
            if self._broker.state() != "ok":
                return
            held = [(seat, connection) for seat in lost
                    if (connection := self._seated.get(seat.seat_id)) is not None and connection.is_open]
            if not held:
                return
            for seat, connection in held:
                connection.hold()
                self._taking[seat.seat_id] = []
            backlogs: dict[str, Backlog] = {}
            try:
                backlogs = self.roster.restore([seat for seat, _ in held])
            finally:
                for seat, connection in held:
                    parked = self._taking.pop(seat.seat_id, [])
                    backlog = backlogs.pop(seat.player_id, None) if connection.is_open else None
                    frames = self._backlog_frames(backlog) if backlog is not None else []
                    if connection.is_open:
                        frames += self._after_backlog(seat, connection, backlog is not None and bool(backlog.frames),
                                                      parked)
                    else:
                        self._reroute_parked(seat, parked)
                    self._release(connection, frames)
            for player_id, backlog in backlogs.items():  # the connection it was for closed meanwhile
                self._return_backlog(player_id, backlog)

    def _return_backlog(self, player_id: str, backlog: Backlog) -> None:
        """A backlog restored for a connection that closed meanwhile goes back to the
        front of the player's queue, in its order (routed again one by one, it went behind
        what was queued since, and behind a later live message queued as its copy)."""
        self._count_expired(backlog)
        try:
            dropped, rerouted = self.roster.return_backlog(player_id, backlog.frames)
        except BrokerUnavailable as exc:
            self.metrics.messages_dropped.labels(DROP_CONNECTION_GONE).inc(len(backlog.frames))
            log.warning("backlog for a closed connection given up: broker unavailable",
                        extra={"event": "reroute_failed", "player_id": player_id, "detail": str(exc)})
            return
        self._count_given_up_going_back(dropped, rerouted)

    def _count_given_up_going_back(self, dropped: int, rerouted: int) -> None:
        """Count what a queue gave up past -max-queued as frames went back to its front
        (`dropped`, of them `rerouted` copies routed again)."""
        if dropped:
            self.metrics.messages_dropped.labels(DROP_OFFLINE_FULL).inc(dropped)
        if rerouted:
            self.metrics.messages_rerouted_given_up.labels(GIVEN_UP_IN_QUEUE).inc(rerouted)

    def _after_backlog(self, seat: Seat, connection: HeldConnection, had_messages: bool,
                       parked: list[Envelope]) -> list[bytes]:
        """What of the copies routed again `parked` for `seat` while its backlog was taken
        (connect, restore) follows the backlog: none when the backlog `had_messages` (they
        may be later than those copies, which are given up, counted), else all of them."""
        if not had_messages:
            return [envelope.stamped if envelope.stamped is not None and connection.wants_ids else envelope.frame
                    for envelope in parked]
        self._not_fresh(seat.player_id, seat.seat_id)
        if parked:
            self._give_up_out_of_order(len(parked))
        return []

    def _reroute_parked(self, seat: Seat, parked: list[Envelope]) -> list[Envelope]:
        """The connection of `seat` closed while copies were `parked` for it: each is
        routed again, as any copy its connection missed; nothing is left for it."""
        for envelope in parked:
            self._reroute(seat.player_id, envelope, frozenset((seat.seat_id,)))
        return []

    def _not_fresh(self, player_id: str, seat_id: str) -> None:
        """The seat's connection was sent a message of its player's, or is gone."""
        fresh = self._fresh.get(player_id)
        if fresh is not None:
            fresh.pop(seat_id, None)
            if not fresh:
                del self._fresh[player_id]

    def _give_up_out_of_order(self, copies: int) -> None:
        self.metrics.messages_dropped.labels(DROP_REROUTED_OUT_OF_ORDER).inc(copies)
        self.metrics.messages_rerouted_given_up.labels(GIVEN_UP_OUT_OF_ORDER).inc(copies)

    def _backlog_frames(self, backlog: Backlog) -> list[bytes]:
        """What a connection taking `backlog` is sent first (expired ones counted)."""
        self._count_expired(backlog)
        frames = backlog.frames
        if self.notify_missed and (backlog.missed_dropped or backlog.missed_expired):
            self.metrics.missed_notices.inc()
            frames = [event_frame(MISSED_EVENT, {"dropped": backlog.missed_dropped,
                                                 "expired": backlog.missed_expired}), *frames]
        return frames

    def _count_expired(self, backlog: Backlog) -> None:
        if backlog.expired:
            self.metrics.messages_dropped.labels(DROP_OFFLINE_EXPIRED).inc(backlog.expired)
        if backlog.expired_rerouted:
            self.metrics.messages_rerouted_given_up.labels(GIVEN_UP_IN_QUEUE).inc(backlog.expired_rerouted)

    def _release(self, connection: HeldConnection, frames: list[bytes],
                 replayed: frozenset[str] = frozenset(), through: StreamPoint | None = None) -> None:
        delivered = connection.release(frames, replayed, through)
        self.metrics.messages_delivered.inc(delivered)
        if delivered < len(frames):  # the socket closed itself as too slow mid-backlog
            self.metrics.messages_dropped.labels(DROP_SLOW_CONSUMER).inc(len(frames) - delivered)

    def _receive(self, envelope: Envelope) -> int:
        """What the broker hands over: delivered to this gateway's connections, or, when
        it was routed to a player whose connections here are gone, routed again. A close
        request is carried out here and never routed again."""
        if envelope.count_change and not envelope.frame:
            self._count_changed(envelope.count_change)
            return 0
        if envelope.frame[0] == _CLOSE_FRAME_FIRST_BYTE:
            return self._close_locally(envelope)
        if envelope.event_id and envelope.stamped is None:
            envelope = envelope._replace(stamped=restamp(envelope.frame, envelope.event_id))
        if envelope.count_change == COUNTED_BROADCAST:
            return self._broadcast_to_counted(envelope)
        if envelope.count_change == UNCOUNTED_BROADCAST:
            return 0  # its answer counted none of this gateway's connections
        if envelope.seats is not None and envelope.player_id is not None:
            return self._deliver_to_seats(envelope.player_id, envelope, envelope.seats)
        if envelope.player_id is None and envelope.sent_at_ms:
            return self._broadcast_counted(envelope)
        delivered = self._deliver_locally(envelope)
        if not delivered and envelope.player_id is not None and envelope.gateways is not None:
            self._reroute(envelope.player_id, envelope, frozenset())
        return delivered

    def _deliver_to_seats(self, player_id: str, envelope: Envelope, seats: frozenset[str]) -> int:
        """Deliver to this gateway's connections among `seats`; the copies of those gone
        or closing are routed again."""
        mine = f"{self.roster.gateway_id}/"
        connections: list[HeldConnection] = []
        seated: list[str] = []
        missed: list[str] = []
        for seat_id in seats:
            if seat_id.startswith(mine):
                connection = self._seated.get(seat_id)
                if connection is not None and connection.is_open:
                    connections.append(connection)
                    seated.append(seat_id)
                else:
                    missed.append(seat_id)
        if envelope.rerouted_by:
            connections = self._admit_rerouted(player_id, envelope, seated, connections)
        elif player_id in self._fresh:
            for seat_id in seated:
                self._not_fresh(player_id, seat_id)
        delivered = self.hub.deliver_to(connections, envelope.frame, envelope.batched, envelope.stamped) \
            if connections else 0
        self.metrics.messages_delivered.inc(delivered)
        if missed:
            self._reroute(player_id, envelope, frozenset(missed))
        return delivered

    def _admit_rerouted(self, player_id: str, envelope: Envelope, seat_ids: list[str],
                        connections: list[HeldConnection]) -> list[HeldConnection]:
        """Of the connections a copy routed again came for (seats taken after it was first
        routed), those it is sent to now. It may only go where it cannot arrive after a
        later message of its player's: to a connection sent nothing of its player's yet but
        copies routed again by the same gateway (they keep their order among themselves).
        A connection whose backlog is being taken gets it behind that backlog, if the
        backlog holds no message (`_after_backlog`). Any other copy is given up, counted
        (`ws_messages_rerouted_given_up_total{reason="out_of_order"}`)."""
        fresh = self._fresh.get(player_id, {})
        admitted: list[HeldConnection] = []
        given_up = 0
        for seat_id, connection in zip(seat_ids, connections):
            origin = fresh.get(seat_id)
            if origin is None or origin not in ("", envelope.rerouted_by):
                given_up += 1
                continue
            fresh[seat_id] = envelope.rerouted_by
            parked = self._taking.get(seat_id)
            if parked is None:
                admitted.append(connection)
            else:
                parked.append(envelope)
        if given_up:
            self._give_up_out_of_order(given_up)
        return admitted

    def _count_changed(self, change: str) -> None:
        """Follow this gateway's broadcast count in Redis, at the point of the stream the
        broker has read (see `broker_redis._COUNT_FIELD`): "0" none, "+seat\\nplayer" one
        more, "-seat\\nplayer" one less, "=N" the seats the heartbeat numbered N counted."""
        kind, rest = change[:1], change[1:]
        if kind == "0":
            self._counted = {}
        elif kind == "=":
            self._counted = dict(self.roster.counted_at(int(rest)))
        elif kind in "+-":
            seat_id, _, player_id = rest.partition("\n")
            if kind == "+":
                self._counted[seat_id] = player_id
            else:
                self._counted.pop(seat_id, None)

    def _broadcast_to_counted(self, envelope: Envelope) -> int:
        """A broadcast counted, in the step that sent it here, for exactly the seats this
        gateway's stream says were counted at that point (`_counted`): to their
        connections, none else (one seated since was not counted); the copy of a counted
        seat whose connection is gone or closing goes to its player's queue, for the next
        connection, as a closing connection's copy of a message does."""
        seated: list[tuple[str, HeldConnection]] = []
        missed: list[tuple[str, str]] = []
        for seat_id, player_id in self._counted.items():
            connection = self._seated.get(seat_id)
            if connection is not None and connection.is_open:
                seated.append((seat_id, connection))
            else:
                missed.append((seat_id, player_id))
        delivered = self.hub.broadcast(envelope.frame, envelope.stamped, to=[connection for _, connection in seated])
        self.metrics.messages_delivered.inc(delivered)
        if delivered < len(seated):  # someone refused it: closing (or closed as too slow)
            missed.extend((seat_id, connection.player_id) for seat_id, connection in seated if not connection.is_open)
        for seat_id, player_id in missed:
            copy = Envelope(envelope.frame, player_id, sent_at_ms=envelope.sent_at_ms)
            self._reroute(player_id, copy, frozenset((seat_id,)), every_seat_had_it=True)
        return delivered

    def _broadcast_counted(self, envelope: Envelope) -> int:
        """A broadcast from another process, whose answer was the roster's reach: every
        seated connection here counted in it, also one that has begun closing, is gone
        while its seat is leaving, or left after the broadcast was sent (by the roster's
        clock: `leave`'s time against the broker's `sent_at_ms`). Such a connection's copy
        goes to its player's queue, for the next connection, as a closing connection's
        copy of a message does."""
        expected = self.hub.connection_count()
        delivered = self._deliver_locally(envelope)
        missed = list(self._leaving.items())
        left = self._left
        while left and left[0][0] <= envelope.sent_at_ms:  # left before it was sent: never counted in it
            left.popleft()
        missed.extend((seat_id, player_id) for left_at_ms, seat_id, player_id in left
                      if left_at_ms > envelope.sent_at_ms)
        if delivered < expected:  # someone refused it: closing (or closed as too slow)
            missed.extend((seat_id, connection.player_id) for seat_id, connection in self._seated.items()
                          if not connection.is_open)
        for seat_id, player_id in missed:
            copy = Envelope(envelope.frame, player_id, sent_at_ms=envelope.sent_at_ms)
            self._reroute(player_id, copy, frozenset((seat_id,)), every_seat_had_it=True)
        return delivered

    def _note_left(self, left_at_ms: int, seat: Seat) -> None:
        """Remember a seat that left, for the broadcasts sent before it left that are
        still on their way here (counted with it: `_broadcast_counted`). Broadcasts arrive
        in the order they were sent, so each forgets those that left before it; what is
        kept is bounded by age and number whatever arrives."""
        left = self._left
        left.append((left_at_ms, seat.seat_id, seat.player_id))
        while left and (len(left) > RECENTLY_LEFT_MAX or left[0][0] < left_at_ms - RECENTLY_LEFT_KEEP_MS):
            left.popleft()

    def _reroute(self, player_id: str, envelope: Envelope, missed: frozenset[str],
                 every_seat_had_it: bool = False) -> None:
        """Route again the copy the seats `missed` did not take: to a seat taken since it
        was routed (one per seat missed, marked as routed again by this gateway:
        `Envelope.rerouted_by`), or to the player's queue (`every_seat_had_it`, a
        broadcast: to the queue)."""
        try:
            stamped = envelope.stamped if isinstance(envelope.stamped, Stamped) else None
            route = self.roster.requeue(player_id, envelope.frame, envelope.seats or frozenset(), missed,
                                        envelope.sent_at_ms, to_queue=every_seat_had_it,
                                        queue=not envelope.live_only, stamped=stamped)
            if route.gateways:
                self._broker.publish(Envelope(envelope.frame, player_id, route.gateways, envelope.batched,
                                              stamped=envelope.stamped, event_id=envelope.event_id,
                                              seats=route.seats, live_only=envelope.live_only,
                                              rerouted_by=self.roster.gateway_id))
        except BrokerUnavailable as exc:
            self.metrics.messages_dropped.labels(DROP_CONNECTION_GONE).inc()
            log.warning("message for a closed connection given up: broker unavailable",
                        extra={"event": "reroute_failed", "player_id": player_id, "detail": str(exc)})
            return
        self.metrics.messages_rerouted.inc()
        if envelope.live_only and not route.gateways:  # for live connections only, and none left for it
            self.metrics.messages_dropped.labels(DROP_CONNECTION_GONE).inc()
        self._count_route(route)

    def _deliver_locally(self, envelope: Envelope) -> int:
        if envelope.player_id is None:
            delivered = self.hub.broadcast(envelope.frame, envelope.stamped)
        else:
            self._fresh.pop(envelope.player_id, None)
            delivered = self.hub.deliver(envelope.player_id, envelope.frame, envelope.batched, envelope.stamped)
        self.metrics.messages_delivered.inc(delivered)
        return delivered

    def _close_locally(self, envelope: Envelope) -> int:
        """An envelope with a close frame: close the player's connections here with its
        code (an unmasked frame of at most 125 bytes: the code follows a 2-byte header)."""
        if envelope.player_id is None:
            return 0  # closing every player is not something any endpoint asks for
        (number,) = struct.unpack_from("!H", envelope.frame, 2)
        try:
            code = CloseCode(number)
        except ValueError:  # from a gateway that knows codes this one does not
            log.warning("close request with an unknown code ignored",
                        extra={"event": "close_ignored", "code": number, "player_id": envelope.player_id})
            return 0
        return self.hub.close_player(envelope.player_id, code)

    def _forget(self, connection: Deliverable) -> None:
        if self.hub.remove(connection):
            self.metrics.connection_closed()
