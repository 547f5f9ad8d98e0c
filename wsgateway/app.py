"""The gateway's web face: the Flask app for HTTP, and the WebSocket route in front of it.

`/publish`, `/publish/batch` and `/broadcast` are served in front of Flask by
`publishing.PublishingRoutes` (the hot paths; `GatewayHandler` answers their plain
requests without the WSGI layers); `/metrics`, `/healthz` and `/readyz` are Flask views,
and `/console` when `-console` is set.
`/ws` upgrades are handled by `GatewayHandler` before Flask, for two reasons:
gevent-websocket answers `101 Switching Protocols` before any WSGI view runs, so a view
could never refuse with 401/403/429/503; and a socket that lives for hours should not
hold a Flask request context. A plain GET on `/ws` reaches Flask and gets 426.

Every refusal is `{"error": "..."}` with the status from the README's table.
"""
from __future__ import annotations

import email.parser
import email.utils
import functools
import http.client
import io
import json
import logging
import re
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import gevent
from flask import Flask, Response, request
from gevent import GreenletExit, pywsgi
from geventwebsocket.handler import WebSocketHandler
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException

from wsgateway.config import Config
from wsgateway.connection import Connection, OutboxLimits, direct_socket
from wsgateway.console import console_blueprint
from wsgateway.delivery import Delivery
from wsgateway.errors import BrokerUnavailable, ClientError, CloseCode, StoreUnavailable
from wsgateway.frames import Message, encode_frame
from wsgateway.hub import Hub
from wsgateway.idempotency import IdempotencyStore
from wsgateway.logs import redact
from wsgateway.metrics import DROP_SLOW_CONSUMER, GatewayMetrics
from wsgateway.publishing import STATUS_LINES, PublishingRoutes
from wsgateway.ratelimit import Limiter
from wsgateway.roster import Roster, Seat
from wsgateway.tokens import TokenStore

log = logging.getLogger(__name__)

CAPACITY_RETRY_AFTER_S = 5  # Retry-After when -max-total-conns is reached: spreads the reconnect wave
WEBSOCKET_PATH = "/ws"


class Services(Protocol):
    """What the web face uses of the gateway (server.Gateway provides it)."""

    config: Config
    store: TokenStore
    hub: Hub
    roster: Roster
    delivery: Delivery
    limiter: Limiter
    idempotency: IdempotencyStore
    metrics: GatewayMetrics
    draining: bool

    def is_ready(self) -> dict[str, str]:
        """Component name -> "ok" or what is wrong; ready when all are "ok"."""


# --- HTTP --------------------------------------------------------------------------------
def create_app(services: Services) -> Flask:
    """The Flask application for every HTTP endpoint."""
    app = Flask(__name__, static_folder=None)  # no /static/ route: nothing is served from a folder
    # One byte more than allowed: werkzeug stops a body without Content-Length (chunked) at
    # this limit without complaint, so reading one byte past -max-body is how we see it.
    app.config["MAX_CONTENT_LENGTH"] = services.config.max_body_bytes + 1
    metrics = services.metrics

    if services.config.console:
        app.register_blueprint(console_blueprint())

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), content_type=CONTENT_TYPE_LATEST)

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

    @app.after_request
    def count_request(response: Response) -> Response:
        endpoint = request.url_rule.endpoint if request.url_rule is not None else "unmatched"
        metrics.http_requests.labels(endpoint, str(response.status_code)).inc()
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

    app.wsgi_app = PublishingRoutes(services, app.wsgi_app)  # type: ignore[method-assign]
    return app


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


