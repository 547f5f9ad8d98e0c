"""Fakes for the pure-module unit tests: a clock and a connection."""
from __future__ import annotations

from typing import Callable

from wsgateway.history import StreamPoint


class FakeClock:
    """A monotonic clock the test moves by hand (`clock.now += 5`)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeConnection:
    """A connection as the hub, delivery and keep-alive see it; records what it was given.

    `accepting = False` makes `send` refuse, like a connection that is closing. Given
    `answers_on` (a clock), it answers every ping at once: `last_heard` becomes that clock's
    time; `answers_on = None` makes it fall silent.
    """

    def __init__(self, player_id: str, token: str = "token", *, accepting: bool = True,
                 last_heard: float = 0.0, wants_ids: bool = False,
                 answers_on: Callable[[], float] | None = None) -> None:
        self.player_id = player_id
        self.answers_on = answers_on
        self.wants_ids = wants_ids
        self.token = token
        self.accepting = accepting
        self.last_heard = last_heard
        self.frames: list[bytes] = []
        self.pings = 0
        self.aborted_with: int | None = None
        self.held: list[bytes] | None = None
        self.replayed_through: StreamPoint | None = None

    @property
    def is_open(self) -> bool:
        return self.accepting

    def send(self, frame: bytes) -> bool:
        if self.held is not None:
            self.held.append(frame)
            return True
        if self.replayed_through is not None and self.replayed_through.covers(frame):
            return True
        if self.accepting:
            self.frames.append(frame)
        return self.accepting

    def hold(self) -> None:
        self.held = []

    def release(self, first: list[bytes], replayed: frozenset[str] = frozenset(),
                through: StreamPoint | None = None) -> int:
        held, self.held = self.held or [], None
        taken = sum(self.send(frame) for frame in first)
        self.replayed_through = through or self.replayed_through
        for frame in held:
            if getattr(frame, "event_id", None) not in replayed:
                self.send(frame)
        return taken

    def send_later(self, frame: bytes) -> bool:
        return self.send(frame)  # in order with send(), as a Connection keeps them

    def ping(self) -> None:
        self.pings += 1
        if self.answers_on is not None:
            self.last_heard = self.answers_on()

    def abort(self, code: int) -> None:
        self.aborted_with = code

    def __repr__(self) -> str:
        return f"FakeConnection({self.player_id!r}, {self.token!r})"
