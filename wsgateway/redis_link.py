"""What every Redis-backed part shares: the client, the key names, and error translation.

All keys live under one prefix (`-broker-prefix`, default `wsgw`), so several gateway
clusters, or test runs, can share a Redis without seeing each other. Every Redis failure
surfaces as `BrokerUnavailable`, which the web face answers with 503.

`-broker` names a single server (`redis://`, `rediss://`, `unix://`) or a Redis Cluster
(`redis+cluster://host:port,host:port`, `rediss+cluster://` for TLS: any reachable nodes,
as seeds). On a cluster, redis-py's own cluster client routes each command by its key's
slot and follows failovers (it refreshes its slot map when a node stops answering or
answers MOVED); every Lua step touches keys of one slot only (see `RedisKeys`).
"""
from __future__ import annotations

import functools
import os
import secrets
import socket
import zlib
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple
from urllib.parse import urlsplit

import redis
import redis.cluster
from redis.commands.core import Script
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from wsgateway.errors import BrokerUnavailable


POOL_CONNECTIONS = 100  # Redis connections one gateway process opens at most (per node of a cluster)
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}  # -> the scheme of each node

# One gateway's client of -broker: a single server's, or a Redis Cluster's.
Client = redis.Redis | redis.cluster.RedisCluster
# What a failing Redis raises. The cluster client's own exceptions (no node reachable, a
# slot without a master during a failover) are not `RedisError`s.
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)


KEEPALIVE_IDLE_S = 30  # an idle connection is probed after this long, then every interval
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_PROBES = 3


def create_client(url: str, timeout_s: float) -> Client:
    """A pooled client for `redis://`, `rediss://` or `unix://` URLs (password in the URL),
    or a cluster client for `redis+cluster://` and `rediss+cluster://`, which asks the
    seeds for the slot map at once (and raises one of `REDIS_ERRORS` when none answers).

    Commands fail after `timeout_s` instead of hanging on a stalled server. When every
    pooled connection is busy (a rush of 2,000 players connecting at once), a command
    waits up to `timeout_s` for one instead of failing at once: redis-py's default pool
    raised "Too many connections", and those players were refused with 503.

    Over TCP, the kernel also gives up on a command Redis has not acknowledged within
    `timeout_s` (`TCP_USER_TIMEOUT`): behind a partition that drops packets, closing a
    timed-out connection leaves its unsent command in the kernel, which kept
    retransmitting it, and Redis ran it when the network healed, seconds after the
    publisher was answered 503 ("nothing was accepted") or `scope: local`."""
    options: dict[str, object] = {}
    if not url.startswith("unix:"):
        wanted = {"TCP_KEEPIDLE": KEEPALIVE_IDLE_S, "TCP_KEEPINTVL": KEEPALIVE_INTERVAL_S,
                  "TCP_KEEPCNT": KEEPALIVE_PROBES, "TCP_USER_TIMEOUT": max(1, int(timeout_s * 1000))}
        options["socket_keepalive_options"] = {getattr(socket, name): value for name, value in wanted.items()
                                               if hasattr(socket, name)}  # all of them on Linux
    if is_cluster_url(url):
        return _create_cluster_client(url, timeout_s, options)
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=POOL_CONNECTIONS, timeout=timeout_s, socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s, health_check_interval=30, **options)
    return redis.Redis(connection_pool=pool)


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0] in CLUSTER_SCHEMES


def cluster_seeds(url: str) -> tuple[str, list[tuple[str, int]]]:
    """(URL of the first seed in its node scheme, with credentials and query; every seed's
    (host, port)) of `redis+cluster://[user:password@]host:port,host:port[/0][?...]`."""
    scheme, rest = url.split("://", 1)
    userinfo, at, location = rest.rpartition("@")
    hosts, _, tail = location.partition("/")
    hosts, question, query = hosts.partition("?")
    if tail:
        database, question, query = tail.partition("?")
        if database not in ("", "0"):
            raise ValueError(f"a Redis Cluster has database 0 only, not {database!r}")
    seeds = []
    for seed in hosts.split(","):
        parsed = urlsplit(f"//{seed.strip()}")
        if not parsed.hostname or parsed.port is None:
            raise ValueError(f"{seed!r} is not host:port")
        seeds.append((parsed.hostname, parsed.port))
    first = f"{CLUSTER_SCHEMES[scheme]}://{userinfo}{at}{hosts.split(',')[0].strip()}"
    return (first + f"?{query}" if question else first), seeds


