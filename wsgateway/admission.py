"""Who may open a player connection (`/ws?token=PLAYER_TOKEN`, and the event stream
`/events?token=PLAYER_TOKEN`), and giving back what an admission reserved.

`PlayerEndpoint.admitted(request)` checks, in this order and each before any cost of the
next: shutting down (503), the Origin (403), the token present (401), the client address
within -auth-fail-limit (429, see `auth_throttle`); then it waits for its turn among the
connects being admitted (`admission_queue`: at most `ADMISSIONS_AT_ONCE` at a time, in
arrival order; 503 when the line has not moved for twice -db-timeout), checks the token
known (401, one database query, coalesced with those of concurrent connects), and
reserves the player's seat in the roster (429 past `-max-conns`).
Every reservation is given back by the one context manager, however the upgrade ends: a
failed handshake, a broker that fails while the connection is set up, or a bug. The turn
ends when `serve` starts (the 101 or the stream's head is written by then); from `serve`'s
`delivery.connect` on, the seat belongs to the connection, and `delivery.disconnect`
frees it. (`-max-total-conns` is the web server's: it counts every open connection,
before any request is read.)

Both transports are admitted by the same `admitted` and live the same life (`_run`: seated,
served, given back, counted and logged); `PlayerEndpoint` builds a WebSocket
`Connection` after the 101, `EventStreamEndpoint` an `EventStreamConnection` whose
response head it writes. An event stream counts as one of the player's `-max-conns`
connections, in presence and the census, and takes the offline backlog, like a socket.
"""
from __future__ import annotations

import logging
import random
import time
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from wsgateway.admission_queue import AdmissionQueue, AdmissionStalled
from wsgateway.auth_throttle import FailedAuthThrottle
from wsgateway.config import Config
from wsgateway.connection import Connection
from wsgateway.connection_sse import EventStreamConnection
from wsgateway.event_stream import retry_hint
from wsgateway.outbox import OutboxLimits
from wsgateway.delivery import Delivery
from wsgateway.errors import BrokerUnavailable, ClientError, CloseCode, Refusal, StoreUnavailable
from wsgateway.metrics import DROP_SLOW_CONSUMER, GatewayMetrics
from wsgateway.publishing import refuse_if_throttled
from wsgateway.roster import Roster, Seat
from wsgateway.tokens import TokenStore
from wsgateway.web_server import WebSocketRequest, http_date_now

log = logging.getLogger(__name__)

WEBSOCKET_PATH = "/ws"
EVENTS_PATH = "/events"  # Server-Sent Events: answered by the web server, never by Flask
TRANSPORT_WEBSOCKET = "websocket"
TRANSPORT_SSE = "sse"
ADMISSIONS_AT_ONCE = 500  # connects between their turn and their 101: a lookup batch (tokens.LOOKUP_BATCH)
ADMISSIONS_WAITING_MOST = 500  # waiting for their turn, the web server stops accepting (admission_queue):
#   at 2,000, reading the newcomers still delayed the lookups in flight past a short -db-timeout
RETRY_HINT_MS = (1000, 5000)  # an event stream's reconnection delay, drawn per stream: a restart's
#                               reconnect wave is spread over these seconds


class AdmissionServices(Protocol):
    """What admission uses of the gateway (server.Gateway provides it)."""

    config: Config
    store: TokenStore
    roster: Roster
    delivery: Delivery
    auth_throttle: FailedAuthThrottle
    admission_queue: AdmissionQueue
    metrics: GatewayMetrics
    draining: bool


class Admission:
    """A player's upgrade request, accepted, and the context manager that holds what it
    reserved: on leaving the block, the turn in the admission queue, if `end_turn` was not
    called, goes to the next connect, and a seat not handed to the connection (`seat`
    still set) is given back (`Delivery.cancel`). A small object, not a generator: it lives as
    long as the socket."""

    __slots__ = ("player_id", "token", "origin", "seat", "last_event_id", "_delivery", "_queue")

    def __init__(self, player_id: str, token: str, seat: Seat, delivery: Delivery, origin: str | None = None,
                 last_event_id: str | None = None, queue: AdmissionQueue | None = None) -> None:
        self.player_id = player_id
        self.token = token
        self.origin = origin  # the request's Origin header, allowed by -origins
        self.seat: Seat | None = seat  # None once the connection owns it
        self.last_event_id = last_event_id  # None: the client did not ask for ids (see `last_event_id_of`)
        self._delivery = delivery
        self._queue = queue  # whose place this admission holds; None once given back

    def end_turn(self) -> None:
        """The admission is answered: its place in the queue goes to the next connect.
        Idempotent."""
        queue, self._queue = self._queue, None
        if queue is not None:
            queue.leave(answered=True)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.end_turn()
        seat, self.seat = self.seat, None
        if seat is not None:
            self._delivery.cancel(seat)


