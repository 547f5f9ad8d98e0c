"""The gateway's web face: the Flask app for HTTP, and the WebSocket route in front of it.

`/publish`, `/broadcast`, `/metrics`, `/healthz` and `/readyz` are Flask views.
`/ws` upgrades are handled by `GatewayHandler` before Flask, for two reasons:
gevent-websocket answers `101 Switching Protocols` before any WSGI view runs, so a view
could never refuse with 401/403/429/503; and a socket that lives for hours should not
hold a Flask request context. A plain GET on `/ws` reaches Flask and gets 426.

Every refusal is `{"error": "..."}` with the status from the README's table.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import gevent
from flask import Flask, Response, g, request
from gevent import GreenletExit
from geventwebsocket.handler import WebSocketHandler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from wsgateway.config import Config
from wsgateway.connection import Connection, OutboxLimits
from wsgateway.delivery import Delivery
from wsgateway.errors import ClientError, StoreUnavailable
from wsgateway.frames import Message, encode_frame
from wsgateway.hub import Hub
from wsgateway.logs import redact
from wsgateway.metrics import DROP_SLOW_CONSUMER, GatewayMetrics
from wsgateway.protocol import event_frame
from wsgateway.ratelimit import RateLimiter
from wsgateway.tokens import TokenStore

log = logging.getLogger(__name__)

MAX_PLAYER_ID_CHARS = 64  # ws_token ids are an unsigned INT or 32 bytes; longer cannot exist
CAPACITY_RETRY_AFTER_S = 5  # Retry-After when -max-total-conns is reached: spreads the reconnect wave
WEBSOCKET_PATH = "/ws"


class Services(Protocol):
    """What the web face uses of the gateway (server.Gateway provides it)."""

    config: Config
    store: TokenStore
    hub: Hub
    delivery: Delivery
    limiter: RateLimiter
    metrics: GatewayMetrics
    draining: bool

    def is_ready(self) -> dict[str, str]:
        """Component name -> "ok" or what is wrong; ready when all are "ok"."""


# --- HTTP --------------------------------------------------------------------------------
def create_app(services: Services) -> Flask:
    """The Flask application for every HTTP endpoint."""
    app = Flask(__name__)
    # One byte more than allowed: werkzeug stops a body without Content-Length (chunked) at
    # this limit without complaint, so reading one byte past -max-body is how we see it.
    app.config["MAX_CONTENT_LENGTH"] = services.config.max_body_bytes + 1
    metrics = services.metrics

    @app.post("/publish")
    def publish() -> Response:
        subject_id = _authenticate_server(services)
        body = _json_object(_request_body(services.config.max_body_bytes))
        player_id = _player_id(body.get("player_id"), required=True)
        assert player_id is not None
        frame = _frame_of(body)
        _refuse_while_draining(services)
        _take_rate(services, subject_id)
        outcome = services.delivery.publish(player_id, frame)
        return _json({"delivered": outcome.delivered, "queued": outcome.queued})

    @app.post("/broadcast")
    def broadcast() -> Response:
        subject_id = _authenticate_server(services)
        body = _json_object(_request_body(services.config.max_body_bytes))
        player_id = _player_id(body.get("player_id"), required=False)
        frame = _frame_of(body)
        _refuse_while_draining(services)
        _take_rate(services, subject_id)
        outcome = services.delivery.broadcast(frame, player_id)
        return _json({"delivered": outcome.delivered})

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        checks = services.is_ready()
        ready = all(state == "ok" for state in checks.values())
        return _json({"status": "ready" if ready else "not ready", **checks}, 200 if ready else 503)

    @app.get(WEBSOCKET_PATH)
    def websocket_without_upgrade() -> Response:
        response = _json({"error": "WebSocket upgrade required"}, 426)
        response.headers["Upgrade"] = "websocket"
        return response

    @app.before_request
    def start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def count_request(response: Response) -> Response:
        endpoint = request.url_rule.endpoint if request.url_rule is not None else "unmatched"
        metrics.http_requests.labels(endpoint, str(response.status_code)).inc()
        if endpoint in ("publish", "broadcast"):
            metrics.publish_duration.labels(endpoint).observe(time.perf_counter() - g.started)
        return response

    @app.errorhandler(ClientError)
    def client_error(error: ClientError) -> Response:
        response = _json({"error": error.message}, error.status)
        response.headers.update(error.headers)
        return response

    @app.errorhandler(StoreUnavailable)
    def store_unavailable(error: StoreUnavailable) -> Response:
        log.warning("token store unavailable", extra={"event": "store_unavailable", "detail": str(error)})
        response = _json({"error": "token store unavailable, retry later"}, 503)
        response.headers["Retry-After"] = "1"
        return response

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        messages = {404: "not found", 405: "method not allowed",
                    413: f"body larger than {services.config.max_body_bytes} bytes"}
        status = error.code or 500
        response = _json({"error": messages.get(status, error.description or HTTPStatus(status).phrase)}, status)
        if status == 405:
            response.headers["Allow"] = ", ".join(error.valid_methods or [])  # type: ignore[attr-defined]
        return response

    @app.errorhandler(Exception)
    def internal_error(error: Exception) -> Response:
        log.error("unhandled error", exc_info=error, extra={"event": "internal_error", "path": request.path})
        return _json({"error": "internal error"}, 500)

    return app


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def _authenticate_server(services: Services) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        services.metrics.auth_failures.labels("server", "missing").inc()
        raise ClientError(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
    subject_id = services.store.authenticate_server(token)
    if subject_id is None:
        services.metrics.auth_failures.labels("server", "invalid").inc()
        raise ClientError(403, "invalid, expired or non-server token")
    g.subject_id = subject_id
    return subject_id


def _refuse_while_draining(services: Services) -> None:
    """Once shutdown has begun every socket is closing, so a publish would only reach the
    offline queue, which dies with the process: answer 503 so the publisher knows it was
    not delivered. Nothing yields between this check and delivery, so a publish that
    passes it reaches live sockets before their 1001 close frame."""
    if services.draining:
        raise ClientError(503, "server shutting down", {"Retry-After": "1"})


def _take_rate(services: Services, subject_id: str) -> None:
    wait_s = services.limiter.acquire(subject_id)
    if wait_s:
        services.metrics.rate_limited.inc()
        raise ClientError(429, "rate limit exceeded", {"Retry-After": str(max(1, math.ceil(wait_s)))})


def _request_body(max_body_bytes: int) -> bytes:
    """The request body, or 413 when it is larger than `max_body_bytes`, chunked or not."""
    body = request.get_data(cache=False)
    if len(body) > max_body_bytes:
        raise RequestEntityTooLarge()
    return body


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"number {text[:20]} is out of range")
    return number


def _json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ClientError(400, "body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, our checks
        raise ClientError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ClientError(400, "body must be a JSON object")
    return body


def _player_id(value: Any, *, required: bool) -> str | None:
    """`player_id` as a string: a non-empty string, or a non-negative integer."""
    if value is None and not required:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)  # then held to the same length as a string id
    if isinstance(value, str) and 0 < len(value) <= MAX_PLAYER_ID_CHARS:
        return value
    if value is None:
        raise ClientError(400, "player_id is required")
    raise ClientError(400, f"player_id must be a non-empty string of at most {MAX_PLAYER_ID_CHARS} "
                           "characters or a non-negative integer")


def _frame_of(body: dict[str, Any]) -> bytes:
    event = body.get("event")
    if not isinstance(event, str) or not event:
        raise ClientError(400, "event must be a non-empty string")
    try:
        return event_frame(event, body.get("payload"))
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") parses but has no UTF-8 form
        raise ClientError(400, "event and payload must be valid Unicode: lone surrogate") from None


# --- WebSocket -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Admission:
    """A WebSocket request accepted before the upgrade; its connection slot is reserved."""

    player_id: str
    token: str


class WebSocketEndpoint(Protocol):
    """A WebSocket route served by `GatewayHandler`."""

    def admit(self, environ: dict[str, Any]) -> Admission:
        """Accept the request or raise `ClientError`; runs before the 101 is sent."""

    def cancel(self, admission: Admission) -> None:
        """The upgrade failed after `admit` accepted: give back what it reserved."""

    def run(self, admission: Admission, sock: Any, rfile: Any, remote: str) -> None:
        """Serve the upgraded connection until it ends."""


class PlayerEndpoint:
    """`/ws?token=PLAYER_TOKEN`: the player's live event stream."""

    def __init__(self, services: Services) -> None:
        self._services = services
        config = services.config
        self._origins = _OriginPolicy(config.origins)
        self._limits = OutboxLimits(config.max_outbox_messages, config.max_outbox_bytes,
                                    write_timeout_s=config.pong_wait_s)
        self._max_message_bytes = config.max_message_bytes

    def admit(self, environ: dict[str, Any]) -> Admission:
        services = self._services
        rejected = services.metrics.connections_rejected
        if services.draining:
            rejected.labels("shutting_down").inc()
            raise ClientError(503, "server shutting down", {"Retry-After": "1"})
        if not self._origins.allows(environ.get("HTTP_ORIGIN")):
            rejected.labels("origin").inc()
            raise ClientError(403, "origin not allowed")
        if services.hub.at_capacity():  # before the token query: a flood at the cap costs no database work
            raise self._at_capacity()
        token = (parse_qs(environ.get("QUERY_STRING", "")).get("token") or [""])[0]
        if not token:
            rejected.labels("unauthorized").inc()
            services.metrics.auth_failures.labels("player", "missing").inc()
            raise ClientError(401, "missing token")
        try:
            player_id = services.store.authenticate_player(token)
        except StoreUnavailable as exc:
            rejected.labels("store_unavailable").inc()
            log.warning("token store unavailable", extra={"event": "store_unavailable", "detail": str(exc)})
            raise ClientError(503, "token store unavailable, retry later", {"Retry-After": "1"}) from None
        if player_id is None:
            rejected.labels("unauthorized").inc()
            services.metrics.auth_failures.labels("player", "invalid").inc()
            raise ClientError(401, "invalid or expired token")
        if not services.hub.reserve(player_id):
            if services.hub.at_capacity():  # filled up while the token was being checked
                raise self._at_capacity()
            rejected.labels("too_many_connections").inc()
            raise ClientError(429, f"player already has {services.hub.max_conns_per_player} connections")
        return Admission(player_id, token)

    def _at_capacity(self) -> ClientError:
        self._services.metrics.connections_rejected.labels("capacity").inc()
        return ClientError(503, f"gateway at its limit of {self._services.hub.max_total_conns} connections, "
                                "retry later", {"Retry-After": str(CAPACITY_RETRY_AFTER_S)})

    def cancel(self, admission: Admission) -> None:
        self._services.hub.release(admission.player_id)

    def run(self, admission: Admission, sock: Any, rfile: Any, remote: str) -> None:
        services = self._services
        connection = Connection(sock, rfile, limits=self._limits, max_message_bytes=self._max_message_bytes,
                                player_id=admission.player_id, token=admission.token, remote=remote)
        try:
            services.delivery.connect(connection)
        except BaseException:
            self.cancel(admission)
            raise
        started = time.monotonic()
        context = {"player_id": admission.player_id, "remote": remote}
        log.info("player connected", extra={"event": "ws_connected", **context})
        try:
            connection.serve()
        finally:
            services.delivery.disconnect(connection)
            code = int(connection.close_code)
            services.metrics.disconnects.labels(str(code)).inc()
            if connection.dropped_frames:
                services.metrics.messages_dropped.labels(DROP_SLOW_CONSUMER).inc(connection.dropped_frames)
            log.info("player disconnected", extra={
                "event": "ws_disconnected", "code": code,
                "duration_s": round(time.monotonic() - started, 3), **context})