def _create_cluster_client(url: str, timeout_s: float, options: dict[str, object]) -> redis.cluster.RedisCluster:
    first, seeds = cluster_seeds(url)
    # A node's pool blocks for a free connection as a single server's does.
    pool_class = functools.partial(redis.BlockingConnectionPool, timeout=timeout_s)
    return redis.cluster.RedisCluster(
        url=first, startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in seeds[1:]],
        connection_pool_class=pool_class, max_connections=POOL_CONNECTIONS, socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s, health_check_interval=30, **options)


def blocking_twin(client: Client, block_s: float) -> Client:
    """A client of the same server or cluster whose socket timeout outlasts a blocking
    read of `block_s`: the shared client's timeout (-db-timeout) may be shorter."""
    if isinstance(client, redis.cluster.RedisCluster):
        return redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(node.host, node.port) for node in client.get_nodes()],
            **cluster_twin_options(client.nodes_manager.connection_kwargs, block_s))
    pool = client.connection_pool
    options = dict(pool.connection_kwargs)
    timeout_s = options.get("socket_timeout") or 0
    options["socket_timeout"] = timeout_s + block_s
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, max_connections=2,
                                                            **options))


# connection settings a cluster client adds for itself (bound to that client), not to copy
_CLUSTER_CLIENT_OWN = ("redis_connect_func", "oss_cluster_maint_notifications_handler", "connection_pool_class")


def cluster_twin_options(connection_kwargs: dict[str, Any], block_s: float) -> dict[str, Any]:
    """A cluster client's node settings for its blocking twin: the same credentials and
    TLS (a `rediss` URL's connection class said as `ssl=True`, which is what the nodes'
    clients take), a socket timeout longer by `block_s`, two connections per node."""
    options = {name: value for name, value in connection_kwargs.items() if name not in _CLUSTER_CLIENT_OWN}
    connection_class = options.pop("connection_class", None)
    if connection_class is not None and issubclass(connection_class, redis.SSLConnection):
        options["ssl"] = True
    options["socket_timeout"] = (options.get("socket_timeout") or 0) + block_s
    options["max_connections"] = 2
    return options


def is_cluster(client: object) -> bool:
    """A cluster client, or one of its pipelines (`ClusterPipeline` is a `RedisCluster`)."""
    return isinstance(client, redis.cluster.RedisCluster)


def pipelined(pipeline: Any, script: Script, keys: list[str], args: list[Any]) -> None:
    """Queue one run of `script` on `pipeline`. A single server's pipeline sends EVALSHA
    (loading the script first when needed); a cluster pipeline refuses EVALSHA, so it
    sends the script's text (EVAL), which each node caches after the first run."""
    if is_cluster(pipeline):
        pipeline.execute_command("EVAL", script.script, len(keys), *keys, *args)
    else:
        script(keys=keys, args=args, client=pipeline)


