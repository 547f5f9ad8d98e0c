"""wsgateway.idempotency_redis: the idempotency window shared by every gateway, on a single
Redis and on a Redis Cluster (where the entries and the cap are split into shards)."""
from __future__ import annotations

from tests.support import TIMEOUT_S
from wsgateway.idempotency import ClaimState
from wsgateway.idempotency_redis import RedisIdempotencyStore
from wsgateway.redis_link import RedisKeys, create_client, is_cluster_url


def store(url: str, prefix: str, max_keys: int = 100) -> RedisIdempotencyStore:
    return RedisIdempotencyStore(create_client(url, TIMEOUT_S), RedisKeys(prefix, cluster=is_cluster_url(url)),
                                 window_s=60.0, max_keys=max_keys)


def test_a_key_claimed_on_one_gateway_is_replayed_on_another(redis_url, redis_prefix):
    """The first call's answer is what a retry on another gateway gets; another body is a mismatch."""
    first, second = store(redis_url, redis_prefix), store(redis_url, redis_prefix)
    assert first.claim("srv", "k", "fp").state is ClaimState.FRESH
    first.complete("srv", "k", {"delivered": 1})
    replay = second.claim("srv", "k", "fp")
    assert replay.state is ClaimState.REPLAY and replay.result == {"delivered": 1}
    assert second.claim("srv", "k", "other").state is ClaimState.MISMATCH
    assert second.claim("other-srv", "k", "fp").state is ClaimState.FRESH, "keys are per subject"


def test_a_released_key_can_be_claimed_again(redis_url, redis_prefix):
    """A refused call releases its key on every gateway, so the retry really runs."""
    first, second = store(redis_url, redis_prefix), store(redis_url, redis_prefix)
    first.claim("srv", "k", "fp")
    first.release("srv", "k")
    assert second.claim("srv", "k", "fp").state is ClaimState.FRESH


def test_past_the_cap_the_oldest_keys_are_forgotten(redis_url, redis_prefix):
    """Past -idempotency-max-keys (per shard on a cluster: its share, rounded up) the oldest are forgotten, counted."""
    keys = RedisKeys(redis_prefix, cluster=is_cluster_url(redis_url))
    shards = len(keys.shards)
    same_shard = [key for key in (f"k{number}" for number in range(5000))
                  if keys.idempotency("srv", key)[1] == keys.idempotency("srv", "k0")[1]][:3]
    window = store(redis_url, redis_prefix, max_keys=2 * shards)
    assert [window.claim("srv", key, "fp").evicted for key in same_shard] == [0, 0, 1]
    assert window.claim("srv", same_shard[0], "fp").state is ClaimState.FRESH, "the oldest was forgotten"
