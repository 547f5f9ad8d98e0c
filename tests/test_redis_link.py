"""wsgateway.redis_link without a server: key names on a single Redis and on a Redis Cluster."""
from __future__ import annotations

import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from wsgateway.redis_link import RedisKeys, cluster_twin_options


def test_a_single_servers_keys_keep_their_names():
    """On a single Redis every key is named as before sharding: one accounting for every queue."""
    keys = RedisKeys("wsgw")
    assert (keys.seats("21"), keys.queue("21"), keys.stream("gw"), keys.rate("srv")) == (
        "wsgw:seats:21", "wsgw:queue:21", "wsgw:stream:gw", "wsgw:rate:srv")
    assert [shard.queue_sizes for shard in keys.shards] == ["wsgw:queue-sizes"]
    assert keys.idempotency("srv", "k") == ("wsgw:idempotency:3:srv:k", "wsgw:idempotency")


def test_a_clusters_keys_share_a_slot_with_their_shards_accounting():
    """On a cluster a player's keys and its shard's accounting share one slot; gateway keys share another."""
    keys = RedisKeys("wsgw", cluster=True)
    for player in ("21", "jö-玩家", "{evil}"):
        shard = keys.shard_of(player)
        slots = {key_slot(key.encode()) for key in (keys.seats(player), keys.present(player), keys.queue(player),
                                                    keys.missed(player), shard.queue_index, shard.queue_heads,
                                                    shard.queue_sizes, shard.queue_clock, shard.players)}
        assert len(slots) == 1, player
    assert len({key_slot(key.encode()) for key in (keys.gateways, keys.gateway_connections, keys.streams,
                                                   keys.sweep_lock)}) == 1
    assert len({key_slot(key.encode()) for key in keys.idempotency("srv", "k")}) == 1
    assert key_slot(keys.stream("gw-1").encode()) == key_slot(b"gw-1"), "each stream in its gateway's slot"


def test_the_shards_spread_evenly_over_the_slots():
    """16 shards: one slot near the middle of each sixteenth of the cluster's slots."""
    slots = [key_slot(shard.base.encode()) for shard in RedisKeys("wsgw", cluster=True).shards]
    width = REDIS_CLUSTER_HASH_SLOTS / len(slots)
    assert [int(slot // width) for slot in slots] == list(range(len(slots)))


def test_the_blocking_twin_of_a_tls_cluster_client_speaks_tls():
    """The reader's own cluster client keeps credentials and TLS, with a longer socket timeout."""
    options = cluster_twin_options({"password": "pw", "connection_class": redis.SSLConnection, "socket_timeout": 5,
                                    "redis_connect_func": print, "ssl_cert_reqs": "none"}, block_s=1.0)
    assert options == {"password": "pw", "ssl": True, "socket_timeout": 6.0, "max_connections": 2,
                       "ssl_cert_reqs": "none"}
