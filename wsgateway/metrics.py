"""Every Prometheus metric the gateway exports, defined once.

The first three names are echoCTF's ws-server's, with the same meaning: published counts
accepted publish/broadcast calls, delivered counts frames handed to sockets (offline
flushes included). The rest are what an operator needs to see losses, abuse and load.
The registry is injected so that every gateway in a test process has its own.

With `-workers N` each worker process records into files under PROMETHEUS_MULTIPROC_DIR
(prometheus-client's multiprocess mode, set up by the supervisor), and `/metrics` from
any worker reports the totals of the host; `ws_worker_active_connections` keeps one
series per worker (label `pid`).

Besides its own metrics the gateway exports prometheus-client's process metrics (resident
memory, CPU, open descriptors and their limit: `process_*`, read from /proc) and `python_info`.
With workers these are the process that answered the scrape.

Every labelled counter starts with a zero series for each label value the gateway can
produce (listed below, and every close code of the catalogue), so a panel shows 0 rather
than "No data" until the first event. `ws_http_requests_total{endpoint,status}` is left out:
its statuses are known only once answered.
"""
from __future__ import annotations

import glob
import os

from gevent import monkey
from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector,
                               disable_created_metrics, generate_latest)
from prometheus_client import metrics as prometheus_metrics
from prometheus_client import values
from prometheus_client.multiprocess import MultiProcessCollector

from wsgateway import __version__
from wsgateway.errors import CloseCode

# echoCTF's ws-server exports no `_created` series; neither do we.
disable_created_metrics()

# prometheus-client guards every value with `threading.Lock`, which gevent's patching
# turns into a cooperative lock written in Python: half of each update's cost, and a
# publish makes five. The guarded code is one addition, which never yields, so the
# native lock can never be held across a greenlet switch; it still guards real threads.
# The same holds for each metric's own lock, taken by every `labels()` (a dictionary
# look-up, or building the child): a disconnect and a publish each call it.
values.Lock = monkey.get_original("threading", "Lock")
prometheus_metrics.Lock = values.Lock

DROP_OFFLINE_FULL = "offline_queue_full"  # oldest offline message dropped for a newer one
DROP_OFFLINE_EXPIRED = "offline_expired"  # offline message outlived -offline-ttl
DROP_OFFLINE_DISABLED = "offline_disabled"  # player offline and queueing is off
DROP_OFFLINE_BYTES_LIMIT = "offline_bytes_limit"  # oldest of all queues given up for -max-offline-bytes
DROP_OFFLINE_PLAYERS_LIMIT = "offline_players_limit"  # oldest whole queue given up for -max-offline-players
DROP_SLOW_CONSUMER = "slow_consumer"  # frames discarded when a too-slow socket was closed
DROP_CONNECTION_GONE = "connection_gone"  # arrived for a closed connection; Redis out of reach to queue it
DROP_STREAM_TRIMMED = "broker_stream_trimmed"  # trimmed from a gateway's stream before it read them
# a copy routed again to a newer connection that had been sent a later message of its player's first
DROP_REROUTED_OUT_OF_ORDER = "rerouted_out_of_order"
DROP_REASONS = (DROP_OFFLINE_FULL, DROP_OFFLINE_EXPIRED, DROP_OFFLINE_DISABLED, DROP_SLOW_CONSUMER,
                DROP_CONNECTION_GONE, DROP_STREAM_TRIMMED, DROP_REROUTED_OUT_OF_ORDER)
# Where a copy routed again after its connection closed was given up (ws_messages_rerouted_given_up_total)
GIVEN_UP_IN_QUEUE = "in_queue"  # in the offline queue: expired or pushed out (also an offline drop reason)
GIVEN_UP_OUT_OF_ORDER = "out_of_order"  # not sent to the newer connection: it had a later message already
GIVEN_UP_REASONS = (GIVEN_UP_IN_QUEUE, GIVEN_UP_OUT_OF_ORDER)

RESUME_RECOVERED = "recovered"
RESUME_MISSED = "missed"
RESUME_OUTCOMES = (RESUME_RECOVERED, RESUME_MISSED)