class EchoEndpoint:
    """A WebSocket route that echoes every message: the conformance suite's target. It
    runs the gateway's own `Connection`, with the same reader, writer and limits."""

    def __init__(self, max_message_bytes: int, limits: OutboxLimits) -> None:
        self._max_message_bytes = max_message_bytes
        self._limits = limits

    def admit(self, environ: dict[str, Any]) -> Admission:
        return Admission("", "")

    def cancel(self, admission: Admission) -> None:
        pass

    def run(self, admission: Admission, sock: Any, rfile: Any, remote: str) -> None:
        Connection(sock, rfile, limits=self._limits, max_message_bytes=self._max_message_bytes,
                   remote=remote, on_message=_echo).serve()


def _echo(connection: Connection, message: Message) -> None:
    connection.send(encode_frame(message.opcode, message.data))


class _OriginPolicy:
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


class _HeaderTimeout(ValueError):
    """-header-timeout passed before the request line and headers were in. A ValueError
    so that pywsgi hands it to `_handle_client_error` as the client's fault."""


def _raw_error_response(status: str, message: str) -> bytes:
    """A complete JSON error response for pywsgi's early refusals, which have no WSGI app."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode("latin-1") + body


_REQUEST_TIMEOUT_RESPONSE = ("408", _raw_error_response("408 Request Timeout", "request headers not received in time"))
_BAD_REQUEST_RESPONSE = ("400", _raw_error_response("400 Bad Request", "malformed HTTP request"))
_URI_TOO_LONG_RESPONSE = ("414", _raw_error_response("414 URI Too Long", "request line too long"))


class GatewayHandler(WebSocketHandler):
    """gevent-websocket's handler, with admission before the upgrade, our own frame layer
    after it, and logs that never show a query string (it carries the player's token).

    Slowloris defence: from the moment it waits for a request, a connection has the
    server's `header_timeout_s` to deliver the request line and headers. A connection
    that sent nothing in that time is closed quietly (an idle keep-alive connection); one
    that sent part of a request gets 408. Malformed requests get a JSON 400 or 414, like
    every other refusal."""

    _header_deadline: gevent.Timeout | None = None

    def upgrade_websocket(self) -> Any:
        endpoint = getattr(self.server, "websocket_endpoints", {}).get(self.environ.get("PATH_INFO", ""))
        if endpoint is None or not _asks_for_websocket(self.environ):
            return None  # Flask answers
        try:
            _check_handshake(self.environ, self.request_version, self.SUPPORTED_VERSIONS)
            admission = endpoint.admit(self.environ)
        except ClientError as refusal:
            return self._refuse(refusal)
        result = super().upgrade_websocket()
        if getattr(self, "websocket", None) is None:
            endpoint.cancel(admission)
            return result
        # The library built its own WebSocket object; ours does the framing. Mark the
        # library's closed so that its finaliser never writes to the socket.
        self.websocket.closed = True
        self._endpoint, self._admission = endpoint, admission
        return result

    def run_websocket(self) -> None:
        try:
            self._endpoint.run(self._admission, self.socket, self.rfile, self._remote())
        finally:
            self.environ["wsgi.websocket"] = None
            self.websocket = None

    def handle_one_request(self) -> Any:
        try:
            result = super().handle_one_request()
        except _HeaderTimeout:  # raised while the request line was arriving
            return _REQUEST_TIMEOUT_RESPONSE
        finally:
            self._cancel_header_deadline()
        if isinstance(result, tuple) and result[0] == "414":
            return _URI_TOO_LONG_RESPONSE
        return result

    def read_requestline(self) -> str:
        """Marks the connection idle while it waits for a request, so shutdown can end it;
        once the server drains, a keep-alive connection takes no further request. Starts
        the header deadline; an idle connection that reaches it is closed without a word."""
        if getattr(self.server, "draining", False):
            return ""
        timeout_s = getattr(self.server, "header_timeout_s", 0)
        if timeout_s:
            self._header_deadline = gevent.Timeout.start_new(timeout_s, _HeaderTimeout)
        idle = getattr(self.server, "idle_handlers", set())
        idle.add(self)
        try:
            try:
                if not self.rfile.peek(1):
                    return ""
            except _HeaderTimeout:
                return ""
            return super().read_requestline()
        finally:
            idle.discard(self)

    def read_request(self, raw_requestline: str) -> bool:
        parsed = super().read_request(raw_requestline)
        self._cancel_header_deadline()  # what follows (body, application, WebSocket) has other bounds
        return parsed

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.close()
            self._header_deadline = None

    def _handle_client_error(self, error: Exception) -> tuple[str, bytes]:
        if isinstance(error, _HeaderTimeout):
            return _REQUEST_TIMEOUT_RESPONSE
        super()._handle_client_error(error)  # logs it (redacted, see log_error)
        return _BAD_REQUEST_RESPONSE

    def handle_one_response(self) -> None:
        super().handle_one_response()
        if getattr(self.server, "draining", False):
            self.close_connection = True

    def run_application(self) -> None:
        super().run_application()
        if self.code == 413 and self.wsgi_input is not None:
            # pywsgi would read and discard the rest of the refused body before the next
            # request: possibly gigabytes, or forever when chunked. Hang up instead.
            self.wsgi_input.content_length = self.wsgi_input.position
            self.wsgi_input.chunked_input = False
            self.close_connection = True

    def _refuse(self, refusal: ClientError) -> list[bytes]:
        body = json.dumps({"error": refusal.message}).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        headers += list(refusal.headers.items())
        self.start_response(f"{refusal.status} {HTTPStatus(refusal.status).phrase}", headers)
        return [body]

    def _remote(self) -> str:
        address = self.client_address
        return str(address[0] if isinstance(address, tuple) else address or "")

    def log_request(self) -> None:
        status = str(self._orig_status or self.status or "000").split()[0]
        level = logging.DEBUG if status[0] in "12" else logging.INFO
        if not log.isEnabledFor(level):
            return
        duration_s = (self.time_finish or time.time()) - self.time_start
        log.log(level, "http request", extra={
            "event": "http_request", "method": self.command, "path": self.path.split("?", 1)[0] if self.path else "",
            "status": int(status) if status.isdigit() else 0, "bytes": self.response_length,
            "duration_ms": round(duration_s * 1000, 3), "remote": self._remote()})

    def log_error(self, message: str, *args: Any) -> None:
        log.warning(redact(message % args if args else message),
                    extra={"event": "bad_request", "remote": self._remote()})

    def _log_error(self, error_type: Any, value: Any, traceback: Any) -> None:
        if issubclass(error_type, GreenletExit):
            return
        log.error("unhandled error in request", exc_info=(error_type, value, traceback),
                  extra={"event": "internal_error", "path": self.environ.get("PATH_INFO", ""),
                         "remote": self._remote()})


def _check_handshake(environ: dict[str, Any], request_version: str, supported_versions: tuple[str, ...]) -> None:
    """Refuse malformed handshakes ourselves, as JSON and before any database query:
    gevent-websocket answers them with a Content-Length but no body (and HTTP/1.0 with 402)."""
    if request_version != "HTTP/1.1":
        raise ClientError(400, "WebSocket upgrade requires HTTP/1.1")
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION") not in supported_versions:
        raise ClientError(426, "missing or unsupported Sec-WebSocket-Version", {"Sec-WebSocket-Version": "13"})
    if not environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip():
        raise ClientError(400, "missing Sec-WebSocket-Key")


def _asks_for_websocket(environ: dict[str, Any]) -> bool:
    return (environ.get("REQUEST_METHOD") == "GET"
            and environ.get("HTTP_UPGRADE", "").lower() == "websocket"
            and "upgrade" in environ.get("HTTP_CONNECTION", "").lower())

