"""The HTTP server: accepting connections, TLS, and reading every request under its deadline
and limits, before any application work.

`WebServer` is gevent's `WSGIServer`; `WebHandler` is gevent-websocket's handler (so the
WebSocket handshake is the library's). What they add, in the order a connection meets it:

1. accept: an accept that fails (at the file-descriptor limit: EMFILE) is one JSON log line
   and a pause of the accept loop, never a traceback;
2. `-max-total-conns`: every open connection counts (plain HTTP, TLS handshakes, upgrades,
   WebSockets); past it a connection is answered 503 at once, before any request is read,
   or under TLS closed before its handshake (no answer can be read without one);
3. TLS: the handshake must finish within `-tls-handshake-timeout`;
4. the request: its line, headers and body must all arrive within `-request-timeout`,
   counted from when the server starts waiting for it (so an idle keep-alive connection is
   closed at that deadline too). The head is parsed by httptools (llhttp, Node's parser),
   strictly as RFC 9112 frames a message: a request whose framing cannot be trusted (two
   Content-Lengths, Content-Length with Transfer-Encoding, an unknown transfer coding, a
   folded or malformed header line) is answered 400 and the connection closed. More than
   `MAX_HEADER_COUNT` headers is 431. The body is read whole, at most `-max-body` bytes
   (413 past it, without reading it), before the application sees the request;
5. the answer: `/ws` upgrades go to their `WebSocketEndpoint` before Flask (a Flask view
   could never refuse an upgrade: the library answers 101 before any view runs); `/events`
   to its `StreamEndpoint` (a response that lasts as long as the connection, written by the
   endpoint's own non-blocking outbox, not through WSGI); the publishing paths go to
   `publishing.answer()`; the rest to the Flask app. A request that
   asked for `Connection: close` is answered with it and the connection closed.

Every refusal comes from the catalogue in `wsgateway.errors`, and every line this module
(or pywsgi through it) writes is one JSON object.
"""
from __future__ import annotations

import binascii
import email.utils
import errno
import functools
import io
import logging
import socket
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping, Protocol
from urllib.parse import unquote_to_bytes

import gevent
import httptools
from gevent import GreenletExit, pywsgi
from geventwebsocket.handler import WebSocketHandler

from wsgateway.outbox import direct_socket
from wsgateway.errors import ClientError, Refusal
from wsgateway.logs import redact
from wsgateway.proxies import TrustedProxies
from wsgateway.publishing import STATUS_LINES, PublishingRequest, Publishing
from wsgateway.resident_pool import ResidentPool

log = logging.getLogger(__name__)

MAX_REQUEST_LINE_BYTES = 8192  # pywsgi's limit; longer is 414
MAX_HEADER_BYTES = 65536  # the whole header block; longer is 431
MAX_HEADER_COUNT = 100  # http.client's limit, which pywsgi used; more is 431
ACCEPT_PAUSE_S = (0.01, 1.0)  # after a failed accept, wait this long (doubling) before the next
CAPACITY_LINGER_S = 1.0  # a connection refused at capacity may finish sending its request this long
LINGER_BYTES = 65536  # ... and this much of it is read and dropped, so our 503 is not reset away


@dataclass(frozen=True)
class WebLimits:
    """Deadlines and limits of the HTTP server. Zero means "no limit" for each."""

    request_timeout_s: float  # request line, headers and body (and the idle wait before them)
    tls_handshake_timeout_s: float  # a TLS client must finish its handshake this fast
    max_connections: int  # open connections of every kind at once
    max_body_bytes: int  # largest request body


class WebSocketEndpoint(Protocol):
    """A WebSocket route: admits or refuses the upgrade request, then serves the socket."""

    def admitted(self, request: WebSocketRequest) -> ContextManager[Any]:
        """Accept the request or raise `ClientError`, before the 101 is sent; what the
        admission reserved is given back when the block ends (after `serve`, or when
        the handshake failed)."""

    def serve(self, admission: Any, sock: Any, rfile: Any, remote: str) -> None:
        """Serve the upgraded connection until it ends."""


