"""`Broker` over Redis pub/sub: envelopes travel between gateway processes and hosts.

Each gateway listens on its own channel (messages for players it holds) and on the
cluster's broadcast channel. A publish goes only to the gateways the roster named, in one
pipelined round trip. Redis pub/sub delivers in publish order per connection and at most
once, which is this broker's guarantee too: a gateway that is not subscribed at the
moment (Redis restarting, the listener reconnecting) misses what is published meanwhile.

The listener reconnects by itself with capped exponential backoff.
"""
from __future__ import annotations

import logging
import struct
import time
from typing import Callable

import gevent
import redis

from wsgateway.broker import Deliver, Envelope
from wsgateway.errors import BrokerUnavailable
from wsgateway.redis_link import RedisKeys, broker_errors

log = logging.getLogger(__name__)

RECONNECT_FIRST_DELAY_S = 0.1
RECONNECT_MAX_DELAY_S = 5.0
POLL_TIMEOUT_S = 1.0  # the listener wakes at least this often to check its connection
HEALTH_CHECK_PERIOD_S = 5.0  # an idle subscription is pinged this often, so a dead link is noticed
SUBSCRIBE_TIMEOUT_S = 5.0  # how long Redis may take to confirm a subscription before we reconnect

_TO_PLAYER = b"P"
_TO_ALL = b"A"


def encode(envelope: Envelope) -> bytes:
    """Wire form: `A` + frame, or `P` + 2-byte length + player id + frame."""
    if envelope.player_id is None:
        return _TO_ALL + envelope.frame
    player = envelope.player_id.encode("utf-8", "surrogatepass")
    return _TO_PLAYER + struct.pack("!H", len(player)) + player + envelope.frame


def decode(data: bytes) -> Envelope:
    if data[:1] == _TO_ALL:
        return Envelope(data[1:])
    (length,) = struct.unpack_from("!H", data, 1)
    return Envelope(data[3 + length:], data[3:3 + length].decode("utf-8", "surrogatepass"))


class RedisBroker:
    """Carries envelopes between gateways through Redis pub/sub."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, gateway_id: str,
                 on_subscribed: Callable[[], None] | None = None) -> None:
        """`on_subscribed` runs (in its own greenlet) after every (re)subscription: Redis
        may have restarted and lost what this gateway wrote there."""
        self.gateway_id = gateway_id
        self._on_subscribed = on_subscribed
        self._client = client
        self._keys = keys
        self._deliver: Deliver | None = None
        self._listener: gevent.Greenlet | None = None
        self._subscribed = gevent.event.Event()
        self._closed = False

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._listener = gevent.spawn(self._listen_forever)

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Block until the listener is subscribed (start-up), at most `timeout_s`."""
        return self._subscribed.wait(timeout_s)

    def publish(self, envelope: Envelope) -> None:
        data = encode(envelope)
        if envelope.gateways is None:
            channels = [self._keys.broadcast_channel]
        else:
            channels = [self._keys.channel(gateway) for gateway in envelope.gateways]
        with broker_errors("publish"):
            if len(channels) == 1:
                self._client.publish(channels[0], data)
                return
            pipeline = self._client.pipeline(transaction=False)
            for channel in channels:
                pipeline.publish(channel, data)
            pipeline.execute()

    def state(self) -> str:
        return "ok" if self._subscribed.is_set() else "reconnecting"

    def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.kill(block=False)

    def _listen_forever(self) -> None:
        delay_s = RECONNECT_FIRST_DELAY_S
        while not self._closed:
            try:
                self._listen_once()
            except (redis.RedisError, OSError, BrokerUnavailable) as exc:
                self._subscribed.clear()
                log.warning("redis subscription lost, reconnecting",
                            extra={"event": "broker_reconnecting", "delay_s": delay_s, "detail": str(exc)})
                gevent.sleep(delay_s)
                delay_s = min(delay_s * 2, RECONNECT_MAX_DELAY_S)
            else:
                delay_s = RECONNECT_FIRST_DELAY_S

    def _listen_once(self) -> None:
        pubsub = self._client.pubsub()
        try:
            channels = [self._keys.channel(self.gateway_id), self._keys.broadcast_channel]
            pubsub.subscribe(*channels)
            self._await_confirmation(pubsub, channels)
            self._subscribed.set()
            log.info("listening on redis", extra={"event": "broker_subscribed", "gateway": self.gateway_id})
            if self._on_subscribed is not None:
                gevent.spawn(self._on_subscribed)
            idle_s = 0.0
            while not self._closed:
                message = pubsub.get_message(timeout=POLL_TIMEOUT_S)
                if message is None:
                    idle_s += POLL_TIMEOUT_S
                    if idle_s >= HEALTH_CHECK_PERIOD_S:
                        pubsub.ping()
                        idle_s = 0.0
                    continue
                idle_s = 0.0
                if message["type"] == "message" and self._deliver is not None:
                    try:
                        self._deliver(decode(message["data"]))
                    except Exception:
                        log.exception("delivering a broker message failed", extra={"event": "delivery_failed"})
        finally:
            pubsub.close()

    @staticmethod
    def _await_confirmation(pubsub: redis.client.PubSub, channels: list[str]) -> None:
        """`subscribe` only sends the command. Until Redis has run it, what is published on
        these channels is dropped, so the gateway must not count as subscribed, nor
        announce its players' presence again (`on_subscribed`), before Redis confirms."""
        pending = {channel.encode() for channel in channels}
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
        while pending:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise BrokerUnavailable("redis did not confirm the subscription")
            message = pubsub.get_message(timeout=remaining_s)
            if message is not None and message["type"] == "subscribe":
                pending.discard(message["channel"])