class PlayerEndpoint:
    """`/ws?token=PLAYER_TOKEN`: the player's live event stream (a `WebSocketEndpoint`)."""

    def __init__(self, services: AdmissionServices) -> None:
        self._services = services
        config = services.config
        self._origins = OriginPolicy(config.origins)
        self._limits = OutboxLimits(config.max_outbox_messages, config.max_outbox_bytes,
                                    write_timeout_s=config.pong_wait_s)
        self._max_message_bytes = config.max_message_bytes

    def admitted(self, request: WebSocketRequest) -> Admission:
        """Admit the request or raise `ClientError`; use the answer as a context manager,
        which gives back, when the block ends, what `serve` did not hand to the connection."""
        services = self._services
        rejected = services.metrics.connections_rejected
        if services.draining:
            rejected.labels("shutting_down").inc()
            raise Refusal.SHUTTING_DOWN()
        if not self._origins.allows(request.headers.get("origin")):
            rejected.labels("origin").inc()
            raise Refusal.ORIGIN_NOT_ALLOWED()
        query = parse_qs(request.query, keep_blank_values=True)  # blank: `last_event_id=` means something
        token = next((value for value in query.get("token", ()) if value), "")  # the first one not blank
        if not token:
            rejected.labels("unauthorized").inc()
            services.metrics.auth_failures.labels("player", "missing").inc()
            raise Refusal.MISSING_PLAYER_TOKEN()
        try:
            refuse_if_throttled(services.auth_throttle, services.metrics, request.remote, token, "player")
        except ClientError:
            rejected.labels("throttled").inc()
            raise
        queue = services.admission_queue
        try:
            queue.enter()
        except AdmissionStalled:
            raise self._unavailable("admission_stalled", "token store",
                                    StoreUnavailable("no connect admitted while this one waited")) from None
        try:
            return self._admitted_in_turn(request, token, query, queue)
        except ClientError as refusal:
            queue.leave(answered=refusal.status != 503)  # a 503: its database or broker failed
            raise
        except BaseException:
            queue.leave(answered=False)
            raise

    def _admitted_in_turn(self, request: WebSocketRequest, token: str, query: dict[str, list[str]],
                          queue: AdmissionQueue) -> Admission:
        """The checks that wait on the database and the roster, made in this connect's turn."""
        services = self._services
        rejected = services.metrics.connections_rejected
        if services.draining:  # the shutdown began while it waited
            rejected.labels("shutting_down").inc()
            raise Refusal.SHUTTING_DOWN()
        try:
            player_id = services.store.authenticate_player(token)
        except StoreUnavailable as exc:
            raise self._unavailable("store_unavailable", "token store", exc) from None
        if player_id is None:
            services.auth_throttle.failed(request.remote)
            rejected.labels("unauthorized").inc()
            services.metrics.auth_failures.labels("player", "invalid").inc()
            raise Refusal.INVALID_PLAYER_TOKEN()
        services.auth_throttle.succeeded(token)
        try:
            seat = services.roster.reserve(player_id)
        except BrokerUnavailable as exc:
            raise self._unavailable("broker_unavailable", "broker", exc) from None
        if seat is None:
            rejected.labels("too_many_connections").inc()
            raise Refusal.TOO_MANY_PLAYER_CONNECTIONS(limit=services.config.max_conns_per_player)
        return Admission(player_id, token, seat, services.delivery, request.headers.get("origin"),
                         last_event_id_of(query), queue)

    def _unavailable(self, reason: str, what: str, cause: Exception) -> ClientError:
        """The 503 for a dependency that did not answer, counted and logged under `reason`."""
        self._services.metrics.connections_rejected.labels(reason).inc()
        log.warning(f"{what} unavailable", extra={"event": reason, "detail": str(cause)})
        return Refusal.DEPENDENCY_UNAVAILABLE(what=what)

    def serve(self, admission: Admission, sock: Any, rfile: Any, remote: str) -> None:
        """Serve the upgraded socket until it ends; the seat goes to the connection."""
        admission.end_turn()  # the 101 is written
        wants_ids = admission.last_event_id is not None and self._services.delivery.history is not None
        connection = Connection(sock, rfile, limits=self._limits, max_message_bytes=self._max_message_bytes,
                                player_id=admission.player_id, token=admission.token, remote=remote,
                                wants_ids=wants_ids)
        del rfile  # the connection drops it once it has taken what it read ahead
        try:
            self._run(admission, connection, TRANSPORT_WEBSOCKET, admission.last_event_id)
        except BrokerUnavailable:
            connection.abort(CloseCode.TRY_AGAIN_LATER)
            self._services.metrics.disconnects.labels(str(int(CloseCode.TRY_AGAIN_LATER))).inc()

    def _run(self, admission: Admission, connection: Connection | EventStreamConnection, transport: str,
             last_event_id: str | None) -> None:
        """Seat `connection`, resuming after `last_event_id` (`Delivery.connect`; raises
        `BrokerUnavailable` before it is seated, the seat then given back by `admitted`),
        serve it until it ends, then give everything back, counted and logged. The one
        life of every kind of player connection."""
        services = self._services
        seat = admission.seat
        assert seat is not None
        services.delivery.connect(connection, seat, last_event_id)
        admission.seat = None  # from here delivery.disconnect frees it
        sse = transport == TRANSPORT_SSE
        if sse:
            services.metrics.sse_active_connections.inc()
        started = time.monotonic()
        context = {"player_id": admission.player_id, "remote": connection.remote, "transport": transport}
        log.info("player connected", extra={"event": "ws_connected", **context})
        try:
            connection.serve()
        finally:
            services.delivery.disconnect(connection, seat)
            code = str(int(connection.close_code))
            services.metrics.disconnects.labels(code).inc()
            if sse:
                services.metrics.sse_active_connections.dec()
                services.metrics.sse_disconnects.labels(code).inc()
            if connection.dropped_frames:
                services.metrics.messages_dropped.labels(DROP_SLOW_CONSUMER).inc(connection.dropped_frames)
            log.info("player disconnected", extra={
                "event": "ws_disconnected", "code": int(code),
                "duration_s": round(time.monotonic() - started, 3), **context})