def new_gateway_id() -> str:
    """A name no other gateway, nor this one after a restart, ever uses."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@contextmanager
def broker_errors(action: str) -> Iterator[None]:
    """Turn any Redis failure inside the block into `BrokerUnavailable`."""
    try:
        yield
    except REDIS_ERRORS as exc:
        raise BrokerUnavailable(f"redis {action} failed: {type(exc).__name__}: {exc}") from exc


SAFE_EVICTION_POLICY = "noeviction"


def eviction_risk(client: Client) -> str | None:
    """What is wrong when this Redis may evict keys under memory pressure, else None.

    Every key the gateway writes carries an expiry, so even the `volatile-*` policies may
    pick them: an evicted presence entry is written back within a heartbeat, but an
    evicted offline queue, idempotency entry or rate bucket is lost without a word. Only
    `noeviction` (writes then fail, and the gateway answers 503) or no memory limit is safe.
    A Redis that hides its settings (some managed services) is given the benefit of the doubt.
    On a cluster every master is asked, and the first one at risk is named."""
    try:
        if is_cluster(client):
            answers = client.info("memory", target_nodes=redis.cluster.RedisCluster.PRIMARIES)
            return next((f"{node}: {risk}" for node, memory in sorted(answers.items())
                         if (risk := _memory_risk(memory)) is not None), None)
        memory = client.info("memory")
    except redis.ResponseError:
        return None
    return _memory_risk(memory)


def _memory_risk(memory: dict[str, Any]) -> str | None:
    policy = memory.get("maxmemory_policy")
    if policy is None or policy == SAFE_EVICTION_POLICY or not int(memory.get("maxmemory", 0) or 0):
        return None
    return (f"maxmemory-policy {policy} with maxmemory {memory.get('maxmemory_human', memory.get('maxmemory'))} "
            f"may evict the gateway's keys (use {SAFE_EVICTION_POLICY})")


CLUSTER_SHARDS = 16  # accounting shards on a Redis Cluster: fixed, since a player's keys are named by its shard


class ShardKeys(NamedTuple):
    """One accounting shard: the players hashed to it and the bookkeeping of their queues,
    all under one hash tag (`base`), so one slot: a Lua step on a player and its shard's
    accounting touches keys of one slot only. A single server has one shard, whose keys
    are those of one cluster-wide accounting (the names are the same as before sharding)."""

    base: str  # what every key of the shard starts with: the prefix, or `{prefix:sN}` on a cluster
    queue_index: str  # ZSET queue -> when its whole queue has expired
    queue_heads: str  # ZSET queue -> expiry of its oldest frame
    queue_sizes: str  # HASH queue -> accounted bytes; field "" = all queues of the shard
    queue_clock: str  # the last queued frame's stamp (expiry_ms * 1000 + n)
    players: str  # ZSET player -> expiry of its latest present seat
    idempotency_index: str  # ZSET entry key -> expiry

    @classmethod
    def under(cls, base: str) -> ShardKeys:
        return cls(base, f"{base}:queues", f"{base}:queue-heads", f"{base}:queue-sizes", f"{base}:queue-clock",
                   f"{base}:players", f"{base}:idempotency")

    def queue(self, player_id: str) -> str:
        """LIST of "expiry_ms.nnn:frame" items, oldest first (nnn orders frames queued in one ms)."""
        return f"{self.base}:queue:{player_id}"

    def missed(self, player_id: str) -> str:
        """HASH dropped/expired: what the player's queue lost since its last connection."""
        return f"{self.base}:missed:{player_id}"

    def handover(self, seat_id: str) -> str:
        """LIST of the queue items a seat took, until its gateway has them (or gives them back)."""
        return f"{self.base}:handover:{seat_id}"


