"""wsgateway.ratelimit_redis: one token bucket per server subject, shared by every gateway
(on a single Redis and on a Redis Cluster)."""
from __future__ import annotations

import math

from tests.support import TIMEOUT_S
from tests.support.redis_server import REDIS_URL
from wsgateway.ratelimit import RateLimiter
from wsgateway.ratelimit_redis import RedisRateLimiter
from wsgateway.redis_link import RedisKeys, create_client, is_cluster_url


def limiter(prefix: str, limit: int = 3, period_s: float = 60.0, url: str = REDIS_URL) -> RedisRateLimiter:
    return RedisRateLimiter(create_client(url, TIMEOUT_S), RedisKeys(prefix, cluster=is_cluster_url(url)), limit,
                            period_s, fallback=RateLimiter(limit, period_s))


def test_budget_is_shared_by_gateways(redis_url, redis_prefix):
    """Two gateways draw from the same bucket: the limit holds for the cluster."""
    first, second = limiter(redis_prefix, url=redis_url), limiter(redis_prefix, url=redis_url)
    assert [first.acquire("srv"), second.acquire("srv"), first.acquire("srv")] == [0.0, 0.0, 0.0]
    wait_s = second.acquire("srv")
    assert 19.0 < wait_s <= 20.0  # one token every 20 s at 3 per minute
    assert first.acquire("other") == 0.0, "buckets are per subject"


def test_batch_larger_than_the_bucket_never_passes(redis_url, redis_prefix):
    """Asking for more tokens than the bucket holds answers infinity and takes nothing."""
    shared = limiter(redis_prefix, url=redis_url)
    assert math.isinf(shared.acquire("srv", count=4))
    assert shared.acquire("srv", count=3) == 0.0


def test_zero_limit_is_unlimited(redis_prefix):
    """rate-limit 0 grants everything without asking Redis."""
    unlimited = limiter(redis_prefix, limit=0, url="redis://127.0.0.1:1/0")
    assert all(unlimited.acquire("srv") == 0.0 for _ in range(100))


def test_unreachable_redis_falls_back_to_this_gateways_bucket(redis_prefix):
    """Without Redis the limit is still enforced, per gateway."""
    local = limiter(redis_prefix, url="redis://127.0.0.1:1/0")
    assert [local.acquire("srv") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert local.acquire("srv") > 0
