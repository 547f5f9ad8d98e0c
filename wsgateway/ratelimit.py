"""Per-server-subject rate limiting: a token bucket refilled continuously.

Each server subject may send a burst of `limit` messages, and the bucket refills at
`limit / period_s` messages per second, continuously (echoCTF's ws-server refills one
token per period after the first burst, which throttles a busy publisher to a trickle).
Pure and clock-injected: tests need no sleeps.
"""
from __future__ import annotations

import time
from typing import Callable, Protocol

IDLE_BUCKETS_KEPT = 10_000  # past this many subjects, full (idle) buckets are forgotten


class Limiter(Protocol):
    """A rate limit per server subject (this module's, or the cluster's in Redis)."""

    limit: int  # the bucket size; 0 = unlimited

    def acquire(self, subject: str, count: int = 1) -> float:
        """0.0 when `count` tokens were taken, else seconds until they would be available."""


class RateLimiter:
    """Token buckets keyed by server subject. `limit == 0` means unlimited."""

    def __init__(self, limit: int, period_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._refill_per_s = limit / period_s if limit else 0.0
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}  # subject -> [tokens, updated_at]

    def acquire(self, subject: str, count: int = 1) -> float:
        """Take `count` tokens: 0.0 when granted, else the seconds until they would be
        available (nothing is taken then). A `count` above `limit` is never granted."""
        if not self.limit:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(subject)
        if bucket is None:
            if len(self._buckets) >= IDLE_BUCKETS_KEPT:
                self._forget_full_buckets(now)
            bucket = self._buckets[subject] = [float(self.limit), now]
        tokens = min(float(self.limit), bucket[0] + (now - bucket[1]) * self._refill_per_s)
        bucket[1] = now
        if tokens >= count:
            bucket[0] = tokens - count
            return 0.0
        bucket[0] = tokens
        if count > self.limit:
            return float("inf")
        return (count - tokens) / self._refill_per_s

    def _forget_full_buckets(self, now: float) -> None:
        for subject, (tokens, updated_at) in list(self._buckets.items()):
            if tokens + (now - updated_at) * self._refill_per_s >= self.limit:
                del self._buckets[subject]
