"""Who may open a player connection (`/ws?token=PLAYER_TOKEN`), and giving back what an
admission reserved.

`PlayerEndpoint.admitted(request)` checks, in this order and each before any cost of the
next: shutting down (503), the Origin (403), the token present (401), the client address
within -auth-fail-limit (429, see `auth_throttle`), the token known (401, one database
query, coalesced with those of concurrent connects), then reserves the player's seat in
the roster (429 past `-max-conns`).
Every reservation is given back by the one context manager, however the upgrade ends: a
failed handshake, a broker that fails while the connection is set up, or a bug. From
`serve`'s `delivery.connect` on, the seat belongs to the connection, and
`delivery.disconnect` frees it. (`-max-total-conns` is the web server's: it counts every
open connection, before any request is read.)
"""
from __future__ import annotations

import logging
import time
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from wsgateway.auth_throttle import FailedAuthThrottle
from wsgateway.config import Config
from wsgateway.connection import Connection
from wsgateway.outbox import OutboxLimits
from wsgateway.delivery import Delivery
from wsgateway.errors import BrokerUnavailable, ClientError, CloseCode, Refusal, StoreUnavailable
from wsgateway.metrics import DROP_SLOW_CONSUMER, GatewayMetrics
from wsgateway.publishing import refuse_if_throttled
from wsgateway.roster import Roster, Seat
from wsgateway.tokens import TokenStore
from wsgateway.web_server import WebSocketRequest

log = logging.getLogger(__name__)


class AdmissionServices(Protocol):
    """What admission uses of the gateway (server.Gateway provides it)."""

    config: Config
    store: TokenStore
    roster: Roster
    delivery: Delivery
    auth_throttle: FailedAuthThrottle
    metrics: GatewayMetrics
    draining: bool


class Admission:
    """A player's upgrade request, accepted, and the context manager that holds what it
    reserved: on leaving the block, a seat not handed to the connection (`seat` still
    set) is given back to the roster. A small object, not a generator: it lives as long
    as the socket."""

    __slots__ = ("player_id", "token", "seat", "last_event_id", "_roster")

    def __init__(self, player_id: str, token: str, seat: Seat, roster: Roster,
                 last_event_id: str | None = None) -> None:
        self.player_id = player_id
        self.token = token
        self.seat: Seat | None = seat  # None once the connection owns it
        self.last_event_id = last_event_id  # None: the client did not ask for ids (see `last_event_id_of`)
        self._roster = roster

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc_info: object) -> None:
        seat, self.seat = self.seat, None
        if seat is not None:
            try:
                self._roster.cancel(seat)
            except BrokerUnavailable:
                pass  # the reservation expires by itself


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
        return Admission(player_id, token, seat, services.roster, last_event_id_of(query))

    def _unavailable(self, reason: str, what: str, cause: Exception) -> ClientError:
        """The 503 for a dependency that did not answer, counted and logged under `reason`."""
        self._services.metrics.connections_rejected.labels(reason).inc()
        log.warning(f"{what} unavailable", extra={"event": reason, "detail": str(cause)})
        return Refusal.DEPENDENCY_UNAVAILABLE(what=what)

    def serve(self, admission: Admission, sock: Any, rfile: Any, remote: str) -> None:
        """Serve the upgraded socket until it ends; the seat goes to the connection."""
        services = self._services
        seat = admission.seat
        assert seat is not None
        wants_ids = admission.last_event_id is not None and services.delivery.history is not None
        connection = Connection(sock, rfile, limits=self._limits, max_message_bytes=self._max_message_bytes,
                                player_id=admission.player_id, token=admission.token, remote=remote,
                                wants_ids=wants_ids)
        del rfile  # the connection drops it once it has taken what it read ahead
        try:
            services.delivery.connect(connection, seat, admission.last_event_id)
        except BrokerUnavailable:
            connection.abort(CloseCode.TRY_AGAIN_LATER)
            services.metrics.disconnects.labels(str(int(CloseCode.TRY_AGAIN_LATER))).inc()
            return  # the seat is given back by `admitted`
        admission.seat = None  # from here delivery.disconnect frees it
        started = time.monotonic()
        context = {"player_id": admission.player_id, "remote": remote}
        log.info("player connected", extra={"event": "ws_connected", **context})
        try:
            connection.serve()
        finally:
            services.delivery.disconnect(connection, seat)
            code = int(connection.close_code)
            services.metrics.disconnects.labels(str(code)).inc()
            if connection.dropped_frames:
                services.metrics.messages_dropped.labels(DROP_SLOW_CONSUMER).inc(connection.dropped_frames)
            log.info("player disconnected", extra={
                "event": "ws_disconnected", "code": code,
                "duration_s": round(time.monotonic() - started, 3), **context})


def last_event_id_of(query: dict[str, list[str]]) -> str | None:
    """`last_event_id` from the query: None when absent (the client wants today's frames),
    "" when empty (ids, nothing to resume from yet). A repeated one counts once, the first;
    a value no gateway made is the history's to answer (`gateway.missed`, malformed)."""
    values = query.get("last_event_id")
    return values[0] if values else None


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
