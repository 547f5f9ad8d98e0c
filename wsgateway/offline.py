"""Messages for players who are not connected: bounded per player, expiring, oldest dropped.

This is best effort by design, as in echoCTF's ws-server: the queue lives in memory and
a message waits at most `offline_ttl_s`. What it promises is exactness about losses:
every message it gives up is counted (dropped when a queue is full, expired when its
time ran out, evicted when all queues together are at their bound), so nothing
disappears unaccounted, and each player's losses since its last connection are kept for
the `gateway.missed` notice.

All queues together are bounded too, so that no publisher can make the process hold
rate x TTL x body: at most `max_total_bytes` accounted bytes (each message counts its
frame plus `MESSAGE_OVERHEAD_BYTES`) and at most `max_players` queues. Past either bound
the oldest message of any player is given up first (for the queue bound, the whole
queue holding it), which keeps the newest.
"""
from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Protocol

MISSED_RETENTION_S = 24 * 3600.0  # a player's loss counters are kept this long after the last loss
MISSED_PLAYERS_KEPT = 100_000  # and for at most this many players (the oldest are forgotten)
# What one queued message costs besides its frame: the entry tuple, its bytes and float
# headers and the deque slots, 190-225 bytes measured with tracemalloc on CPython 3.11.
MESSAGE_OVERHEAD_BYTES = 200


@dataclass
class Backlog:
    """What a connecting player is owed: frames in publish order, and what was lost."""

    frames: list[bytes] = field(default_factory=list)
    expired: int = 0  # frames found expired just now, at hand-off (not counted before)
    missed_dropped: int = 0  # frames lost to a full queue since the player's last connection
    missed_expired: int = 0  # frames lost to -offline-ttl since the player's last connection
    expired_rerouted: int = 0  # of `expired`, copies routed again after their connection closed (a shared roster)


class Pushed(NamedTuple):
    """What queueing one frame cost: the older frames given up to make room, by bound."""

    queued: bool = True  # False: the frame alone is larger than the bound on all queues
    over_player_bound: int = 0  # this player's oldest, past max_queued
    over_total_bytes: int = 0  # anyone's oldest, past max_total_bytes (the frame itself when not queued)
    over_total_players: int = 0  # every frame of the oldest queues, past max_players


def accounted_bytes(frame: bytes) -> int:
    """What one queued frame counts against the bound on all queues."""
    return len(frame) + MESSAGE_OVERHEAD_BYTES


class OfflineQueue(Protocol):
    """Per-player FIFO of encoded frames. Never blocks; all methods are O(queue length)."""

    enabled: bool  # False when the bound or the TTL is zero: nothing may be pushed

    def push(self, player_id: str, frame: bytes) -> Pushed:
        """Queue a frame, giving up the oldest ones past a bound; say what it cost."""

    def take(self, player_id: str) -> Backlog:
        """Remove and return the player's unexpired frames; the queue is empty after."""

    def purge_expired(self) -> int:
        """Forget every expired frame; return how many."""

    def __len__(self) -> int:
        """Frames currently queued, all players together."""

    @property
    def held_bytes(self) -> int:
        """Accounted bytes of every queued frame (`accounted_bytes`), all players together."""


