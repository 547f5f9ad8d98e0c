"""How a published message reaches the process(es) holding the player's connections.

A broker only carries envelopes: it knows no sockets, hub or routes. Whoever starts it
hands it the function that delivers an envelope locally; this is the seam where a
multi-process backend plugs in without the hub knowing which broker is in use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Protocol, TypeVar


@dataclass(frozen=True)
class Envelope:
    """One encoded message and where it goes.

    `player_id` None means every connected player. `queue_if_offline` asks for the
    offline queue when the player has no connection (publish does, broadcast does not).
    """

    frame: bytes
    player_id: str | None = None
    queue_if_offline: bool = False


R = TypeVar("R")


class Broker(Protocol[R]):
    """Carries envelopes to the local delivery function of every gateway."""

    def start(self, deliver: Callable[[Envelope], R]) -> None:
        """Begin handing envelopes to `deliver`. Called once, before any publish."""

    def publish(self, envelope: Envelope) -> R:
        """Send an envelope on its way; returns what delivery reported."""

    def close(self) -> None:
        """Stop delivering; idempotent."""


class InProcessBroker(Generic[R]):
    """The single-process broker: `publish` delivers in the caller's greenlet, at once.

    Guarantees: delivery in publish order, exactly once to the connections present at
    the moment of publishing, and the caller learns the outcome. Never blocks.
    """

    def __init__(self) -> None:
        self._deliver: Callable[[Envelope], R] | None = None

    def start(self, deliver: Callable[[Envelope], R]) -> None:
        self._deliver = deliver

    def publish(self, envelope: Envelope) -> R:
        if self._deliver is None:
            raise RuntimeError("broker not started")
        return self._deliver(envelope)

    def close(self) -> None:
        self._deliver = None