# --- WebSocket -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Admission:
    """A WebSocket request accepted before the upgrade; its connection slot is reserved."""

    player_id: str
    token: str
    seat: Seat | None = None


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
        self._max_total_conns = config.max_total_conns  # 0 = unlimited
        self._upgrading = 0  # admitted connections not yet registered in the hub

    def admit(self, environ: dict[str, Any]) -> Admission:
        services = self._services
        rejected = services.metrics.connections_rejected
        if services.draining:
            rejected.labels("shutting_down").inc()
            raise ClientError(503, "server shutting down", {"Retry-After": "1"})
        if not self._origins.allows(environ.get("HTTP_ORIGIN")):
            rejected.labels("origin").inc()
            raise ClientError(403, "origin not allowed")
        if self._at_capacity():  # before the token query: a flood at the cap costs no database work
            raise self._capacity_refusal()
        token = (parse_qs(environ.get("QUERY_STRING", "")).get("token") or [""])[0]
        if not token:
            rejected.labels("unauthorized").inc()
            services.metrics.auth_failures.labels("player", "missing").inc()
            raise ClientError(401, "missing token")
        try:
            player_id = services.store.authenticate_player(token)
        except StoreUnavailable as exc:
            raise self._unavailable("store_unavailable", "token store", exc) from None
        if player_id is None:
            rejected.labels("unauthorized").inc()
            services.metrics.auth_failures.labels("player", "invalid").inc()
            raise ClientError(401, "invalid or expired token")
        if self._at_capacity():  # filled up while the token was being checked
            raise self._capacity_refusal()
        self._upgrading += 1  # counted before reserve() may yield, so the cap holds under a rush
        try:
            seat = services.roster.reserve(player_id)
        except BrokerUnavailable as exc:
            self._upgrading -= 1
            raise self._unavailable("broker_unavailable", "broker", exc) from None
        if seat is None:
            self._upgrading -= 1
            rejected.labels("too_many_connections").inc()
            raise ClientError(429, f"player already has {services.config.max_conns_per_player} connections")
        return Admission(player_id, token, seat)

    def _at_capacity(self) -> bool:
        """Whether this process holds, or is upgrading, `-max-total-conns` connections."""
        return bool(self._max_total_conns) and (
            self._services.hub.connection_count() + self._upgrading >= self._max_total_conns)

    def _unavailable(self, reason: str, what: str, cause: Exception) -> ClientError:
        """The 503 for a dependency that did not answer, counted and logged under `reason`."""
        self._services.metrics.connections_rejected.labels(reason).inc()
        log.warning(f"{what} unavailable", extra={"event": reason, "detail": str(cause)})
        return ClientError(503, f"{what} unavailable, retry later", {"Retry-After": "1"})

    def _capacity_refusal(self) -> ClientError:
        self._services.metrics.connections_rejected.labels("capacity").inc()
        return ClientError(503, f"gateway at its limit of {self._max_total_conns} connections, "
                                "retry later", {"Retry-After": str(CAPACITY_RETRY_AFTER_S)})

    def cancel(self, admission: Admission) -> None:
        self._upgrading -= 1
        self._give_back_seat(admission)

    def _give_back_seat(self, admission: Admission) -> None:
        if admission.seat is not None:
            try:
                self._services.roster.cancel(admission.seat)
            except BrokerUnavailable:
                pass  # the reservation expires by itself

    def run(self, admission: Admission, sock: Any, rfile: Any, remote: str) -> None:
        services = self._services
        connection = Connection(sock, rfile, limits=self._limits, max_message_bytes=self._max_message_bytes,
                                player_id=admission.player_id, token=admission.token, remote=remote)
        assert admission.seat is not None
        del rfile  # the connection drops it once it has taken what it read ahead
        self._upgrading -= 1  # from here the hub counts it (connect adds it before any yield)
        try:
            services.delivery.connect(connection, admission.seat)
        except BrokerUnavailable:
            self._give_back_seat(admission)
            connection.abort(CloseCode.TRY_AGAIN_LATER)
            services.metrics.disconnects.labels(str(int(CloseCode.TRY_AGAIN_LATER))).inc()
            return
        except BaseException:
            self._give_back_seat(admission)
            raise
        started = time.monotonic()
        context = {"player_id": admission.player_id, "remote": remote}
        log.info("player connected", extra={"event": "ws_connected", **context})
        try:
            connection.serve()
        finally:
            services.delivery.disconnect(connection, admission.seat)
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
        connection = Connection(sock, rfile, limits=self._limits, max_message_bytes=self._max_message_bytes,
                                remote=remote, on_message=_echo)
        del rfile
        connection.serve()


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


