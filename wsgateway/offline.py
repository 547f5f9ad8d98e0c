"""Messages for players who are not connected: bounded per player, expiring, oldest dropped.

This is best effort by design, as in echoCTF's ws-server: the queue lives in memory and
a message waits at most `offline_ttl_s`. What it promises is exactness about losses:
every message it gives up is counted (dropped when a queue is full, expired when its
time ran out), so nothing disappears unaccounted.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol


@dataclass
class Backlog:
    """What a connecting player is owed: frames in publish order, and what was lost."""

    frames: list[bytes] = field(default_factory=list)
    expired: int = 0  # messages whose TTL ran out before the player came back


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
        return dropped

    def take(self, player_id: str) -> Backlog:
        queue = self._queues.pop(player_id, None)
        if not queue:
            return Backlog()
        self._size -= len(queue)
        now = self._clock()
        frames = [frame for expires_at, frame in queue if expires_at > now]
        return Backlog(frames=frames, expired=len(queue) - len(frames))

    def purge_expired(self) -> int:
        now = self._clock()
        expired = 0
        for player_id in list(self._queues):
            queue = self._queues[player_id]
            while queue and queue[0][0] <= now:
                queue.popleft()
                expired += 1
            if not queue:
                del self._queues[player_id]
        self._size -= expired
        return expired

    def __len__(self) -> int:
        return self._size
