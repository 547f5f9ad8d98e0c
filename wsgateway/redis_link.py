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


def create_client(url: str, timeout_s: float) -> redis.Redis:
    """A pooled client for `redis://`, `rediss://` or `unix://` URLs (password in the URL).

    Commands fail after `timeout_s` instead of hanging on a stalled server."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                health_check_interval=30)


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


class RedisKeys:
    """Names of the keys and channels one gateway cluster uses."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.queue_index = f"{prefix}:queues"  # ZSET player -> when its whole queue has expired
        self.gateways = f"{prefix}:gateways"  # ZSET gateway -> presence expiry
        self.gateway_connections = f"{prefix}:gateway-connections"  # HASH gateway -> connections
        self.broadcast_channel = f"{prefix}:all"
        self.sweep_lock = f"{prefix}:sweep-lock"
        self.idempotency_index = f"{prefix}:idempotency"  # ZSET entry key -> expiry

    def seats(self, player_id: str) -> str:
        """ZSET seat -> expiry: every connection of the player, reserved or present."""
        return f"{self.prefix}:seats:{player_id}"

    def present(self, player_id: str) -> str:
        """ZSET seat -> expiry: connections that took their seat and get live messages."""
        return f"{self.prefix}:present:{player_id}"

    def queue(self, player_id: str) -> str:
        """LIST of "expiry_ms:frame" items, oldest first."""
        return f"{self.prefix}:queue:{player_id}"

    def missed(self, player_id: str) -> str:
        """HASH dropped/expired: what the player's queue lost since its last connection."""
        return f"{self.prefix}:missed:{player_id}"

    def channel(self, gateway_id: str) -> str:
        """The pub/sub channel one gateway listens on for its players' messages."""
        return f"{self.prefix}:gw:{gateway_id}"

    def alive(self, gateway_id: str) -> str:
        """Exists while the gateway's presence entries are known to be in Redis."""
        return f"{self.prefix}:alive:{gateway_id}"

    def idempotency(self, subject_id: str, key: str) -> str:
        """One remembered publish: its fingerprint and, once known, its answer."""
        return f"{self.prefix}:idempotency:{len(subject_id)}:{subject_id}:{key}"

    def rate(self, subject_id: str) -> str:
        return f"{self.prefix}:rate:{subject_id}"