def last_event_id_of(query: dict[str, list[str]]) -> str | None:
    """`last_event_id` from the query: None when absent (the client wants today's frames),
    "" when empty (ids, nothing to resume from yet). A repeated one counts once, the first;
    a value no gateway made is the history's to answer (`gateway.missed`, malformed)."""
    values = query.get("last_event_id")
    return values[0] if values else None


class EventStreamEndpoint(PlayerEndpoint):
    """`GET /events?token=PLAYER_TOKEN`: the same stream as Server-Sent Events (a
    `web_server.StreamEndpoint`). Admitted exactly as `/ws`; the response is
    `200 text/event-stream`, unbuffered, ended by closing the connection.

    A stream always carries ids when the gateway keeps a history (`id:` lines): it resumes
    after the `Last-Event-ID` header a browser's `EventSource` sends when it reconnects,
    else after the `last_event_id` query parameter (a page that kept the last id across a
    reload), else from no position yet (`""`: the backlog, with ids)."""

    def admitted(self, request: WebSocketRequest) -> Admission:
        admission = super().admitted(request)
        header = request.headers.get("last-event-id")
        if header is not None:  # the browser's own, newer than an id the page put in the URL
            admission.last_event_id = header.strip()
        return admission

    def serve(self, admission: Admission, sock: Any, rfile: Any, remote: str) -> None:
        """Serve the stream until it ends. A broker that fails while the stream is set
        up is a 503 (`ClientError`): nothing was written yet."""
        del rfile  # a stream's client has nothing more to send
        admission.end_turn()
        history = self._services.delivery.history is not None
        last_event_id = "" if admission.last_event_id is None and history else admission.last_event_id
        preamble = self._response_head(admission) + retry_hint(random.randint(*RETRY_HINT_MS))
        connection = EventStreamConnection(sock, preamble, limits=self._limits, player_id=admission.player_id,
                                           token=admission.token, remote=remote,
                                           wants_ids=history)
        try:
            self._run(admission, connection, TRANSPORT_SSE, last_event_id)
        except BrokerUnavailable as exc:
            raise self._unavailable("broker_unavailable", "broker", exc) from None

    @staticmethod
    def _response_head(admission: Admission) -> bytes:
        """200, the event-stream headers, and CORS for an allowed Origin (an `EventSource`
        on another origin reads the stream only with them). `X-Accel-Buffering: no` tells
        nginx not to buffer the response; `Connection: close`: the stream ends with it."""
        lines = ["HTTP/1.1 200 OK", "Content-Type: text/event-stream", "Cache-Control: no-cache",
                 "X-Accel-Buffering: no", f"Date: {http_date_now()}", "Connection: close"]
        if admission.origin is not None:
            lines += [f"Access-Control-Allow-Origin: {admission.origin}", "Vary: Origin"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class OriginPolicy:
    """`-origins`: empty allows any. An entry with a scheme (`https://a.example`) must match
    the Origin exactly; one without (`a.example:8443`) matches the Origin's host[:port].
    Requests without an Origin header come from non-browser clients, which cannot be
    abused cross-site, and are allowed (as gorilla/websocket does)."""

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self._allowed = {entry.lower().rstrip("/") for entry in allowed}

    def allows(self, origin: str | None) -> bool:
        if not self._allowed or "*" in self._allowed or origin is None:
            return True
        origin = origin.lower().rstrip("/")
        return origin in self._allowed or urlsplit(origin).netloc in self._allowed