# The label values the web face counts under (a test checks them against its calls).
AUTH_FAILURE_KINDS = ("player", "server")
AUTH_FAILURE_REASONS = ("missing", "invalid")
REJECTION_REASONS = ("unauthorized", "throttled", "origin", "too_many_connections", "capacity", "store_unavailable",
                     "broker_unavailable", "admission_stalled", "shutting_down")


class GatewayMetrics:
    """The gateway's metrics in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        build_info = Gauge(
            "ws_gateway_build_info", "Always 1; the version label is the running ws-gateway's "
            "(the same as `ws-gateway --version`).", ["version"], registry=registry, multiprocess_mode="max")
        build_info.labels(version=__version__).set(1)
        self.active_connections = Gauge(
            "ws_active_connections", "Open player connections (WebSocket and event streams).", registry=registry,
            multiprocess_mode="livesum")
        self.worker_active_connections = Gauge(
            "ws_worker_active_connections", "Open player connections of each worker process.",
            registry=registry, multiprocess_mode="liveall")
        self.sse_active_connections = Gauge(
            "ws_sse_active_connections", "Open player event streams (GET /events), also counted in "
            "ws_active_connections.", registry=registry, multiprocess_mode="livesum")
        self.messages_published = Counter(
            "ws_messages_published", "Accepted /publish and /broadcast messages.", registry=registry)
        self.messages_delivered = Counter(
            "ws_messages_delivered", "Frames handed to player sockets, offline flushes included.",
            registry=registry)
        self.messages_queued = Counter(
            "ws_messages_queued", "Messages put in an offline queue.", registry=registry)
        self.offline_queue_messages = Gauge(
            "ws_offline_queue_messages", "Messages waiting in this process's offline queues now "
            "(in-process broker only; with -broker they wait in Redis).", registry=registry,
            multiprocess_mode="livesum")
        self.offline_queue_bytes = Gauge(
            "ws_offline_queue_bytes", "Bytes this process's offline queues hold now, as counted against "
            "-max-offline-bytes (in-process broker only; with -broker they wait in Redis).", registry=registry,
            multiprocess_mode="livesum")
        self.messages_dropped = Counter(
            "ws_messages_dropped", "Messages given up, by reason.", ["reason"], registry=registry)
        self.messages_rerouted = Counter(
            "ws_messages_rerouted", "Messages routed live to a connection that had closed when they arrived "
            "(-broker): queued for the player, or sent to a connection it opened since.", registry=registry)
        self.messages_rerouted_given_up = Counter(
            "ws_messages_rerouted_given_up", "Copies routed again after their connection closed (answered as "
            "delivered, -broker) and then given up (each also counted in ws_messages_dropped_total by its "
            "reason), by where: in_queue (expired or pushed out of the offline queue), out_of_order (the "
            "newer connection it was routed to had been sent a later message of its player's).", ["reason"],
            registry=registry)
        self.redis_may_evict = Gauge(
            "ws_redis_may_evict", "1 while the -broker Redis may evict the gateway's keys (maxmemory-policy).",
            registry=registry, multiprocess_mode="max")
        self.missed_notices = Counter(
            "ws_missed_notices", "gateway.missed notices sent to reconnecting players (-notify-missed).",
            registry=registry)
        self.resumes = Counter(
            "ws_resumes", "Connections that asked for ids with a last_event_id, by outcome: recovered "
            "(everything after it was replayed) or missed (gateway.missed, then everything kept).",
            ["outcome"], registry=registry)
        for outcome in RESUME_OUTCOMES:
            self.resumes.labels(outcome)
        self.history_messages = Gauge(
            "ws_history_messages", "Messages this process's history keeps now (in-process broker only; with "
            "-broker the history is in Redis).", registry=registry, multiprocess_mode="livesum")
        self.history_bytes = Gauge(
            "ws_history_bytes", "Bytes this process's history holds now, as counted against -max-history-bytes "
            "(in-process broker only).", registry=registry, multiprocess_mode="livesum")
        self.idempotent_replays = Counter(
            "ws_idempotent_replays", "Publishes answered from an earlier call with the same Idempotency-Key "
            "(nothing delivered).", registry=registry)
        self.idempotency_keys_evicted = Counter(
            "ws_idempotency_keys_evicted", "Idempotency keys forgotten before their window ended because "
            "-idempotency-max-keys was reached.", registry=registry)
        self.rate_limited = Counter(
            "ws_rate_limited", "Publish requests refused by the rate limit (429).", registry=registry)
        self.auth_failures = Counter(
            "ws_auth_failures", "Refused tokens, by kind (player or server) and reason.",
            ["kind", "reason"], registry=registry)
        self.auth_throttled = Counter(
            "ws_auth_throttled", "Requests refused (429) because their client address passed -auth-fail-limit, "
            "by kind (player or server); their token was not looked up.", ["kind"], registry=registry)
        self.connections_rejected = Counter(
            "ws_connections_rejected", "WebSocket connections refused before the upgrade, by reason.",
            ["reason"], registry=registry)
        self.disconnects = Counter(
            "ws_disconnects", "Closed player connections, by close code "
            "(1006: the TCP connection ended without a close frame).", ["code"], registry=registry)
        self.sse_disconnects = Counter(
            "ws_sse_disconnects", "Closed player event streams (GET /events), by close code, also counted in "
            "ws_disconnects (1000: the client closed, 1006: reset or unacknowledged for -pong-wait).", ["code"],
            registry=registry)
        self.http_requests = Counter(
            "ws_http_requests", "HTTP requests answered, by endpoint and status.",
            ["endpoint", "status"], registry=registry)
        self.publish_duration = Histogram(
            "ws_publish_duration_seconds", "Time to answer /publish and /broadcast.", ["endpoint"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry)
        _add_runtime_collectors(registry)
        self._start_known_series_at_zero()

    def _start_known_series_at_zero(self) -> None:
        for reason in DROP_REASONS:
            self.messages_dropped.labels(reason)
        for reason in GIVEN_UP_REASONS:
            self.messages_rerouted_given_up.labels(reason)
        for kind in AUTH_FAILURE_KINDS:
            for reason in AUTH_FAILURE_REASONS:
                self.auth_failures.labels(kind, reason)
        for kind in AUTH_FAILURE_KINDS:
            self.auth_throttled.labels(kind)
        for reason in REJECTION_REASONS:
            self.connections_rejected.labels(reason)
        for code in CloseCode:
            self.disconnects.labels(str(int(code)))
            self.sse_disconnects.labels(str(int(code)))

    def connection_opened(self) -> None:
        self.active_connections.inc()
        self.worker_active_connections.inc()

    def connection_closed(self) -> None:
        self.active_connections.dec()
        self.worker_active_connections.dec()

    def exposition(self) -> bytes:
        """The text `/metrics` serves: this process's registry, or the host's totals when
        running as one of several workers."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            host = CollectorRegistry()
            _WorkerFilesCollector(host)
            _add_runtime_collectors(host)
            return generate_latest(host)
        return generate_latest(self.registry)


# A worker's value file starts with an 8-byte header (bytes used, padding); prometheus-client
# creates the file first and sizes it afterwards (client_python issue #1199).
_VALUE_FILE_HEADER_BYTES = 8


class _WorkerFilesCollector(MultiProcessCollector):
    """The host's totals from every worker's value files, leaving out a file a worker
    that is starting has created but not yet sized: read as it is, it fails the whole
    scrape with a `struct.error` (a 500 from /metrics each time the supervisor starts a
    worker). That worker has recorded nothing yet, so the totals lose nothing."""

    def collect(self):
        files = [path for path in glob.glob(os.path.join(self._path, "*.db")) if _is_sized(path)]
        return self.merge(files, accumulate=True)


def _is_sized(path: str) -> bool:
    try:
        return os.path.getsize(path) >= _VALUE_FILE_HEADER_BYTES
    except FileNotFoundError:  # a dead worker's file, removed by the supervisor meanwhile
        return False


def _add_runtime_collectors(registry: CollectorRegistry) -> None:
    """`process_*` (memory, CPU, descriptors against the limit) and `python_info`, of this process."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
