"""`IdempotencyStore` in Redis: the window is shared by every gateway of the cluster, so a
retry that lands on another gateway is recognised too.

Each key is one Redis string holding the request fingerprint and, once known, the
answer; it expires with the window. An index sorted by expiry enforces
`-idempotency-max-keys` for the whole cluster (the oldest keys are forgotten first). On a
Redis Cluster the entries are hashed into `CLUSTER_SHARDS` shards, each with its own index
(one slot per shard), and each shard keeps at most its share of the bound, rounded up.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any

import gevent

from wsgateway.idempotency import IN_FLIGHT_WAIT_S, Claim, ClaimState
from wsgateway.redis_link import Client, RedisKeys, broker_errors

POLL_INTERVAL_S = 0.02  # how often a twin looks for the first call's answer

# KEYS: entry, index. ARGV: pending value, window_ms, max_keys.
# Returns {1, existing value} or {0, evicted count} when the caller now owns the key.
CLAIM = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local existing = redis.call('GET', KEYS[1])
if existing then return {1, existing} end
local evicted = 0
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3]) + 1
if excess > 0 then
  local oldest = redis.call('ZPOPMIN', KEYS[2], excess)
  for index = 1, #oldest, 2 do
    redis.call('DEL', oldest[index])
    evicted = evicted + 1
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), KEYS[1])
return {0, evicted}
"""

# KEYS: entry, index. ARGV: fingerprint. Forgets the key only while it is still pending.
RELEASE = """
local value = redis.call('GET', KEYS[1])
if value and cjson.decode(value)['result'] == cjson.null then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], KEYS[1])
end
return 0
"""


class RedisIdempotencyStore:
    def __init__(self, client: Client, keys: RedisKeys, window_s: float, max_keys: int) -> None:
        self._client = client
        self._keys = keys
        self._window_ms = int(window_s * 1000)
        self._max_keys = math.ceil(max_keys / len(keys.shards))  # per shard
        self._claim = client.register_script(CLAIM)
        self._release = client.register_script(RELEASE)

    def claim(self, subject_id: str, key: str, request_fingerprint: str) -> Claim:
        entry, index = self._keys.idempotency(subject_id, key)
        pending = json.dumps({"fingerprint": request_fingerprint, "result": None})
        deadline = time.monotonic() + IN_FLIGHT_WAIT_S
        while True:
            with broker_errors("idempotency claim"):
                taken, detail = self._claim(keys=[entry, index],
                                            args=[pending, self._window_ms, self._max_keys])
            if not taken:
                return Claim(ClaimState.FRESH, evicted=int(detail))
            existing = json.loads(detail)
            if existing["fingerprint"] != request_fingerprint:
                return Claim(ClaimState.MISMATCH)
            if existing["result"] is not None:
                return Claim(ClaimState.REPLAY, existing["result"])
            if time.monotonic() >= deadline:
                return Claim(ClaimState.IN_PROGRESS)
            gevent.sleep(POLL_INTERVAL_S)  # the twin runs on another gateway: poll for its answer

    def complete(self, subject_id: str, key: str, result: dict[str, Any]) -> None:
        entry, _index = self._keys.idempotency(subject_id, key)
        with broker_errors("idempotency complete"):
            value = self._client.get(entry)
            if value is None:
                return
            stored = json.loads(value)
            stored["result"] = result
            self._client.set(entry, json.dumps(stored), xx=True, keepttl=True)

    def release(self, subject_id: str, key: str) -> None:
        with broker_errors("idempotency release"):
            self._release(keys=list(self._keys.idempotency(subject_id, key)))