class MemoryOfflineQueue:
    """`OfflineQueue` in this process's memory.

    Frames carry a serial number in push order; `_arrivals` lists (serial, player) for
    every frame in that order, so the oldest frame of all is found without looking at
    every queue. Entries whose frame left by another way (taken, expired, dropped from its
    own queue) are skipped when met and compacted away once they outnumber the live ones.
    """

    def __init__(self, max_queued: int, offline_ttl_s: float,
                 clock: Callable[[], float] = time.monotonic, *,
                 max_total_bytes: int = 0, max_players: int = 0) -> None:
        """`max_total_bytes`, `max_players`: bounds on all queues together (0 = none)."""
        self.max_queued = max_queued
        self.offline_ttl_s = offline_ttl_s
        self.max_total_bytes = max_total_bytes
        self.max_players = max_players
        self._clock = clock
        # player id -> deque of (serial, expires_at, frame); both ascend within a deque
        self._queues: dict[str, deque[tuple[int, float, bytes]]] = {}
        self._arrivals: deque[tuple[int, str]] = deque()
        self._stale_arrivals = 0
        self._serials = itertools.count()
        self._size = 0
        self._bytes = 0
        # player id -> [dropped, expired, last loss at], oldest loss first
        self._missed: OrderedDict[str, list[float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_queued > 0 and self.offline_ttl_s > 0

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def push(self, player_id: str, frame: bytes) -> Pushed:
        size = accounted_bytes(frame)
        if self.max_total_bytes and size > self.max_total_bytes:
            self._record_loss(player_id, dropped=1)
            return Pushed(queued=False, over_total_bytes=1)
        queue = self._queues.get(player_id)
        dropped = 0
        while queue is not None and len(queue) >= self.max_queued:
            self._forget(queue.popleft())
            dropped += 1
        if dropped:
            self._record_loss(player_id, dropped=dropped)
        over_bytes = 0
        while self.max_total_bytes and self._bytes + size > self.max_total_bytes:
            evicted = self._evict_oldest(whole_queue=False)  # may empty and remove this player's queue
            if not evicted:
                break
            over_bytes += evicted
        over_players = 0
        queue = self._queues.get(player_id)
        if queue is None:
            while self.max_players and len(self._queues) >= self.max_players:
                evicted = self._evict_oldest(whole_queue=True)
                if not evicted:
                    break
                over_players += evicted
            queue = self._queues[player_id] = deque()
        serial = next(self._serials)
        queue.append((serial, self._clock() + self.offline_ttl_s, frame))
        self._arrivals.append((serial, player_id))
        self._size += 1
        self._bytes += size
        self._compact_if_mostly_stale()
        return Pushed(over_player_bound=dropped, over_total_bytes=over_bytes, over_total_players=over_players)

    def take(self, player_id: str) -> Backlog:
        queue = self._queues.pop(player_id, None) or deque()
        for entry in queue:
            self._forget(entry)
        now = self._clock()
        frames = [frame for _, expires_at, frame in queue if expires_at > now]
        expired = len(queue) - len(frames)
        dropped_before, expired_before, _ = self._missed.pop(player_id, (0, 0, 0.0))
        self._compact_if_mostly_stale()
        return Backlog(frames=frames, expired=expired, missed_dropped=int(dropped_before),
                       missed_expired=int(expired_before) + expired)

    def _evict_oldest(self, *, whole_queue: bool) -> int:
        """Give up the oldest queued frame of all (or the whole queue holding it); return
        how many frames that was (0 only when nothing is queued)."""
        while self._arrivals:
            serial, player_id = self._arrivals.popleft()
            queue = self._queues.get(player_id)
            if not queue or queue[0][0] != serial:
                self._stale_arrivals -= 1
                continue
            self._stale_arrivals -= 1  # _forget counts the entry popped just now as stale
            evicted = len(queue) if whole_queue else 1
            for _ in range(evicted):
                self._forget(queue.popleft())
            if not queue:
                del self._queues[player_id]
            self._record_loss(player_id, dropped=evicted)
            return evicted
        return 0

    def _forget(self, entry: tuple[int, float, bytes]) -> None:
        """Account for a frame that left its queue; its arrival entry is now stale."""
        self._size -= 1
        self._bytes -= accounted_bytes(entry[2])
        self._stale_arrivals += 1

    def _compact_if_mostly_stale(self) -> None:
        """Keep `_arrivals` within a constant factor of the frames queued."""
        if self._stale_arrivals <= max(1024, 2 * self._size):
            return

        def live(serial: int, player_id: str) -> bool:
            queue = self._queues.get(player_id)
            return bool(queue) and serial >= queue[0][0]  # a queue only ever loses its head
        self._arrivals = deque(entry for entry in self._arrivals if live(*entry))
        self._stale_arrivals = 0

    def purge_expired(self) -> int:
        now = self._clock()
        expired = 0
        for player_id in list(self._queues):
            queue = self._queues[player_id]
            expired_here = 0
            while queue and queue[0][1] <= now:
                self._forget(queue.popleft())
                expired_here += 1
            if not queue:
                del self._queues[player_id]
            if expired_here:
                self._record_loss(player_id, expired=expired_here)
                expired += expired_here
        self._compact_if_mostly_stale()
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