class RedisKeys:
    """Names of the keys and streams one gateway cluster uses.

    On a single server every name is `prefix:...`. On a Redis Cluster (`cluster=True`)
    names carry hash tags, so that each Lua step stays within one slot:

    * a player's keys (seats, presence, queue, missed) and the accounting of its shard
      share the tag `{prefix:sN}`, N = crc32(player) mod `CLUSTER_SHARDS`; the shards' tags
      are chosen so that their slots lie evenly over 0..16383, and so over the masters of
      a cluster whose slots are split evenly (as `redis-cli --cluster create` does);
    * what concerns gateways (their liveness, connection counts, the readers' registry,
      the sweep lock) shares the tag `{prefix}`: one slot;
    * each gateway's stream is tagged by the gateway (`prefix:stream:{gateway}`), so the
      streams, and the live messages, spread over the masters;
    * an idempotency entry and its shard's index share the shard of (subject, key).
    """

    def __init__(self, prefix: str, *, cluster: bool = False) -> None:
        self.prefix = prefix
        self.cluster = cluster
        gateway_base = f"{{{prefix}}}" if cluster else prefix
        self.gateways = f"{gateway_base}:gateways"  # ZSET gateway -> presence expiry
        self.gateway_connections = f"{gateway_base}:gateway-connections"  # HASH gateway -> connections
        self.streams = f"{gateway_base}:streams"  # ZSET gateway -> until when it reads its stream (broadcasts)
        self.sweep_lock = f"{gateway_base}:sweep-lock"
        # history (-history-size, a single server only so far), see history_redis
        self.history_epoch = f"{prefix}:history-epoch"  # STRING: this data set's epoch, made when missing
        self.history_broadcasts = f"{prefix}:history-broadcasts"  # LIST: the broadcast stream's kept items
        self.history_broadcast_meta = f"{prefix}:history-broadcast-meta"  # HASH seq, trimmed, generations
        self.history_heads = f"{prefix}:history-heads"  # ZSET stream list -> expiry of its oldest item
        self.history_sizes = f"{prefix}:history-sizes"  # HASH stream list -> accounted bytes; field "" = all
        self.shards: tuple[ShardKeys, ...] = (
            tuple(ShardKeys.under(f"{{{tag}}}") for tag in _spread_tags(prefix, CLUSTER_SHARDS)) if cluster
            else (ShardKeys.under(prefix),))

    def shard_of(self, name: str) -> ShardKeys:
        """The accounting shard of a player (or any name): stable across processes and hosts."""
        if len(self.shards) == 1:
            return self.shards[0]
        return self.shards[zlib.crc32(name.encode("utf-8", "surrogatepass")) % len(self.shards)]

    def seats(self, player_id: str) -> str:
        """ZSET seat -> expiry: every connection of the player, reserved or present."""
        return f"{self.shard_of(player_id).base}:seats:{player_id}"

    def present(self, player_id: str) -> str:
        """ZSET seat -> expiry: connections that took their seat and get live messages."""
        return f"{self.shard_of(player_id).base}:present:{player_id}"

    def queue(self, player_id: str) -> str:
        return self.shard_of(player_id).queue(player_id)

    def missed(self, player_id: str) -> str:
        return self.shard_of(player_id).missed(player_id)

    def handover(self, player_id: str, seat_id: str) -> str:
        return self.shard_of(player_id).handover(seat_id)

    def stream(self, gateway_id: str) -> str:
        """STREAM of the envelopes for one gateway: its players' messages and broadcasts."""
        return f"{self.prefix}:stream:{{{gateway_id}}}" if self.cluster else f"{self.prefix}:stream:{gateway_id}"

    def idempotency(self, subject_id: str, key: str) -> tuple[str, str]:
        """(entry, its shard's index) of one remembered publish: its fingerprint and, once
        known, its answer."""
        name = f"{len(subject_id)}:{subject_id}:{key}"
        shard = self.shard_of(name)
        return f"{shard.base}:idempotency:{name}", shard.idempotency_index

    def history(self, player_id: str) -> str:
        """LIST of one player's kept messages, oldest first (see history_redis)."""
        return f"{self.prefix}:history:{player_id}"

    def history_meta(self, player_id: str) -> str:
        """HASH gen, seq, trimmed, after, created, taken: one player stream's state."""
        return f"{self.prefix}:history-meta:{player_id}"

    def history(self, player_id: str) -> str:
        """LIST of one player's kept messages, oldest first (see history_redis)."""
        return f"{self.prefix}:history:{player_id}"

    def history_meta(self, player_id: str) -> str:
        """HASH gen, seq, trimmed, after, created, taken: one player stream's state."""
        return f"{self.prefix}:history-meta:{player_id}"

    def rate(self, subject_id: str) -> str:
        return f"{self.prefix}:rate:{subject_id}"


@functools.lru_cache(maxsize=64)
def _spread_tags(prefix: str, count: int) -> tuple[str, ...]:
    """`count` hash tags `prefix:sN` (or `prefix:sN.k`, the first k that fits) whose slots
    lie near the middle of each of `count` equal ranges of the cluster's slots: 16 shards
    over 3 masters holding a third of the slots each go 5, 6, 5."""
    width = REDIS_CLUSTER_HASH_SLOTS / count
    tags = []
    for shard in range(count):
        middle = (shard + 0.5) * width
        attempt = 0
        while True:
            tag = f"{prefix}:s{shard}" if attempt == 0 else f"{prefix}:s{shard}.{attempt}"
            if abs(key_slot(tag.encode()) - middle) <= width / 8:
                tags.append(tag)
                break
            attempt += 1
    return tuple(tags)
