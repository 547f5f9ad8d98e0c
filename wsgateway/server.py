"""The gateway process: wiring, serving, periodic jobs and graceful shutdown.

`Gateway(config)` builds every component; `start()` creates the schema if needed, binds
and begins serving without blocking (tests use that, on port 0); `serve_forever()` also
installs SIGTERM/SIGINT handlers and returns once `shutdown()` has finished.

Shutdown: stop accepting, refuse new WebSocket upgrades (503), close every player
socket with 1001, let in-flight HTTP requests finish, end idle keep-alive connections,
and give up after `shutdown_timeout_s`.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
from typing import Any, Callable

import gevent
from gevent.event import Event
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer
from prometheus_client import CollectorRegistry

from wsgateway.app import WEBSOCKET_PATH, GatewayHandler, PlayerEndpoint, create_app
from wsgateway.broker import InProcessBroker
from wsgateway.config import Config
from wsgateway.delivery import Delivery, Outcome
from wsgateway.errors import CloseCode
from wsgateway.hub import Hub
from wsgateway.keepalive import KeepAlive
from wsgateway.metrics import GatewayMetrics
from wsgateway.offline import MemoryOfflineQueue
from wsgateway.ratelimit import RateLimiter
from wsgateway.revalidation import Revalidator
from wsgateway.tokens import SqlTokenStore, TokenStore

log = logging.getLogger(__name__)

OFFLINE_PURGE_INTERVAL_S = 1.0
KILL_GRACE_S = 0.5  # of the shutdown timeout, kept for killing requests that did not finish


class DrainingWSGIServer(WSGIServer):
    """A WSGIServer that knows which keep-alive connections sit idle between requests,
    so that shutdown can end them at once instead of waiting out its timeout."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.draining = False
        self.idle_handlers: set[Any] = set()
        self.websocket_endpoints: dict[str, Any] = {}
        self.header_timeout_s = 0.0  # see GatewayHandler; 0 = no limit

    def end_idle_connections(self) -> None:
        for handler in list(self.idle_handlers):
            try:
                handler.socket.shutdown(socket.SHUT_RDWR)
            except (OSError, AttributeError):
                pass


class Gateway:
    """One gateway process. Provides what `app.Services` describes."""

    def __init__(self, config: Config, *, registry: CollectorRegistry | None = None,
                 store: TokenStore | None = None) -> None:
        self.config = config
        self.metrics = GatewayMetrics(registry if registry is not None else CollectorRegistry())
        self.store: TokenStore = store if store is not None else SqlTokenStore(
            config.database_url, db_timeout_s=config.db_timeout_s, cache_period_s=config.revalidate_period_s)
        self.hub = Hub(config.max_conns_per_player, config.max_total_conns)
        self.offline = MemoryOfflineQueue(config.max_queued, config.offline_ttl_s)
        self.delivery = Delivery(self.hub, self.offline, InProcessBroker[Outcome](), self.metrics)
        self.limiter = RateLimiter(config.rate_limit, config.rate_period_s)
        self.metrics.active_connections.set_function(self.hub.connection_count)
        self.metrics.offline_queue_messages.set_function(lambda: len(self.offline))
        self.keepalive = KeepAlive(self.hub.connections, config.ping_period_s, config.pong_wait_s)
        self.revalidator = Revalidator(self.store, self.hub.connections)
        self.server = DrainingWSGIServer(
            (config.listen_host, config.listen_port), create_app(self), handler_class=GatewayHandler,
            spawn=Pool(), log=None, error_log=logging.getLogger("wsgateway.http"))
        self.server.websocket_endpoints[WEBSOCKET_PATH] = PlayerEndpoint(self)
        self.server.header_timeout_s = config.header_timeout_s
        self._jobs: list[gevent.Greenlet] = []
        self._stopped = Event()
        self._shutdown_started = False

    @property
    def draining(self) -> bool:
        return self.server.draining

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the real port when configured with 0."""
        return self.server.address[0], self.server.server_port

    def start(self) -> None:
        """Create the schema if missing, bind, and serve in the background.

        Raises StoreUnavailable when the database cannot be reached, OSError when the
        address cannot be bound."""
        if self.store.ensure_schema():
            log.info("created table ws_token", extra={"event": "schema_created"})
        self.server.start()
        self._jobs = [
            gevent.spawn(self._every, self.keepalive.interval_s, lambda: self.keepalive.tick(time.monotonic()),
                         "keepalive"),
            gevent.spawn(self._every, self.config.revalidate_period_s, self.revalidator.run_once, "revalidation"),
            gevent.spawn(self._every, OFFLINE_PURGE_INTERVAL_S, self.delivery.purge_expired, "offline_purge"),
        ]
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
        connections = list(self.hub.connections())
        for connection in connections:
            connection.close(CloseCode.GOING_AWAY)  # type: ignore[attr-defined]
        pool = self.server.pool
        if pool is not None:
            total_s = max(0.0, deadline - time.monotonic())
            kill_grace_s = min(KILL_GRACE_S, total_s / 10)
            pool.join(timeout=total_s - kill_grace_s)
            pool.kill(block=True, timeout=kill_grace_s)
        gevent.killall(self._jobs, block=False)
        self.store.close()
        log.info("gateway stopped", extra={"event": "stopped", "connections_closed": len(connections)})
        self._stopped.set()

    def is_ready(self) -> dict[str, str]:
        return {
            "database": "ok" if self.store.is_reachable() else "unreachable",
            "accepting": "shutting down" if self.draining else "ok",
        }

    def _every(self, period_s: float, job: Callable[[], object], name: str) -> None:
        """Run `job` every `period_s` until killed; a failing run is logged, not fatal."""
        while True:
            gevent.sleep(period_s)
            try:
                job()
            except Exception:
                log.exception("periodic job failed", extra={"event": "job_failed", "job": name})


def write_pid_file(path: str) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(f"{os.getpid()}\n")


def remove_pid_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