_NO_FURTHER_REQUESTS = io.BytesIO()
_NO_FURTHER_REQUESTS.close()
_NO_BODY_LEFT = pywsgi.Input(None, 0)  # an upgrade request's: nothing to discard
# A header block that the email parser reads as plain `Name: value` lines: names of the
# characters it takes, no CR but at a line's end, and the blank line that ends the block.
_PLAIN_HEADER_BLOCK = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+:[^\r\n]*\r?\n)*\r?\n")
_HEADER_LINE = re.compile(r"([\x21-\x39\x3b-\x7e]+):[ \t]*([^\r\n]*)")


def _read_headers(rfile: Any) -> Any:
    """pywsgi's request headers, parsed without the email package's feed parser (a
    sixth of a publish's CPU). The lines are read by http.client with its limits; a
    plain block gives exactly the (name, value) pairs the email parser would, and
    anything else (folded lines, a stray CR, a line without a name, a block cut short)
    goes to the email parser itself, as pywsgi does it."""
    try:
        lines = http.client._read_headers(rfile)  # noqa: SLF001 - the reader parse_headers uses
    except http.client.LineTooLong:
        message = pywsgi.OldMessage()
        message.status = "Line too long"
        return message
    block = b"".join(lines)
    text = block.decode("iso-8859-1")
    if not _PLAIN_HEADER_BLOCK.fullmatch(block):
        return email.parser.Parser(_class=pywsgi.OldMessage).parsestr(text)
    return _IndexedHeaders(_HEADER_LINE.findall(text))


class _IndexedHeaders(pywsgi.OldMessage):
    """Headers whose `get` is a dict lookup: pywsgi asks for eight of them per request, and
    the email package scans every header for each (a twentieth of a publish's CPU). The
    first value of a name wins, as with `email.message.Message.get`. The environ's
    `HTTP_*` items are derived here once, rather than by pywsgi formatting every header
    back into a line and splitting it again."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__()
        self._headers = pairs  # where email.message.Message keeps them
        self._first: dict[str, str] = {}
        self.environ_items: list[tuple[str, str]] = []
        self.repeated = False  # some name came twice (pywsgi joins their values in the environ)
        for name, value in pairs:
            key = name.lower()
            if key in self._first:
                self.repeated = True
            else:
                self._first[key] = value
            if "_" not in name:  # pywsgi drops such names (they would collide with dashed ones)
                key = name.replace("-", "_").upper()
                if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):  # the environ has these without HTTP_
                    self.environ_items.append(("HTTP_" + key, value.strip()))

    def get(self, name: str, failobj: Any = None) -> Any:
        return self._first.get(name.lower(), failobj)

    def __delitem__(self, name: str) -> None:  # pywsgi drops Content-Length from a chunked request
        super().__delitem__(name)
        self._first.pop(name.lower(), None)


def _http_date_now() -> str:
    """The Date header's value, formatted once a second rather than per answer."""
    return _http_date(int(time.time()))


