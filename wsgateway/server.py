"""The gateway process: wiring, serving, periodic jobs and graceful shutdown.

`Gateway(config)` builds every component; `start()` creates the schema if needed, binds
and begins serving without blocking (tests use that, on port 0); `serve_forever()` also
installs SIGTERM/SIGINT handlers and returns once `shutdown()` has finished.

Shutdown: stop accepting, refuse new WebSocket upgrades and event streams (503), close
every player socket with 1001 (an event stream gets `gateway.close` 1001 and its end), let in-flight HTTP requests finish, end idle keep-alive connections,
and give up after `shutdown_timeout_s`.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import ssl
import time
from typing import Any, Callable

import gevent
import gevent.ssl
from gevent.event import Event
from prometheus_client import CollectorRegistry

from wsgateway.admission import ADMISSIONS_AT_ONCE, ADMISSIONS_WAITING_MOST, EVENTS_PATH, WEBSOCKET_PATH, EventStreamEndpoint, PlayerEndpoint
from wsgateway.admission_queue import AdmissionQueue
from wsgateway.auth_throttle import FailedAuthThrottle
from wsgateway.broker import Broker, InProcessBroker
from wsgateway.config import Config, ConfigError
from wsgateway.connection import CLOSE_HANDSHAKE_TIMEOUT_S
from wsgateway.delivery import Delivery
from wsgateway.errors import BrokerUnavailable, CloseCode
from wsgateway.hub import Hub
from wsgateway.idempotency import IdempotencyStore, MemoryIdempotencyStore
from wsgateway.keepalive import KeepAlive
from wsgateway.listening import listen_backlog
from wsgateway.metrics import DROP_STREAM_TRIMMED, GatewayMetrics
from wsgateway.history import History, MemoryHistory, keeps_history
from wsgateway.offline import MemoryOfflineQueue
from wsgateway.proxies import TrustedProxies
from wsgateway.publishing import Publishing
from wsgateway.ratelimit import Limiter, RateLimiter
from wsgateway.revalidation import Revalidator
from wsgateway.roster import HistoryLocalRoster, LocalRoster, Roster
from wsgateway.scheduling import let_io_in
from wsgateway.tokens import SqlTokenStore, TokenStore
from wsgateway.web_server import BuiltOnFirstRequest, WebLimits, WebServer

log = logging.getLogger(__name__)

ROSTER_UPKEEP_INTERVAL_S = 1.0  # offline expiry sweeps; Redis presence heartbeats when due
EVICTION_CHECK_INTERVAL_S = 10.0  # how often a -broker Redis's maxmemory-policy is checked again
FULL_COLLECTION_EVERY = 100  # middle-generation collections per full one (CPython's default: 10)
KILL_GRACE_S = 0.5  # of the shutdown timeout, kept for killing requests that did not finish


class Gateway:
    """One gateway process. Provides what `app.Services` describes."""

    def __init__(self, config: Config, *, registry: CollectorRegistry | None = None,
                 store: TokenStore | None = None, listener: socket.socket | None = None) -> None:
        """`listener`: an already bound socket (a worker's, inherited from the supervisor);
        by default the gateway binds -addr itself."""
        self.config = config
        self.metrics = GatewayMetrics(registry if registry is not None else CollectorRegistry())
        self.store: TokenStore = store if store is not None else SqlTokenStore(
            config.database_url, db_timeout_s=config.db_timeout_s, cache_period_s=config.revalidate_period_s)
        self.auth_throttle = FailedAuthThrottle(config.auth_fail_limit, trusted_ttl_s=config.revalidate_period_s)
        # A turn's lookup waits at most twice -db-timeout (the query in flight, then its own).
        self.admission_queue = AdmissionQueue(ADMISSIONS_AT_ONCE, stall_s=2 * config.db_timeout_s,
                                              on_crowded=lambda crowded: self.server.hold_accepting(crowded),
                                              crowded_at=ADMISSIONS_WAITING_MOST)
        self.hub = Hub(pause=let_io_in)
        self.roster: Roster
        self.broker: Broker
        self.offline: MemoryOfflineQueue | None = None  # with -broker, queues live in Redis
        self.history: History | None = None  # -history-size 0: none
        self.limiter: Limiter
        self.idempotency: IdempotencyStore
        self._redis: Any = None  # the -broker client (redis.Redis), for the eviction check
        self.eviction_risk: str | None = None  # what may make Redis evict our keys (see warnings())
        if config.broker_url:
            self._use_redis(config)
        else:
            offline = self.offline = MemoryOfflineQueue(config.max_queued, config.offline_ttl_s,
                                                        max_total_bytes=config.max_offline_bytes,
                                                        max_players=config.max_offline_players)
            history = self.history = self._memory_history(config)
            self.roster = LocalRoster(self.hub, offline, config.max_conns_per_player) if history is None \
                else HistoryLocalRoster(self.hub, offline, config.max_conns_per_player, history)
            self.broker = InProcessBroker()
            self.limiter = RateLimiter(config.rate_limit, config.rate_period_s)
            self.idempotency = MemoryIdempotencyStore(config.idempotency_window_s, config.idempotency_max_keys)
            self.metrics.offline_queue_messages.set_function(lambda: len(offline))
            self.metrics.offline_queue_bytes.set_function(lambda: offline.held_bytes)
        self.delivery = Delivery(self.hub, self.roster, self.broker, self.metrics,
                                 notify_missed=config.notify_missed, history=self.history)
        self.keepalive = KeepAlive(self.hub.connections, config.ping_period_s, config.pong_wait_s)
        self.revalidator = Revalidator(self.store, self.hub.connections)
        self.server = WebServer(
            listener if listener is not None else (config.listen_host, config.listen_port),
            BuiltOnFirstRequest(self._flask_app), backlog=None if listener is not None else listen_backlog(),
            limits=WebLimits(request_timeout_s=config.request_timeout_s,
                             tls_handshake_timeout_s=config.tls_handshake_timeout_s,
                             max_connections=config.max_total_conns, max_body_bytes=config.max_body_bytes),
            publishing=Publishing(self), websocket_endpoints={WEBSOCKET_PATH: PlayerEndpoint(self)},
            stream_endpoints={EVENTS_PATH: EventStreamEndpoint(self)},
            ssl_context=tls_context(config.tls_cert_file, config.tls_key_file) if config.tls_cert_file else None,
            on_capacity_refusal=self.metrics.connections_rejected.labels("capacity").inc,
            trusted_proxies=TrustedProxies(config.trusted_proxies))
        self._jobs: list[gevent.Greenlet] = []
        self._stopped = Event()
        self._shutdown_started = False

    def _flask_app(self) -> Any:
        """The Flask app (`app.create_app`), imported and built for the first request that
        needs it: importing Flask is about a tenth of a start's CPU, and the players' `/ws`
        and `/events` and the publishing paths never reach it, so a restarted gateway
        serves a reconnect storm that much sooner."""
        from wsgateway.app import create_app

        return create_app(self)

    def _memory_history(self, config: Config) -> MemoryHistory | None:
        """The kept messages resuming connections replay (None with -history-size 0)."""
        if not keeps_history(config):
            return None
        history = MemoryHistory(config.history_size, config.history_ttl_s, config.max_history_bytes)
        self.metrics.history_messages.set_function(lambda: len(history))
        self.metrics.history_bytes.set_function(lambda: history.held_bytes)
        return history

    def _use_redis(self, config: Config) -> None:
        """Shared roster, broker and rate limit: every gateway on this -broker acts as one."""
        from wsgateway.broker_redis import RedisBroker, stream_ttl_ms
        from wsgateway.idempotency_redis import RedisIdempotencyStore
        from wsgateway.ratelimit_redis import RedisRateLimiter
        from wsgateway.redis_link import RedisKeys, broker_errors, create_client, is_cluster_url, new_gateway_id
        from wsgateway.roster_redis import RedisRoster

        with broker_errors("connect"):  # a cluster's client asks for the slot map at once
            client = create_client(config.broker_url, config.db_timeout_s)
        keys = RedisKeys(config.broker_prefix, cluster=is_cluster_url(config.broker_url))
        self.gateway_id = new_gateway_id()
        settings = dict(max_conns_per_player=config.max_conns_per_player,
                        max_queued=config.max_queued, offline_ttl_s=config.offline_ttl_s,
                        presence_ttl_s=config.presence_ttl_s, max_offline_bytes=config.max_offline_bytes,
                        max_offline_players=config.max_offline_players, stream_length=config.broker_stream_length)
        if keeps_history(config):
            from wsgateway.history_redis import HistoryRoster, RedisHistory
            history = self.history = RedisHistory(
                client, keys, max_per_stream=config.history_size, ttl_s=config.history_ttl_s,
                max_total_bytes=config.max_history_bytes, stream_length=config.broker_stream_length,
                stream_ttl_s=stream_ttl_ms(config.presence_ttl_s) / 1000)  # the broker's stream expiry
            roster: RedisRoster = HistoryRoster(client, keys, self.gateway_id, history=history, **settings)
        else:
            roster = RedisRoster(client, keys, self.gateway_id, **settings)
        self.roster = roster
        self.broker = RedisBroker(
            client, keys, self.gateway_id, stream_length=config.broker_stream_length,
            member_ttl_s=config.presence_ttl_s,
            on_subscribed=lambda: self._quietly(lambda: self.delivery.reassert_presence(force=True)),
            on_lost=self.metrics.messages_dropped.labels(DROP_STREAM_TRIMMED).inc)
        self._redis = client
        self.limiter = RedisRateLimiter(client, keys, config.rate_limit, config.rate_period_s,
                                        fallback=RateLimiter(config.rate_limit, config.rate_period_s))
        self.idempotency = RedisIdempotencyStore(client, keys, config.idempotency_window_s,
                                                 config.idempotency_max_keys)

    def _quietly(self, job: Callable[[], object]) -> None:
        try:
            job()
        except BrokerUnavailable as exc:
            log.warning("broker unavailable", extra={"event": "broker_unavailable", "detail": str(exc)})

    @property
    def scheme(self) -> str:
        """"https" when serving TLS, else "http" (WebSocket: "wss" or "ws")."""
        return "https" if self.config.tls_cert_file else "http"

    @property
    def draining(self) -> bool:
        return self.server.draining

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the real port when configured with 0."""
        return self.server.address[0], self.server.server_port

    def start(self) -> None:
        """Bind, create the schema if missing, and serve in the background.

        The address is bound first, so that a taken port fails before the database is
        touched (no sqlite file is created by a gateway that cannot listen). Raises OSError
        when the address cannot be bound, StoreUnavailable when the database cannot be
        reached (StoreMisconfigured when it refuses the settings or the table is not ours),
        ConfigError for a Redis that may evict our keys, BrokerUnavailable when Redis does
        not answer; the socket is closed again then."""
        self.server.init_socket()
        try:
            if self.store.ensure_schema():
                log.info("created table ws_token", extra={"event": "schema_created"})
            if self._redis is not None:
                risk = self._eviction_risk()
                if risk is not None:
                    raise ConfigError(f"-broker: {risk}")
            wait_subscribed = getattr(self.broker, "wait_subscribed", None)
            if wait_subscribed is not None and not wait_subscribed(self.config.db_timeout_s):
                self.broker.close()
                raise BrokerUnavailable(f"no answer from {self.config.broker_url.split('@')[-1]}")
        except BaseException:
            self.server.close()
            raise
        self.server.start()
        self._jobs = [
            gevent.spawn(self._every, self.keepalive.interval_s, lambda: self.keepalive.tick(time.monotonic()),
                         "keepalive"),
            gevent.spawn(self._every, self.config.revalidate_period_s, self.revalidator.run_once, "revalidation"),
            gevent.spawn(self._every, ROSTER_UPKEEP_INTERVAL_S, lambda: self._quietly(self.delivery.maintain),
                         "roster_upkeep"),
        ]
        if self._redis is not None:
            self._jobs.append(gevent.spawn(self._every, EVICTION_CHECK_INTERVAL_S,
                                           lambda: self._quietly(self._check_eviction), "eviction_check"))
        log.info("gateway listening", extra={"event": "started", "address": f"{self.address[0]}:{self.address[1]}",
                                             "db": self.config.db})

    def serve_forever(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully."""
        if not self.server.started:
            self.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, self._on_signal, signum)
        self._stopped.wait()

    def _on_signal(self, signum: int) -> None:
        log.info("signal received, shutting down", extra={"event": "signal", "signal": signal.Signals(signum).name})
        gevent.spawn(self.shutdown)

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Drain and stop; idempotent, and callers after the first wait for it to finish."""
        if self._shutdown_started:
            self._stopped.wait()
            return
        self._shutdown_started = True
        deadline = time.monotonic() + (self.config.shutdown_timeout_s if timeout_s is None else timeout_s)
        self.server.draining = True
        self.server.close()
        self.server.end_idle_connections()
        # Every close frame first, then one wait for all the answers: a timer per
        # connection would be thousands of greenlets for one deadline.
        connections = list(self.hub.connections())
        for connection in connections:
            connection.close(CloseCode.GOING_AWAY, handshake_timeout_s=None)  # type: ignore[attr-defined]
        pool = self.server.pool
        if pool is not None:
            kill_grace_s = min(KILL_GRACE_S, max(0.0, deadline - time.monotonic()) / 10)
            pool.join(timeout=min(CLOSE_HANDSHAKE_TIMEOUT_S, max(0.0, deadline - time.monotonic() - kill_grace_s)))
            for connection in self.hub.connections():  # their clients did not answer the close
                connection.hang_up()  # type: ignore[attr-defined]
            pool.join(timeout=max(0.0, deadline - time.monotonic() - kill_grace_s))
            pool.kill(block=True, timeout=kill_grace_s)
        gevent.killall(self._jobs, block=False)
        self._quietly(self.roster.close)
        self.broker.close()
        self.store.close()
        log.info("gateway stopped", extra={"event": "stopped", "connections_closed": len(connections)})
        self._stopped.set()

    def is_ready(self) -> dict[str, str]:
        return {
            "database": "ok" if self.store.is_reachable() else "unreachable",
            "broker": self.broker.state(),
            "accepting": "shutting down" if self.draining else "ok",
        }

    def warnings(self) -> dict[str, str]:
        """What /readyz reports without failing: the gateway serves, but a promise is at risk."""
        return {"redis_eviction": self.eviction_risk} if self.eviction_risk else {}

    def _eviction_risk(self) -> str | None:
        from wsgateway.redis_link import broker_errors, eviction_risk

        assert self._redis is not None
        with broker_errors("check of maxmemory-policy"):
            return eviction_risk(self._redis)

    def _check_eviction(self) -> None:
        """The gateway refuses to start on a Redis that may evict its keys; one that is
        reconfigured so while it runs is reported loudly (log, metric, /readyz) rather than
        taking every gateway out of service at once."""
        risk = self._eviction_risk()
        if risk is not None:
            log.warning("redis may evict the gateway's keys", extra={"event": "redis_may_evict", "detail": risk})
        self.eviction_risk = risk
        self.metrics.redis_may_evict.set(1 if risk else 0)

    def _every(self, period_s: float, job: Callable[[], object], name: str) -> None:
        """Run `job` every `period_s` until killed; a failing run is logged, not fatal."""
        while True:
            gevent.sleep(period_s)
            try:
                job()
            except Exception:
                log.exception("periodic job failed", extra={"event": "job_failed", "job": name})


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The server's TLS context (TLS 1.2 and newer) from PEM files; `ConfigError` naming
    the flag when a file cannot be read or the two do not make a certificate and its key.
    A gevent context, so that handshakes and reads wait cooperatively."""
    for flag, path, marker, what in (("-tls-cert", cert_file, "CERTIFICATE-----", "PEM certificate"),
                                     ("-tls-key", key_file, "PRIVATE KEY-----", "PEM private key")):
        try:
            with open(path, "rb") as handle:
                if marker.encode() not in handle.read():
                    raise ConfigError(f"{flag}: {path!r} holds no {what}")
        except OSError as exc:
            raise ConfigError(f"{flag}: cannot read {path!r}: {exc.strerror or exc}") from None
    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise ConfigError(f"-tls-key: {key_file!r} cannot be used with -tls-cert {cert_file!r}: "
                          f"{exc.reason or exc}") from None
    return context


def freeze_startup_heap() -> int:
    """Keep what the process built before serving (modules, the app, the pools) out of
    every later full garbage collection; return how many objects that is. A full
    collection walks every tracked object while nothing else runs: at 2,000 connections
    that was 140,000 objects and up to 60 ms on 2 cores, 63,000 of them from start-up,
    which live as long as the process anyway. Garbage is collected first, so none of it
    is frozen (it would never be freed).

    Full collections also become rarer: one per `FULL_COLLECTION_EVERY` collections of
    the middle generation instead of 10. While players arrive, nearly every surviving
    object is a live connection's, and CPython ran a full collection each time they grew
    by a quarter: 7 of them while 10,000 players connected, each walking every
    connection's objects (about 2.7 s of collection of the 5 s the gateway worked,
    measured with gc.callbacks on a busy machine; 0.4 s with this setting). The young
    generations are collected as often as before, so the pauses stay short."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
    return gc.get_freeze_count()


def write_pid_file(path: str) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(f"{os.getpid()}\n")


def remove_pid_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
