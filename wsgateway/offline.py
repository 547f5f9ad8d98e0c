"""Messages for players who are not connected: bounded per player, expiring, oldest dropped.

This is best effort by design, as in echoCTF's ws-server: the queue lives in memory and
a message waits at most `offline_ttl_s`. What it promises is exactness about losses:
every message it gives up is counted (dropped when a queue is full, expired when its
time ran out), so nothing disappears unaccounted, and each player's losses since its
last connection are kept for the `gateway.missed` notice.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

MISSED_RETENTION_S = 24 * 3600.0  # a player's loss counters are kept this long after the last loss
MISSED_PLAYERS_KEPT = 100_000  # and for at most this many players (the oldest are forgotten)


@dataclass
class Backlog:
    """What a connecting player is owed: frames in publish order, and what was lost."""

    frames: list[bytes] = field(default_factory=list)
    expired: int = 0  # frames found expired just now, at hand-off (not counted before)
    missed_dropped: int = 0  # frames lost to a full queue since the player's last connection
    missed_expired: int = 0  # frames lost to -offline-ttl since the player's last connection


class OfflineQueue(Protocol):
    """Per-player FIFO of encoded frames. Never blocks; all methods are O(queue length)."""

    enabled: bool  # False when the bound or the TTL is zero: nothing may be pushed

    def push(self, player_id: str, frame: bytes) -> int:
        """Queue a frame; return how many older frames were dropped to make room."""

    def take(self, player_id: str) -> Backlog:
        """Remove and return the player's unexpired frames; the queue is empty after."""

    def purge_expired(self) -> int:
        """Forget every expired frame; return how many."""

    def __len__(self) -> int:
        """Frames currently queued, all players together."""


class MemoryOfflineQueue:
    """`OfflineQueue` in this process's memory."""

    def __init__(self, max_queued: int, offline_ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_queued = max_queued
        self.offline_ttl_s = offline_ttl_s
        self._clock = clock
        # player id -> deque of (expires_at, frame); expires_at ascends within a deque
        self._queues: dict[str, deque[tuple[float, bytes]]] = {}
        self._size = 0
        # player id -> [dropped, expired, last loss at], oldest loss first
        self._missed: OrderedDict[str, list[float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_queued > 0 and self.offline_ttl_s > 0

    def push(self, player_id: str, frame: bytes) -> int:
        queue = self._queues.get(player_id)
        if queue is None:
            queue = self._queues[player_id] = deque()
        dropped = 0
        while len(queue) >= self.max_queued:
            queue.popleft()
            dropped += 1
        queue.append((self._clock() + self.offline_ttl_s, frame))
        self._size += 1 - dropped
        if dropped:
            self._record_loss(player_id, dropped=dropped)
        return dropped

    def take(self, player_id: str) -> Backlog:
        queue = self._queues.pop(player_id, None) or deque()
        self._size -= len(queue)
        now = self._clock()
        frames = [frame for expires_at, frame in queue if expires_at > now]
        expired = len(queue) - len(frames)
        dropped_before, expired_before, _ = self._missed.pop(player_id, (0, 0, 0.0))
        return Backlog(frames=frames, expired=expired, missed_dropped=int(dropped_before),
                       missed_expired=int(expired_before) + expired)

    def purge_expired(self) -> int:
        now = self._clock()
        expired = 0
        for player_id in list(self._queues):
            queue = self._queues[player_id]
            expired_here = 0
            while queue and queue[0][0] <= now:
                queue.popleft()
                expired_here += 1
            if not queue:
                del self._queues[player_id]
            if expired_here:
                self._record_loss(player_id, expired=expired_here)
                expired += expired_here
        self._size -= expired
        while self._missed and next(iter(self._missed.values()))[2] < now - MISSED_RETENTION_S:
            self._missed.popitem(last=False)
        return expired

    def _record_loss(self, player_id: str, *, dropped: int = 0, expired: int = 0) -> None:
        counters = self._missed.pop(player_id, None) or [0, 0, 0.0]
        counters[0] += dropped
        counters[1] += expired
        counters[2] = self._clock()
        self._missed[player_id] = counters
        if len(self._missed) > MISSED_PLAYERS_KEPT:
            self._missed.popitem(last=False)

    def __len__(self) -> int:
        return self._size
