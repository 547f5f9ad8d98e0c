"""What every Redis-backed part shares: the client, the key names, and error translation.

All keys live under one prefix (`-broker-prefix`, default `wsgw`), so several gateway
clusters, or test runs, can share a Redis without seeing each other. Every Redis failure
surfaces as `BrokerUnavailable`, which the web face answers with 503.
"""
from __future__ import annotations

import os
import secrets
import socket
from contextlib import contextmanager
from typing import Iterator

import redis

from wsgateway.errors import BrokerUnavailable


POOL_CONNECTIONS = 100  # Redis connections one gateway process opens at most


KEEPALIVE_IDLE_S = 30  # an idle connection is probed after this long, then every interval
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_PROBES = 3


def create_client(url: str, timeout_s: float) -> redis.Redis:
    """A pooled client for `redis://`, `rediss://` or `unix://` URLs (password in the URL).

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
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=POOL_CONNECTIONS, timeout=timeout_s, socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s, health_check_interval=30, **options)
    return redis.Redis(connection_pool=pool)


def new_gateway_id() -> str:
    """A name no other gateway, nor this one after a restart, ever uses."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@contextmanager
def broker_errors(action: str) -> Iterator[None]:
    """Turn any Redis failure inside the block into `BrokerUnavailable`."""
    try:
        yield
    except redis.RedisError as exc:
        raise BrokerUnavailable(f"redis {action} failed: {type(exc).__name__}: {exc}") from exc


SAFE_EVICTION_POLICY = "noeviction"


def eviction_risk(client: redis.Redis) -> str | None:
    """What is wrong when this Redis may evict keys under memory pressure, else None.

    Every key the gateway writes carries an expiry, so even the `volatile-*` policies may
    pick them: an evicted presence entry is written back within a heartbeat, but an
    evicted offline queue, idempotency entry or rate bucket is lost without a word. Only
    `noeviction` (writes then fail, and the gateway answers 503) or no memory limit is safe.
    A Redis that hides its settings (some managed services) is given the benefit of the doubt."""
    try:
        memory = client.info("memory")
    except redis.ResponseError:
        return None
    policy = memory.get("maxmemory_policy")
    if policy is None or policy == SAFE_EVICTION_POLICY or not int(memory.get("maxmemory", 0) or 0):
        return None
    return (f"maxmemory-policy {policy} with maxmemory {memory.get('maxmemory_human', memory.get('maxmemory'))} "
            f"may evict the gateway's keys (use {SAFE_EVICTION_POLICY})")


class RedisKeys:
    """Names of the keys and streams one gateway cluster uses."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.queue_index = f"{prefix}:queues"  # ZSET player -> when its whole queue has expired
        self.queue_heads = f"{prefix}:queue-heads"  # ZSET queue -> expiry of its oldest frame
        self.queue_sizes = f"{prefix}:queue-sizes"  # HASH queue -> accounted bytes; field "" = all queues
        self.queue_clock = f"{prefix}:queue-clock"  # the last queued frame's stamp (expiry_ms * 1000 + n)
        self.gateways = f"{prefix}:gateways"  # ZSET gateway -> presence expiry
        self.gateway_connections = f"{prefix}:gateway-connections"  # HASH gateway -> connections
        self.streams = f"{prefix}:streams"  # ZSET gateway -> until when it reads its stream (broadcasts)
        self.players = f"{prefix}:players"  # ZSET player -> expiry of its latest present seat
        self.sweep_lock = f"{prefix}:sweep-lock"
        self.idempotency_index = f"{prefix}:idempotency"  # ZSET entry key -> expiry
        # history (-history-size), see history_redis
        self.history_epoch = f"{prefix}:history-epoch"  # STRING: this data set's epoch, made when missing
        self.history_broadcasts = f"{prefix}:history-broadcasts"  # LIST: the broadcast stream's kept items
        self.history_broadcast_meta = f"{prefix}:history-broadcast-meta"  # HASH seq, trimmed, generations
        self.history_heads = f"{prefix}:history-heads"  # ZSET stream list -> expiry of its oldest item
        self.history_sizes = f"{prefix}:history-sizes"  # HASH stream list -> accounted bytes; field "" = all

    def seats(self, player_id: str) -> str:
        """ZSET seat -> expiry: every connection of the player, reserved or present."""
        return f"{self.prefix}:seats:{player_id}"

    def present(self, player_id: str) -> str:
        """ZSET seat -> expiry: connections that took their seat and get live messages."""
        return f"{self.prefix}:present:{player_id}"

    def queue(self, player_id: str) -> str:
        """LIST of "expiry_ms.nnn:frame" items, oldest first (nnn orders frames queued in one ms)."""
        return f"{self.prefix}:queue:{player_id}"

    def missed(self, player_id: str) -> str:
        """HASH dropped/expired: what the player's queue lost since its last connection."""
        return f"{self.prefix}:missed:{player_id}"

    def stream(self, gateway_id: str) -> str:
        """STREAM of the envelopes for one gateway: its players' messages and broadcasts."""
        return f"{self.prefix}:stream:{gateway_id}"

    def idempotency(self, subject_id: str, key: str) -> str:
        """One remembered publish: its fingerprint and, once known, its answer."""
        return f"{self.prefix}:idempotency:{len(subject_id)}:{subject_id}:{key}"

    def history(self, player_id: str) -> str:
        """LIST of one player's kept messages, oldest first (see history_redis)."""
        return f"{self.prefix}:history:{player_id}"

    def history_meta(self, player_id: str) -> str:
        """HASH gen, seq, trimmed, after, created, taken: one player stream's state."""
        return f"{self.prefix}:history-meta:{player_id}"

    def rate(self, subject_id: str) -> str:
        return f"{self.prefix}:rate:{subject_id}"