@functools.lru_cache(maxsize=1)
def _http_date(second: int) -> str:
    return email.utils.formatdate(second, usegmt=True)


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
    _direct = False  # the request is answered by `_answer_directly`

    def MessageClass(self, rfile: Any, *args: Any) -> Any:  # noqa: N802 - pywsgi's name
        return _read_headers(rfile)

    def _headers(self) -> Any:
        if isinstance(self.headers, _IndexedHeaders):
            return self.headers.environ_items
        return super()._headers()  # parsed by the email package: pywsgi's own derivation

    def get_environ(self) -> dict[str, Any]:
        publishing = getattr(self.server, "publishing", None)
        self._direct = publishing is not None and self._is_plain_post_to(publishing)
        if not self._direct:
            return super().get_environ()
        # What the publishing routes read, with the values pywsgi would give them: its full
        # environ (the server's base copied, every header renamed again, the path
        # unquoted) and the WSGI response layers `_answer_directly` skips were a sixth of
        # a keep-alive publish's CPU.
        self.wsgi_input = pywsgi.Input(self.rfile, self.content_length)
        environ = dict(self.headers.environ_items)
        environ.update({"REQUEST_METHOD": "POST", "PATH_INFO": self.path, "SERVER_PROTOCOL": "HTTP/1.1",
                        "CONTENT_LENGTH": self.headers.get("content-length"),
                        "wsgi.input": self.wsgi_input, "wsgi.input_terminated": True})
        return environ

    def _is_plain_post_to(self, publishing: PublishingRoutes) -> bool:
        """An HTTP/1.1 POST to a publishing path, with plain, distinct headers and a
        Content-Length: anything else (a query or escape in the path, chunking, Expect:
        100-continue, HTTP/1.0, folded or repeated headers) goes through pywsgi and Flask."""
        headers = self.headers
        return (self.command == "POST" and self.request_version == "HTTP/1.1" and self.content_length is not None
                and isinstance(headers, _IndexedHeaders) and not headers.repeated and publishing.serves(self.path)
                and headers.get("transfer-encoding") is None and headers.get("expect") is None)

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
        # An idle socket may live for hours: keep nothing it does not need. The library's
        # WebSocket object goes (it is marked closed), and so does every reference to the
        # buffered reader and its 8 KiB buffer: `Connection` takes what it read ahead,
        # then reads the socket directly. The closed stand-in tells pywsgi that no
        # further request follows on this socket. The request's headers, environ and
        # input go too: every object a socket keeps is walked by each full garbage
        # collection, while nothing else runs.
        endpoint, admission = self._endpoint, self._admission
        del self._endpoint, self._admission
        self.websocket = self.headers = self.response_headers = None
        self.environ = {"PATH_INFO": self.environ.get("PATH_INFO", "")}  # what error reports show
        self.wsgi_input = _NO_BODY_LEFT  # pywsgi discards the rest of the body once the socket ends
        endpoint.run(admission, self.socket, self._hand_over_reader(), self._remote())

    def _hand_over_reader(self) -> Any:
        """The buffered reader, which from now on only the endpoint's `Connection` holds."""
        rfile, self.rfile = self.rfile, _NO_FURTHER_REQUESTS
        return rfile

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

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        """Every answer's Date comes from a once-a-second cache: when the application gives
        none, pywsgi formats one per response (a thirtieth of a /publish's CPU)."""
        if not any(name.lower() == "date" for name, _ in headers):
            headers = [*headers, ("Date", _http_date_now())]
        return super().start_response(status, headers, exc_info)

    def handle_one_response(self) -> None:
        super().handle_one_response()
        if getattr(self.server, "draining", False):
            self.close_connection = True

    def _write_with_headers(self, data: bytes) -> None:
        """pywsgi sends a response's headers, then its first body chunk: two syscalls,
        two wakeups of the client, and gevent's sendall asks the kernel for the socket's
        buffer size each time. Collect both parts and send them together."""
        parts: list[bytes] = []
        self._sendall = parts.append  # shadows the method while pywsgi formats the response
        try:
            super()._write_with_headers(data)
        finally:
            del self._sendall
        self._send_response(b"".join(parts))

    def _answer_directly(self) -> None:
        """A publishing request's answer, written as pywsgi would write it (status line,
        the route's headers, Date) without the WSGI layers in between."""
        status, body, headers = self.server.publishing.answer(self.environ)
        self._orig_status = STATUS_LINES[status]
        self.status, self.code, self.headers_sent = self._orig_status.encode("latin-1"), status, True
        head = "".join(f"{name}: {value}\r\n" for name, value in headers)
        self._send_response(f"HTTP/1.1 {self._orig_status}\r\n{head}Date: {_http_date_now()}\r\n\r\n"
                            .encode("latin-1") + body)

    def _send_response(self, response: bytes) -> None:
        """Hand the whole response to the non-blocking socket in one send; only what it
        does not take goes through pywsgi's sendall."""
        raw = direct_socket(self.socket)
        try:
            sent = raw.send(response) if raw is not None else 0
        except OSError:  # would block, or failed: pywsgi's sendall waits, or reports the error
            sent = 0
        self.response_length += sent
        if sent < len(response):
            self._sendall(response[sent:])

    def run_application(self) -> None:
        if self._direct:
            self._answer_directly()
        else:
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

