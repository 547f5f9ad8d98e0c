"""A budget of failed authentications per client address (`-auth-fail-limit`).

Each unknown token a client tries costs the gateway a database lookup, so guessing
would otherwise be free for the guesser and not for the players. Every client address
has a bucket of `limit` failures, refilled continuously at `limit` per minute; an
address whose bucket is empty is refused (429, `Retry-After`) before its token is
looked up, until the bucket has refilled by one.

Valid players and servers are never refused for their address's failures when their
token authenticated (from any address) within `trusted_ttl_s` (the revalidation
period): such a token is looked up as usual. What remains refused, while its address
is over the budget, is a token that has not authenticated recently: a valid but new
token behind the same address as a guesser waits, at most until the guessing stops
for one bucket refill (60 / limit seconds). See README "Tokens".

Bounded: at most `max_addresses` addresses are tracked (idle, refilled buckets are
forgotten first, then the oldest), and trusted tokens live in a `RecentTokens`. Pure
and clock-injected like `ratelimit`: tests need no sleeps.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable

from wsgateway.recent_tokens import RecentTokens

REFILL_PERIOD_S = 60.0  # the bucket refills `limit` failures over this period
MAX_ADDRESSES = 10_000  # client addresses tracked at once
MAX_TRUSTED_TOKENS = 100_000  # recently authenticated tokens remembered at once


class FailedAuthThrottle:
    """Failed authentications per client address. `limit == 0` throttles nothing."""

    def __init__(self, limit: int, *, trusted_ttl_s: float, max_addresses: int = MAX_ADDRESSES,
                 max_trusted_tokens: int = MAX_TRUSTED_TOKENS, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._refill_per_s = limit / REFILL_PERIOD_S
        self._max_addresses = max_addresses
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}  # address -> [failures left, updated_at], oldest first
        self._trusted = RecentTokens(trusted_ttl_s if limit else 0.0, max_trusted_tokens, clock)

    def retry_after_s(self, address: str, token: str) -> float:
        """0.0 when `token` may be looked up for `address`, else the seconds until it may."""
        if not self.limit:
            return 0.0
        bucket = self._buckets.get(address)
        if bucket is None:
            return 0.0
        left = self._refilled(bucket, self._clock())
        if left >= 1.0 or token in self._trusted:
            return 0.0
        return (1.0 - left) / self._refill_per_s

    def failed(self, address: str) -> None:
        """A token from `address` turned out unknown, expired or of the wrong kind."""
        if not self.limit:
            return
        now = self._clock()
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= self._max_addresses:
                self._make_room(now)
            bucket = self._buckets[address] = [float(self.limit), now]
        bucket[0] = max(0.0, self._refilled(bucket, now) - 1.0)
        bucket[1] = now

    def succeeded(self, token: str) -> None:
        """`token` authenticated: it is not refused for its address for `trusted_ttl_s`."""
        if self.limit:
            self._trusted.add(token)

    def _refilled(self, bucket: list[float], now: float) -> float:
        return min(float(self.limit), bucket[0] + (now - bucket[1]) * self._refill_per_s)

    def _make_room(self, now: float) -> None:
        """Forget addresses whose bucket has refilled; if too few have, the oldest tenth.
        Either way a tenth of the table is free after it, so the sweep runs at most once
        per tenth of `max_addresses` new addresses, however many a flood brings."""
        for address, bucket in list(self._buckets.items()):
            if self._refilled(bucket, now) >= self.limit:
                del self._buckets[address]
        excess = len(self._buckets) - (self._max_addresses - max(1, self._max_addresses // 10))
        for address in list(itertools.islice(self._buckets, max(0, excess))):
            del self._buckets[address]
