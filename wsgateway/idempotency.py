"""Idempotent publishing: a retried request is answered, not delivered twice.

Publishers retry (echoCTF.RED's PHP publisher retries a failed /publish up to 3 times),
and a request that timed out on the client may well have been delivered. A publish that
carries an `Idempotency-Key` is remembered per server subject for `-idempotency-window`:
a repeat delivers nothing and gets the first call's answer, marked as a replay.

Only successful answers are remembered: a refused call (400, 429, 503) releases its key,
so the retry really runs. A twin that arrives while the first call is still running
waits for its answer. The same key with a different request is refused (422): that is a
bug in the publisher, not a retry.
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Protocol

from gevent.event import Event

IN_FLIGHT_WAIT_S = 5.0  # how long a twin waits for the first call's answer
MAX_KEY_CHARS = 255


class ClaimState(Enum):
    FRESH = "fresh"  # do the work, then complete() or release()
    REPLAY = "replay"  # answer `result`; deliver nothing
    MISMATCH = "mismatch"  # the key was used for a different request
    IN_PROGRESS = "in_progress"  # the first call is still running after IN_FLIGHT_WAIT_S


@dataclass(frozen=True)
class Claim:
    state: ClaimState
    result: dict[str, Any] | None = None
    evicted: int = 0  # keys forgotten early to make room under the cap


def fingerprint(*parts: bytes) -> str:
    """What identifies "the same request" behind a key."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()[:32]


class IdempotencyStore(Protocol):
    """Remembers answers by (server subject, key). `claim` may wait (at most
    IN_FLIGHT_WAIT_S) for an in-flight twin; with Redis it raises BrokerUnavailable."""

    def claim(self, subject_id: str, key: str, request_fingerprint: str) -> Claim: ...

    def complete(self, subject_id: str, key: str, result: dict[str, Any]) -> None: ...

    def release(self, subject_id: str, key: str) -> None:
        """Forget a key whose call was refused; a completed key is kept."""


@dataclass
class _Entry:
    fingerprint: str
    expires_at: float
    result: dict[str, Any] | None = None
    settled: Event = field(default_factory=Event)  # set when completed or released


class MemoryIdempotencyStore:
    """`IdempotencyStore` in this process: at most `max_keys` keys, oldest forgotten first."""

    def __init__(self, window_s: float, max_keys: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()  # oldest first

    def claim(self, subject_id: str, key: str, request_fingerprint: str) -> Claim:
        deadline = self._clock() + IN_FLIGHT_WAIT_S
        while True:
            now = self._clock()
            self._forget_expired(now)
            entry = self._entries.get((subject_id, key))
            if entry is None:
                evicted = 0
                while len(self._entries) >= self.max_keys:
                    self._entries.popitem(last=False)[1].settled.set()
                    evicted += 1
                self._entries[(subject_id, key)] = _Entry(request_fingerprint, now + self.window_s)
                return Claim(ClaimState.FRESH, evicted=evicted)
            if entry.fingerprint != request_fingerprint:
                return Claim(ClaimState.MISMATCH)
            if entry.result is not None:
                return Claim(ClaimState.REPLAY, entry.result)
            if now >= deadline or not entry.settled.wait(deadline - now):
                return Claim(ClaimState.IN_PROGRESS)
            # settled: completed (replay next turn) or released (claim it afresh)

    def complete(self, subject_id: str, key: str, result: dict[str, Any]) -> None:
        entry = self._entries.get((subject_id, key))
        if entry is not None:
            entry.result = result
            entry.settled.set()

    def release(self, subject_id: str, key: str) -> None:
        entry = self._entries.get((subject_id, key))
        if entry is not None and entry.result is None:
            del self._entries[(subject_id, key)]
            entry.settled.set()

    def __len__(self) -> int:
        return len(self._entries)

    def _forget_expired(self, now: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest.expires_at > now:
                return
            self._entries.popitem(last=False)[1].settled.set()