class StreamEndpoint(Protocol):
    """A route whose answer is a stream as long as the connection (`GET /events`): admits or
    refuses the request, then writes its response and serves it until it ends."""

    def admitted(self, request: WebSocketRequest) -> ContextManager[Any]:
        """As `WebSocketEndpoint.admitted`; a refusal is answered before anything is written."""

    def serve(self, admission: Any, sock: Any, rfile: Any, remote: str) -> None:
        """Write the response and serve the stream until it ends; raise `ClientError`
        before writing anything to refuse it after all."""


@dataclass(frozen=True)
class WebSocketRequest:
    """What an endpoint sees of its request: an upgrade, or a stream's GET."""

    headers: Mapping[str, str]  # lower-case name -> value
    query: str  # the raw query string
    remote: str  # the client's address


class BuiltOnFirstRequest:
    """A WSGI application that `build` makes when the first request for it arrives (the
    requests answered before WSGI, `/ws`, `/events` and publishing, never build it)."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self._application: Any = None

    def built(self) -> Any:
        """The application, built now if it was not yet."""
        if self._application is None:
            self._application = self._build()
        return self._application

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        return self.built()(environ, start_response)


class _RequestDeadline(Exception):
    """-request-timeout passed: 408 if the request had begun, else a quiet close."""


class WebServer(pywsgi.WSGIServer):
    """gevent's WSGIServer with the limits above; `WebHandler` serves each connection.

    `draining` (set by shutdown) makes every handler refuse further requests;
    `end_idle_connections()` ends the connections waiting for their next request."""

    def __init__(self, listener: Any, application: Any, *, limits: WebLimits,
                 publishing: Publishing | None = None,
                 websocket_endpoints: Mapping[str, WebSocketEndpoint] | None = None,
                 stream_endpoints: Mapping[str, StreamEndpoint] | None = None,
                 ssl_context: Any = None, on_capacity_refusal: Callable[[], None] | None = None,
                 trusted_proxies: TrustedProxies | None = None, backlog: int | None = None) -> None:
        """`backlog`: the accept queue when `listener` is an address to bind (None:
        gevent's 128); a socket given as `listener` listens already."""
        tls = {"ssl_context": ssl_context} if ssl_context is not None else {}
        super().__init__(listener, application, handler_class=WebHandler, spawn=ResidentPool(), log=None, backlog=backlog,
                         error_log=logging.getLogger("wsgateway.http"), **tls)
        self.limits = limits
        self.publishing = publishing  # answers /publish, /publish/batch, /broadcast
        self.websocket_endpoints: Mapping[str, WebSocketEndpoint] = websocket_endpoints or {}
        self.stream_endpoints: Mapping[str, StreamEndpoint] = stream_endpoints or {}  # GET only
        self.draining = False  # no further request is read once set
        self.idle_handlers: set[WebHandler] = set()  # waiting for their next request line
        self.open_connections = 0  # accepted and not yet closed, TLS handshakes included
        self.on_capacity_refusal = on_capacity_refusal  # called per connection refused at max_connections
        self.trusted_proxies = trusted_proxies or TrustedProxies()  # whose X-Forwarded-For is believed: nobody's
        self._accept_pause_s = ACCEPT_PAUSE_S[0]
        self._accept_held = False  # see hold_accepting

    # --- accept --------------------------------------------------------------------------
    def init_socket(self) -> None:
        """gevent's, with Nagle's algorithm off (as Go's net package does): small answers
        and frames go at once instead of waiting for the client's delayed ACK (about
        40 ms). Set on the listening socket, whose connections Linux accepts with it
        already set: one system call per connection less than setting it on each."""
        super().init_socket()
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP (a test may hand in another kind of socket)
            pass

    def do_read(self) -> Any:
        """gevent's accept, with a refused accept (EMFILE, ENFILE, ENOBUFS...) logged as
        one line and the accept loop paused, doubling up to a second, instead of a
        traceback per attempt."""
        try:
            accepted = super().do_read()
        except OSError as exc:
            if exc.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                raise  # the listener is gone: gevent's own handling closes the server
            log.error("accept failed", extra={"event": "accept_failed", "detail": exc.strerror or str(exc),
                                              "errno": errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                                              "retry_in_s": self._accept_pause_s})
            self.stop_accepting()
            gevent.spawn_later(self._accept_pause_s, self._resume_accepting)
            self._accept_pause_s = min(ACCEPT_PAUSE_S[1], self._accept_pause_s * 2)
            return None
        self._accept_pause_s = ACCEPT_PAUSE_S[0]
        return accepted

    def _resume_accepting(self) -> None:
        if self.started and not self.closed and not self._accept_held:
            self.start_accepting()

    def hold_accepting(self, held: bool) -> None:
        """Stop accepting (True) while the connections accepted already are more than the
        gateway can admit soon (`admission_queue`'s crowding), or accept again (False).
        Connections that arrive meanwhile wait in the kernel's accept queue, in order and
        at no cost; past its length (`listening.listen_backlog`) the kernel drops their
        SYNs, which the clients' kernels send again after 1 s, 3 s, ..."""
        self._accept_held = held
        if held:
            self.stop_accepting()
        else:
            self._resume_accepting()

    # --- one connection ------------------------------------------------------------------
    def handle(self, sock: socket.socket, address: Any) -> None:
        """Serve one plain TCP connection (gevent calls this in the connection's greenlet)."""
        self.open_connections += 1
        try:
            self._serve(sock, address)
        finally:
            self.open_connections -= 1

    def wrap_socket_and_handle(self, client_socket: Any, address: Any) -> None:
        """Serve one TLS connection: the handshake within `tls_handshake_timeout_s`; a
        failed or late one (a plain-HTTP client, one that distrusts the certificate, one
        that never sends its ClientHello) is one log line."""
        self.open_connections += 1
        try:
            if self._past_capacity():  # no TLS answer without a handshake: the cheapest refusal is the close
                client_socket.close()
                return
            tls_socket = self._handshake(client_socket, address)
            if tls_socket is not None:
                with closing(tls_socket):
                    self._serve(tls_socket, address)
        finally:
            self.open_connections -= 1

    def _handshake(self, client_socket: Any, address: Any) -> Any:
        """The TLS socket after a finished handshake, or None (logged) when it failed or
        did not finish in time. The handshake runs apart from the wrapping, so that a late
        one closes the socket that owns the descriptor."""
        tls_socket = self.wrap_socket(client_socket, **{**self.ssl_args, "do_handshake_on_connect": False})
        timeout_s = self.limits.tls_handshake_timeout_s
        deadline = gevent.Timeout.start_new(timeout_s) if timeout_s else None
        try:
            tls_socket.do_handshake()
            return tls_socket
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            detail = "no handshake within -tls-handshake-timeout"
        except OSError as exc:  # ssl.SSLError is an OSError
            detail = getattr(exc, "reason", None) or type(exc).__name__
        finally:
            if deadline is not None:
                deadline.close()
        log.info("TLS handshake failed", extra={"event": "tls_handshake_failed", "remote": _host(address),
                                                "detail": detail})
        tls_socket.close()
        return None

    def _serve(self, sock: socket.socket, address: Any) -> None:
        if self._past_capacity():
            _refuse_at_capacity(sock, self.limits.max_connections)
            return
        try:
            self.handler_class(sock, address, self).handle()
        except Exception:  # the connection's top level: logged as one line, the server goes on
            log.exception("unhandled error in connection", extra={"event": "internal_error",
                                                                  "remote": _host(address)})

    def _past_capacity(self) -> bool:
        """Whether this connection is one past `-max-total-conns` (it is counted already);
        such a refusal is counted too. Checked before any work: under TLS before the
        handshake, the dearest step of an accept."""
        limit = self.limits.max_connections
        if not limit or self.open_connections <= limit:
            return False
        if self.on_capacity_refusal is not None:
            self.on_capacity_refusal()
        return True

    def end_idle_connections(self) -> None:
        """Shut the connections that wait for a request, so that shutdown need not wait."""
        for handler in list(self.idle_handlers):
            try:
                handler.socket.shutdown(socket.SHUT_RDWR)
            except (OSError, AttributeError):
                pass


def _refuse_at_capacity(sock: socket.socket, limit: int) -> None:
    """The 503 for a connection past `-max-total-conns`, sent before reading anything; then
    what the client sends meanwhile is read and dropped for a moment, so that closing does
    not reset the answer away."""
    try:
        sock.sendall(Refusal.AT_CAPACITY(limit=limit).response_bytes())
        sock.shutdown(socket.SHUT_WR)
        drained = 0
        with gevent.Timeout(CAPACITY_LINGER_S, False):
            while drained < LINGER_BYTES:
                data = sock.recv(16384)
                if not data:
                    break
                drained += len(data)
    except OSError:
        pass


def _host(address: Any) -> str:
    return str(address[0] if isinstance(address, tuple) else address or "")


class _Head:
    """A request's line and headers as httptools parsed them (its callback object)."""

    __slots__ = ("url", "headers", "complete")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}  # lower-case name -> value; repeats joined with ", "
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self.headers.get(key)
        self.headers[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        self.complete = True


_NO_FURTHER_REQUESTS = io.BytesIO()
_NO_FURTHER_REQUESTS.close()
_NO_BODY_LEFT = pywsgi.Input(None, 0)  # what pywsgi discards after a response: nothing, we read it


def retire_library_websocket(websocket: Any) -> None:
    """Make gevent-websocket's `WebSocket` object inert before it is dropped: marked
    closed, its finaliser never writes to the socket; detached from the handler, the
    finaliser stops at its first line. Otherwise it built a throw-away class twice and
    raised once on its way (36 µs per connection, a seventh of a connect's CPU).

    Its references go too, as its own `close()` drops them: the request's environ names
    the object (`wsgi.websocket`) and the object the environ, a cycle that held the
    environ, its input, the stream and through it the handshake's buffered reader (8 KiB)
    until a full garbage collection, which is rare (`server.FULL_COLLECTION_EVERY`):
    10 cyclic objects per connect, most of the memory per held connection that rarer
    full collections cost. `tests/test_web_server.py` fails if a gevent-websocket
    upgrade changes what the finaliser does, or a connect leaves cyclic garbage."""
    websocket.closed = True
    websocket.handler = None
    websocket.environ = websocket.stream = websocket.raw_read = websocket.raw_write = None


class WebHandler(WebSocketHandler):
    """One connection: its requests, one after another, each read whole under the request
    deadline before it is answered; or, after an upgrade, its WebSocket.

    Of pywsgi this overrides `handle_one_request` (documented: read a request, answer it,
    say whether another may follow), `get_environ` and `run_application`, and uses
    gevent-websocket's `upgrade_connection` (the handshake); of pywsgi's internals `_write_with_headers`
    (one send for a response's head and body) and `_log_error` (an application error as
    one JSON line). `tests/test_web_server.py` fails if a gevent upgrade moves them."""

    def __init__(self, sock: Any, address: Any, server: WebServer) -> None:
        super().__init__(sock, address, server)
        self.server: WebServer = server
        self.limits = server.limits
        self.peer = _host(address)  # the TCP peer's address
        self.remote = self.peer  # the client's address for the request being read: see remote_address()
        self.head: _Head | None = None  # the request being answered
        self.query = ""  # its query string
        self.body = b""  # its body, read whole before it is answered
        self._deadline: gevent.Timeout | None = None  # -request-timeout of the request being read
        self._request_started = False  # a byte of it has arrived

    # --- reading a request ---------------------------------------------------------------
    def handle_one_request(self) -> Any:
        """Read one request whole and answer it. None: close the connection; True: read
        the next request."""
        if self.rfile.closed or self.server.draining:
            return None
        try:
            try:
                if not self._read_request():
                    return None
            finally:
                self._stop_deadline()
        except ClientError as refusal:
            self._send_refusal(refusal)
            return None
        except _RequestDeadline:
            if self._request_started:
                self._send_refusal(Refusal.REQUEST_TIMEOUT())
            return None
        except OSError:
            return None
        self.wsgi_input = _NO_BODY_LEFT
        if self.publishing_path():
            try:
                self._answer_publishing()
            except OSError:  # the client went away before it had the whole answer
                return None
        else:
            self.environ = self.get_environ()
            self.application = self.server.application
            self.handle_one_response()
        if self.close_connection or self.rfile.closed:
            return None
        return True

    def _read_request(self) -> bool:
        """Read the next request's head and body; False when the client closed (or stayed
        idle past the deadline) before sending one."""
        timeout_s = self.limits.request_timeout_s
        if timeout_s:
            self._deadline = gevent.Timeout.start_new(timeout_s, _RequestDeadline)
        self._request_started = False
        self.remote = self.peer  # a new request: until its head is parsed, only the peer is known
        idle = self.server.idle_handlers
        idle.add(self)
        try:
            if not self.rfile.peek(1):
                return False
        finally:
            idle.discard(self)
        self._request_started = True  # from its first byte on, a late request is answered 408
        self.time_start = time.time()
        self._parse_head(self._read_head())
        self.body = self._read_body()
        return True

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.close()
            self._deadline = None

    def _read_head(self) -> bytes:
        """The request line and headers, through the blank line that ends them."""
        rfile = self.rfile
        buffered = rfile.peek(MAX_HEADER_BYTES)
        end = buffered.find(b"\r\n\r\n")
        if end >= 0:  # the common case: the whole head arrived at once (and fits the buffer)
            if buffered.find(b"\n", 0, MAX_REQUEST_LINE_BYTES) < 0:
                raise Refusal.URI_TOO_LONG()
            return rfile.read(end + 4)
        line = rfile.readline(MAX_REQUEST_LINE_BYTES + 1)
        if len(line) > MAX_REQUEST_LINE_BYTES or (len(line) == MAX_REQUEST_LINE_BYTES and not line.endswith(b"\n")):
            raise Refusal.URI_TOO_LONG()
        parts = [line]
        size = 0
        while True:
            line = rfile.readline(MAX_HEADER_BYTES - size + 1)
            if not line:
                raise Refusal.MALFORMED_REQUEST()  # the client stopped mid-head
            parts.append(line)
            if line in (b"\r\n", b"\n"):
                return b"".join(parts)
            size += len(line)
            if size > MAX_HEADER_BYTES:
                raise Refusal.HEADERS_TOO_LARGE(limit=MAX_HEADER_BYTES)
            if len(parts) > MAX_HEADER_COUNT + 1:
                raise Refusal.TOO_MANY_HEADERS(limit=MAX_HEADER_COUNT)

    def _parse_head(self, raw: bytes) -> None:
        """Parse the head strictly; set the request's line, headers and framing."""
        if raw.count(b"\n") > MAX_HEADER_COUNT + 2:
            raise Refusal.TOO_MANY_HEADERS(limit=MAX_HEADER_COUNT)
        head = _Head()
        parser = httptools.HttpRequestParser(head)
        try:
            parser.feed_data(raw)
        except httptools.HttpParserUpgrade:
            pass  # an Upgrade request: its head is complete
        except httptools.HttpParserError as exc:
            self._log_bad_request(str(exc), raw)
            raise Refusal.MALFORMED_REQUEST() from None
        version = parser.get_http_version()
        if not head.complete or version not in ("1.1", "1.0"):
            self._log_bad_request("unsupported HTTP version" if head.complete else "incomplete head", raw)
            raise Refusal.MALFORMED_REQUEST()
        headers = head.headers
        if version == "1.0" and "transfer-encoding" in headers:
            # RFC 9112 section 6.1: HTTP/1.0 has no transfer codings; its framing is faulty.
            self._log_bad_request("Transfer-Encoding in an HTTP/1.0 request", raw)
            raise Refusal.MALFORMED_REQUEST()
        self.head = head
        self.command = parser.get_method().decode("latin-1")
        target = head.url.decode("latin-1")
        self.path, _, self.query = target.partition("?")
        self.request_version = "HTTP/" + version
        self.requestline = f"{self.command} {target} {self.request_version}"
        options = {option.strip() for option in headers.get("connection", "").lower().split(",")}
        self.close_connection = not parser.should_keep_alive() or "close" in options
        length = headers.get("content-length")
        self.content_length = int(length) if length is not None else None  # llhttp checked its digits
        self.remote = self.remote_address()

    def remote_address(self) -> str:
        """The client's address for the request just parsed: the one place it is decided
        (admission, publishing and the logs read `self.remote`). It is the TCP peer or,
        when the peer is in `-trusted-proxies`, the client its X-Forwarded-For names."""
        headers = self.head.headers  # type: ignore[union-attr]
        return self.server.trusted_proxies.client_address(self.peer, headers.get("x-forwarded-for"))

    def _read_body(self) -> bytes:
        """The body, whole: at most `max_body_bytes` (413 past it, without reading it)."""
        headers = self.head.headers  # type: ignore[union-attr]
        max_body = self.limits.max_body_bytes
        expect = headers.get("expect", "").lower() == "100-continue"
        chunked = "transfer-encoding" in headers  # llhttp allows only a final "chunked"
        length = self.content_length
        if not chunked and not length:
            return b""
        if length is not None and length > max_body:
            raise Refusal.BODY_TOO_LARGE(limit=max_body)
        if length is not None and not expect:
            body = self.rfile.read(length)
            if len(body) < length:
                raise Refusal.INCOMPLETE_BODY()
            return body
        stream = pywsgi.Input(self.rfile, length, socket=self.socket if expect else None, chunked_input=chunked)
        try:
            body = stream.read(max_body + 1) if chunked else stream.read(length)
        except (OSError, ValueError):  # a bad chunk size, the client gone mid-body
            raise Refusal.INCOMPLETE_BODY() from None
        if len(body) > max_body:
            raise Refusal.BODY_TOO_LARGE(limit=max_body)
        if length is not None and len(body) < length:
            raise Refusal.INCOMPLETE_BODY()
        return body

    def _log_bad_request(self, detail: str, raw: bytes) -> None:
        log.warning("malformed request", extra={"event": "bad_request", "remote": self.remote, "detail": detail,
                                                "request_line": redact(raw[:200].split(b"\r\n", 1)[0]
                                                                       .decode("latin-1"))})

    def _send_refusal(self, refusal: ClientError) -> None:
        """A refusal before the request could be answered; the connection then closes."""
        self.close_connection = True
        response = refusal.response_bytes(close=True)
        try:
            self.socket.sendall(response)
        except OSError:
            return
        self.status, self.code, self.response_length = STATUS_LINES[refusal.status].encode(), refusal.status, \
            len(response)
        self._orig_status = STATUS_LINES[refusal.status]
        self.log_request()

    # --- answering -----------------------------------------------------------------------
    def publishing_path(self) -> bool:
        publishing = self.server.publishing
        return publishing is not None and publishing.serves(_unquoted(self.path))

    def _answer_publishing(self) -> None:
        """A publishing request's answer, from `publishing.answer`, in one send."""
        head = self.head
        assert head is not None and self.server.publishing is not None
        request = PublishingRequest(self.command, _unquoted(self.path), head.headers, self.body, self.remote)
        status, body, headers = self.server.publishing.answer(request)
        self._orig_status = STATUS_LINES[status]
        self.status, self.code, self.headers_sent = self._orig_status.encode("latin-1"), status, True
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
        if self.close_connection:
            lines += "Connection: close\r\n"
        self._send_response(f"HTTP/1.1 {self._orig_status}\r\n{lines}Date: {http_date_now()}\r\n\r\n"
                            .encode("latin-1") + body)
        self.time_finish = time.time()
        self.log_request()

    def get_environ(self) -> dict[str, Any]:
        """The WSGI environ of the request read: what pywsgi's would hold, with the body
        already read (`wsgi.input` is a BytesIO of it)."""
        head = self.head
        assert head is not None
        environ = self.server.get_environ()
        environ.update({
            "REQUEST_METHOD": self.command, "SCRIPT_NAME": "", "PATH_INFO": _unquoted(self.path),
            "QUERY_STRING": self.query, "SERVER_PROTOCOL": self.request_version,
            "REMOTE_ADDR": self.remote, "CONTENT_LENGTH": str(len(self.body)) if self.body else "",
            "wsgi.input": io.BytesIO(self.body), "wsgi.input_terminated": True,
        })
        if isinstance(self.client_address, tuple):
            environ["REMOTE_PORT"] = str(self.client_address[1])
        for name, value in head.headers.items():
            if "_" in name:  # would collide with a dashed name (pywsgi drops them too)
                continue
            key = name.replace("-", "_").upper()
            if key == "CONTENT_TYPE":
                environ[key] = value
            elif key not in ("CONTENT_LENGTH", "TRANSFER_ENCODING", "EXPECT"):
                environ["HTTP_" + key] = value.strip()
        return environ

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        """Every answer gets the cached Date (pywsgi would format one per response), and
        `Connection: close` when the connection closes after it (RFC 9112 section 9.6)."""
        if self.server.draining:
            self.close_connection = True
        names = {name.lower() for name, _ in headers}
        extra = [] if "date" in names else [("Date", http_date_now())]
        if self.close_connection and "connection" not in names and not status.startswith("101"):
            extra.append(("Connection", "close"))
        return super().start_response(status, [*headers, *extra] if extra else headers, exc_info)

    def _write_with_headers(self, data: bytes) -> None:
        """pywsgi sends a response's head, then its first body chunk: two syscalls and two
        wakeups of the client. Collect both parts and send them together."""
        parts: list[bytes] = []
        self._sendall = parts.append  # shadows the method while pywsgi formats the response
        try:
            super()._write_with_headers(data)
        finally:
            del self._sendall
        self._send_response(b"".join(parts))

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

    # --- WebSocket -------------------------------------------------------------------------
    def run_application(self) -> None:
        """A `/ws` upgrade goes to its endpoint before Flask, and so does any request to a
        stream's path (`/events`); anything else to Flask."""
        path = self.environ["PATH_INFO"]
        stream = self.server.stream_endpoints.get(path)
        if stream is not None:
            self._answer_stream(stream)
            return
        endpoint = self.server.websocket_endpoints.get(path)
        if endpoint is None or not _asks_for_websocket(self.environ):
            pywsgi.WSGIHandler.run_application(self)  # Flask (a plain GET /ws gets its 426)
            return
        try:
            _check_handshake(self.environ, self.request_version)
            assert self.head is not None
            with endpoint.admitted(WebSocketRequest(self.head.headers, self.query, self.remote)) as admission:
                self._upgrade_and_serve(endpoint, admission)
        except ClientError as refusal:
            self._answer_refusal(refusal)

    def _answer_refusal(self, refusal: ClientError) -> None:
        body = refusal.body()
        self.start_response(STATUS_LINES[refusal.status], refusal.response_headers(body))
        self.result = [body]
        self.process_result()

    def _upgrade_and_serve(self, endpoint: WebSocketEndpoint, admission: Any) -> None:
        """gevent-websocket's handshake (101), then the endpoint serves the socket."""
        self.result = self.upgrade_connection()
        if self.code != 101:  # the library refused, with its own answer
            self.process_result()
            return
        # The library built its own WebSocket object; ours does the framing.
        retire_library_websocket(self.websocket)
        self.write(b"")  # the 101
        self.websocket = None
        self._serve_connection(endpoint, admission)

    def _answer_stream(self, stream: StreamEndpoint) -> None:
        """A stream's request: GET only (405 otherwise), admitted, then the endpoint writes
        the response and serves it; no request follows on this connection."""
        self.close_connection = True
        try:
            if self.command != "GET":
                raise Refusal.METHOD_NOT_ALLOWED(allow="GET")
            assert self.head is not None
            with stream.admitted(WebSocketRequest(self.head.headers, self.query, self.remote)) as admission:
                self._serve_connection(stream, admission)
        except ClientError as refusal:
            self._answer_refusal(refusal)
            return
        self._orig_status = "200 OK"  # for the request's log line, written when the stream ended
        self.status, self.code = self._orig_status.encode("latin-1"), 200

    def _serve_connection(self, endpoint: WebSocketEndpoint | StreamEndpoint, admission: Any) -> None:
        # An idle socket may live for hours: keep nothing it does not need. Every
        # reference to the buffered reader and its 8 KiB buffer goes (a `Connection`
        # takes what it read ahead, then reads the socket directly); the closed
        # stand-in tells pywsgi that no request follows. The request's head, body and
        # environ go too: every object a socket keeps is walked by each full garbage
        # collection.
        self.response_headers = self.result = None
        self.head, self.body = None, b""
        self.environ = {"PATH_INFO": self.environ.get("PATH_INFO", "")}
        try:
            endpoint.serve(admission, self.socket, self._hand_over_reader(), self.remote)
        except ClientError:
            raise  # refused before anything was written (a stream's 503): answered on this socket
        except BaseException:
            self._close_upgraded_socket()
            raise
        self._close_upgraded_socket()

    def _close_upgraded_socket(self) -> None:
        """Close the socket of a WebSocket or stream that has ended, and tell pywsgi (no socket: no
        further request, nothing to close). pywsgi would first read whatever the client
        sent after its last request, so that closing does not reset an HTTP answer away: a
        system call per connection, 10,000 of them in a shutdown, for nothing, since the
        frames were read to the client's close or the connection was hung up."""
        sock, self.socket = self.socket, None
        sock.close()

    def _hand_over_reader(self) -> Any:
        """The buffered reader, which from now on only the endpoint's `Connection` holds
        (no local name keeps it alive while the socket lives)."""
        rfile, self.rfile = self.rfile, _NO_FURTHER_REQUESTS
        return rfile

    # --- logs ------------------------------------------------------------------------------
    def log_request(self) -> None:
        status = str(self._orig_status or self.status or "000").split()[0]
        level = logging.DEBUG if status[0] in "12" else logging.INFO
        if not log.isEnabledFor(level):
            return
        duration_s = (self.time_finish or time.time()) - self.time_start
        log.log(level, "http request", extra={
            "event": "http_request", "method": self.command, "path": self.path or "",
            "status": int(status) if status.isdigit() else 0, "bytes": self.response_length,
            "duration_ms": round(duration_s * 1000, 3), "remote": self.remote})

    def log_error(self, message: str, *args: Any) -> None:
        log.warning(redact(message % args if args else message), extra={"event": "bad_request",
                                                                         "remote": self.remote})

    def _log_error(self, error_type: Any, value: Any, traceback: Any) -> None:
        if issubclass(error_type, GreenletExit):
            return
        log.error("unhandled error in request", exc_info=(error_type, value, traceback),
                  extra={"event": "internal_error", "path": self.environ.get("PATH_INFO", ""),
                         "remote": self.remote})


def _unquoted(path: str) -> str:
    """The path as PATH_INFO holds it: percent-escapes decoded (as latin-1, like pywsgi)."""
    return unquote_to_bytes(path).decode("latin-1") if "%" in path else path


def _check_handshake(environ: dict[str, Any], request_version: str) -> None:
    """Refuse malformed handshakes ourselves, as JSON and before any database query:
    gevent-websocket answers some with a Content-Length but no body (HTTP/1.0 with 402),
    and a key that is not base64 with a traceback."""
    if request_version != "HTTP/1.1":
        raise Refusal.WEBSOCKET_NEEDS_HTTP11()
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION") not in WebSocketHandler.SUPPORTED_VERSIONS:
        raise Refusal.WEBSOCKET_VERSION()
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    if not key:
        raise Refusal.WEBSOCKET_KEY_MISSING()
    if not _is_websocket_key(key):
        raise Refusal.WEBSOCKET_KEY_INVALID()


def _is_websocket_key(key: str) -> bool:
    try:
        return len(binascii.a2b_base64(key.encode("ascii"), strict_mode=True)) == 16
    except (ValueError, UnicodeEncodeError):
        return False


def _asks_for_websocket(environ: dict[str, Any]) -> bool:
    return (environ.get("REQUEST_METHOD") == "GET"
            and environ.get("HTTP_UPGRADE", "").lower() == "websocket"
            and "upgrade" in environ.get("HTTP_CONNECTION", "").lower())


def http_date_now() -> str:
    """The Date header's value, formatted once a second rather than per answer."""
    return _http_date(int(time.time()))


@functools.lru_cache(maxsize=1)
def _http_date(second: int) -> str:
    return email.utils.formatdate(second, usegmt=True)
