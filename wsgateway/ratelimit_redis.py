"""The per-server-subject rate limit, shared by every gateway through Redis.

The same token bucket as `ratelimit.RateLimiter`, refilled continuously, kept in one
Redis hash per subject and updated by a Lua script on Redis's clock, so a subject's
budget is the same whichever gateway it publishes to. When Redis cannot be reached the
limit falls back to this process's own bucket: publishing to local players goes on,
limited per gateway instead of per cluster.
"""
from __future__ import annotations

import logging

from wsgateway.ratelimit import RateLimiter
from wsgateway.redis_link import REDIS_ERRORS, Client, RedisKeys

log = logging.getLogger(__name__)

# KEYS: bucket. ARGV: limit, refill per ms, count, ttl_ms. Returns the wait in ms ("0" = granted).
TAKE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local limit = tonumber(ARGV[1])
local refill = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1]) or limit
local at = tonumber(bucket[2]) or now
tokens = math.min(limit, tokens + math.max(0, now - at) * refill)
local wait = 0
if tokens >= count then
  tokens = tokens - count
elseif count > limit then
  wait = -1
else
  wait = (count - tokens) / refill
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'at', string.format('%.3f', now))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return string.format('%.3f', wait)
"""


class RedisRateLimiter:
    """Token buckets per server subject in Redis; `limit == 0` means unlimited."""

    def __init__(self, client: Client, keys: RedisKeys, limit: int, period_s: float,
                 fallback: RateLimiter) -> None:
        self.limit = limit
        self._keys = keys
        self._refill_per_ms = limit / (period_s * 1000) if limit else 0.0
        self._ttl_ms = int(period_s * 1000) + 1000  # a bucket idle for a period is full again
        self._take = client.register_script(TAKE)
        self._fallback = fallback
        self._degraded = False  # logged once per outage, not once per publish

    def acquire(self, subject: str, count: int = 1) -> float:
        """0.0 when granted, else seconds until `count` tokens would be available (inf
        when `count` exceeds the bucket)."""
        if not self.limit:
            return 0.0
        try:
            wait_ms = float(self._take(keys=[self._keys.rate(subject)],
                                       args=[self.limit, repr(self._refill_per_ms), count, self._ttl_ms]))
        except REDIS_ERRORS as exc:
            if not self._degraded:
                self._degraded = True
                log.warning("redis unreachable: rate limits are per gateway until it returns", extra={
                    "event": "rate_limit_local", "detail": str(exc)})
            return self._fallback.acquire(subject, count)
        self._degraded = False
        return float("inf") if wait_ms < 0 else wait_ms / 1000
