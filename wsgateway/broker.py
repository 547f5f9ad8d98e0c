"""How a message reaches the gateway processes that hold its player's connections.

A broker only carries envelopes: it knows no sockets, hub, routes or queues. Whoever
starts it hands it the function that delivers an envelope to this process's own
connections; that is the seam where a multi-process backend (`broker_redis`) plugs in
without the hub knowing which broker is in use.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Protocol


COUNTED_BROADCAST = "b"  # an Envelope's count_change on a broadcast counted per gateway: for the seats counted
UNCOUNTED_BROADCAST = "n"  # and on one this gateway was not counted in: for none of its connections


class Envelope(NamedTuple):
    """One encoded frame and where it goes.

    `player_id` None means every connected player. `gateways` names the gateways that
    hold the player's connections; None means every gateway (broadcasts). `batched`: one
    of a `/publish/batch`, whose frames may wait for the shared flusher so that those for
    one socket leave together (see `Hub.deliver`); it does not cross process boundaries.
    `sent_at_ms`: when the transport took it (Redis's clock, ms), set by a broker that
    knows (one that crosses processes); a message routed again after its connection
    closed keeps its place by it.
    `stamped`: the same message with its id (`history.Stamped`), for connections that
    asked for ids; None when the gateway keeps no history. `event_id`: that id, as it
    crosses processes (the receiving gateway builds the stamped frame once from it).
    `seats`: the connections (seat ids, `roster.Route.seats`) a player envelope was routed
    to; each receiving gateway gives it to those of its own only. None: to every
    connection of the player there (in process, or a close request). `live_only`: for
    live connections only (`/broadcast` with a player id): a copy whose connection is
    gone is never queued.
    `count_change` (a broker that counts broadcasts per gateway in the step that sends
    them, `broker_redis`): on an envelope with an empty frame, a change of which of this
    gateway's connections its broadcast count holds, at this point of what it receives;
    `COUNTED_BROADCAST` on a broadcast: it was counted for exactly those connections;
    `UNCOUNTED_BROADCAST`: for none of them (this gateway was not counted in its answer).
    `rerouted_by`: on a copy routed again after its connection closed (`Delivery._reroute`),
    the gateway that routed it again (its copies keep their order among themselves); ""
    on a message routed once. The receiving gateway hands such a copy only to a
    connection that has been sent nothing of its player's since it opened but copies
    rerouted by that same gateway (a later message sent first would put it out of order).

    A `frame` that is a WebSocket close frame asks the receiving gateways to close the
    player's connections with its code (`Delivery.close_player`, `POST /disconnect`):
    it is carried like any other frame, so a broker needs nothing to support it.
    """

    frame: bytes
    player_id: str | None = None
    gateways: frozenset[str] | None = None
    batched: bool = False
    sent_at_ms: int = 0
    stamped: bytes | None = None
    event_id: str = ""
    seats: frozenset[str] | None = None
    live_only: bool = False
    count_change: str = ""
    rerouted_by: str = ""


Deliver = Callable[[Envelope], object]


class Broker(Protocol):
    """Carries envelopes to the local delivery function of the gateways they name.

    Guarantees every backend keeps: envelopes from one publisher arrive in publish order;
    an envelope reaches each named gateway at most once; `publish` never waits on a
    player's socket. It raises `BrokerUnavailable` when the envelope cannot be sent.

    Once `publish` returned, the envelope is kept for each named gateway until that
    gateway takes it, also while that gateway is reconnecting to the broker: a backend
    that crosses processes (`broker_redis`) delivers it when the gateway is back. Limits,
    which the backend states and counts: what the shared store itself loses (a Redis
    restart without persistence), and what exceeds a bounded backlog.

    What "delivered" means is not the broker's to promise: an envelope can reach a
    gateway whose connection for the player closed meanwhile. The delivery function
    owns that case (`Delivery` routes such an envelope again, to the offline queue or a
    newer connection); the broker only carries envelopes, opaque, whatever they hold.
    """

    def start(self, deliver: Deliver) -> None:
        """Begin handing envelopes for this gateway to `deliver`. Called once."""

    counts_broadcasts: bool  # see `publish`

    def publish(self, envelope: Envelope) -> int | None:
        """Send an envelope on its way. For a broadcast to all, when `counts_broadcasts`:
        the connections it was counted for in the very step that sent it, each of which
        its gateway sends it to (or, when that connection is gone, queues its copy for
        the player): in process, those the delivery function handed it to; on a single
        Redis, the counts of the gateways it was appended to. Otherwise None, and the
        roster's reach, taken just before, is the answer."""

    def state(self) -> str:
        """"ok", or what is wrong."""

    def close(self) -> None:
        """Stop delivering; idempotent."""


class InProcessBroker:
    """The single-process broker: `publish` delivers in the caller's greenlet, at once.

    Exactly once to the connections present at the moment of publishing, in call order.
    """

    def __init__(self) -> None:
        self._deliver: Deliver | None = None

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    counts_broadcasts = True

    def publish(self, envelope: Envelope) -> int | None:
        if self._deliver is None:
            raise RuntimeError("broker not started")
        delivered = self._deliver(envelope)
        return int(delivered) if envelope.player_id is None and delivered is not None else None

    def state(self) -> str:
        return "ok"

    def close(self) -> None:
        self._deliver = None
