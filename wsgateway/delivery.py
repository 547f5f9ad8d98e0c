"""Getting one encoded message to its players: fan-out through the broker, local delivery,
the offline queue, and the backlog a connecting player is owed.

The fan-out logic is written once, here; the broker only carries envelopes and the hub
only holds connections. Nothing here blocks, and only a broadcast yields (between slices
of connections, with the hub keeping each socket's order across its pauses); `connect`
never yields, so a connecting player's backlog reaches its socket before any live
message can (ordering needs no lock).
"""
from __future__ import annotations

from dataclasses import dataclass

from wsgateway.broker import Broker, Envelope
from wsgateway.hub import Deliverable, Hub
from wsgateway.metrics import (DROP_OFFLINE_DISABLED, DROP_OFFLINE_EXPIRED, DROP_OFFLINE_FULL, DROP_SLOW_CONSUMER,
                               GatewayMetrics)
from wsgateway.offline import OfflineQueue


@dataclass(frozen=True)
class Outcome:
    """What became of a message: connections that took it, and whether it was queued."""

    delivered: int
    queued: bool = False


class Delivery:
    """Publishes messages and delivers them to this process's connections."""

    def __init__(self, hub: Hub, offline: OfflineQueue, broker: Broker[Outcome],
                 metrics: GatewayMetrics) -> None:
        self.hub = hub
        self.offline = offline
        self.metrics = metrics
        self._broker = broker
        broker.start(self._deliver_locally)

    def publish(self, player_id: str, frame: bytes) -> Outcome:
        """To every connection of one player, or to its offline queue when it has none."""
        self.metrics.messages_published.inc()
        return self._broker.publish(Envelope(frame, player_id, queue_if_offline=True))

    def broadcast(self, frame: bytes, player_id: str | None = None) -> Outcome:
        """To every connected player, or to one player's live connections; never queued."""
        self.metrics.messages_published.inc()
        return self._broker.publish(Envelope(frame, player_id))

    def connect(self, connection: Deliverable) -> None:
        """Send the player's backlog, then register the connection for live messages.
        Its slot must have been reserved with `hub.reserve`."""
        backlog = self.offline.take(connection.player_id)
        if backlog.expired:
            self.metrics.messages_dropped.labels(DROP_OFFLINE_EXPIRED).inc(backlog.expired)
        delivered = sum(connection.send(frame) for frame in backlog.frames)
        self.metrics.messages_delivered.inc(delivered)
        if delivered < len(backlog.frames):  # the socket closed itself as too slow mid-backlog
            self.metrics.messages_dropped.labels(DROP_SLOW_CONSUMER).inc(len(backlog.frames) - delivered)
        self.hub.add(connection)

    def disconnect(self, connection: Deliverable) -> None:
        self.hub.remove(connection)

    def purge_expired(self) -> None:
        """Free offline messages whose TTL ran out; they are counted as dropped."""
        expired = self.offline.purge_expired()
        if expired:
            self.metrics.messages_dropped.labels(DROP_OFFLINE_EXPIRED).inc(expired)

    def _deliver_locally(self, envelope: Envelope) -> Outcome:
        if envelope.player_id is None:
            delivered = self.hub.broadcast(envelope.frame)
        else:
            delivered = self.hub.deliver(envelope.player_id, envelope.frame)
        self.metrics.messages_delivered.inc(delivered)
        # A player whose connections are all closing gets the message queued: it is
        # about to reconnect, and the backlog is what it will be owed.
        if delivered or not envelope.queue_if_offline:
            return Outcome(delivered)
        if not self.offline.enabled:
            self.metrics.messages_dropped.labels(DROP_OFFLINE_DISABLED).inc()
            return Outcome(0)
        dropped = self.offline.push(envelope.player_id or "", envelope.frame)
        self.metrics.messages_queued.inc()
        if dropped:
            self.metrics.messages_dropped.labels(DROP_OFFLINE_FULL).inc(dropped)
        return Outcome(0, queued=True)
