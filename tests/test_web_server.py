"""wsgateway.web_server: every request read whole under one deadline, framing trusted only when
RFC 9112 allows it, a TLS handshake deadline, every open connection counted, `Connection: close`
honoured, accept errors survived, and every line the process writes one JSON object."""
from __future__ import annotations

import gc
import inspect
import json
import socket
import ssl
import time
from pathlib import Path

import gevent
import gevent.baseserver
import gevent.hub
import gevent.server
import pytest
from gevent import pywsgi
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import WebSocket

from tests.certificates import make_tls_files
from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import answers_in, read_until_closed, receive_event
from tests.support.frames import RawClient
from tests.support.gateways import TokenTable
from tests.support.processes import GatewayProcess
from wsgateway.publishing import Publishing
from wsgateway.web_server import retire_library_websocket

REQUEST_TIMEOUT_S = 0.5


def publish_request(token: str, body: bytes, *headers: str, path: str = "/publish", length: bool = True) -> bytes:
    lines = "".join(f"{header}\r\n" for header in headers)
    framing = f"Content-Length: {len(body)}\r\n" if length else ""
    return (f"POST {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\n{framing}{lines}\r\n").encode() + body


BODY = b'{"player_id": 21, "event": "e"}'


# --- defect 1: one deadline for the whole request -------------------------------------------------

@pytest.mark.parametrize("pace", ["stalled", "trickled"])
def test_slow_body_gets_408_and_is_closed_at_the_request_timeout(start_gateway, pace):
    """Headers in time but a body that stalls, or trickles a byte every 0.1 s, gets 408 and the close at -request-timeout."""
    gateway = start_gateway("-request-timeout", f"{REQUEST_TIMEOUT_S}s")
    player = gateway.connect(gateway.tokens.player(21))
    body = b'{"player_id": 21, "event": "slow", "payload": "' + b"x" * 40 + b'"}'
    head = publish_request(gateway.tokens.server(), b"").replace(b"Content-Length: 0", b"Content-Length: %d" % len(body))
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
        started = time.monotonic()
        sock.sendall(head + body[:5])
        if pace == "trickled":
            for byte in body[5:]:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break  # hung up mid-trickle, as it should
                gevent.sleep(0.1)  # the attack's pace, not a wait for the gateway
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert [(status, json.loads(data)) for status, _, data in answers_in(answer)] == [
        (408, {"error": "request not received in time"})]
    assert REQUEST_TIMEOUT_S * 0.9 < elapsed < REQUEST_TIMEOUT_S + TIMEOUT_S / 2
    assert gateway.publish(gateway.tokens.server(), 21, "fast").status == 200
    assert receive_event(player) == {"event": "fast", "payload": None}  # the slow one was never delivered


def test_deadline_counts_from_the_wait_and_ends_with_the_body(start_gateway):
    """A request that arrives whole within the deadline is answered however long the application then takes."""
    gateway = start_gateway("-request-timeout", f"{REQUEST_TIMEOUT_S}s")
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
        for _ in range(3):
            gevent.sleep(REQUEST_TIMEOUT_S / 3)
            sock.sendall(publish_request(gateway.tokens.server(), BODY))
            received = b""
            while b"}" not in received:
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk
            assert received.startswith(b"HTTP/1.1 200")


# --- defect 2: the TLS handshake deadline ---------------------------------------------------------

def test_tls_client_without_a_whole_client_hello_is_closed_at_the_handshake_timeout(start_gateway, tmp_path):
    """A TCP client that sends nothing, or half a ClientHello, is closed at -tls-handshake-timeout; others go on."""
    files = make_tls_files(tmp_path)
    gateway = start_gateway("-tls-cert", str(files.cert), "-tls-key", str(files.key),
                            "-tls-handshake-timeout", f"{REQUEST_TIMEOUT_S}s", "-request-timeout", "30s")
    hello = _client_hello()
    silent = socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S)
    half = socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S)
    half.sendall(hello[: len(hello) // 2])
    started = time.monotonic()
    assert read_until_closed(silent) == b""
    assert read_until_closed(half) == b""
    assert REQUEST_TIMEOUT_S * 0.9 < time.monotonic() - started < REQUEST_TIMEOUT_S + TIMEOUT_S / 2
    wait_for(lambda: gateway.gateway.server.open_connections == 0, what="both connections gone")
    context = ssl.create_default_context(cafile=str(files.ca_cert))
    with context.wrap_socket(socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S),
                             server_hostname="localhost") as secure:
        secure.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert read_until_closed(secure).startswith(b"HTTP/1.1 200")
    silent.close()
    half.close()


def test_a_tls_connection_past_max_total_conns_is_closed_before_its_handshake(start_gateway, tmp_path):
    """Past -max-total-conns a TLS client's ClientHello gets no ServerHello: the connection is closed unanswered."""
    files = make_tls_files(tmp_path)
    gateway = start_gateway("-tls-cert", str(files.cert), "-tls-key", str(files.key), "-max-total-conns", "1",
                            "-tls-handshake-timeout", "30s")
    held = socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S)
    wait_for(lambda: gateway.gateway.server.open_connections == 1, what="one handshake pending")
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as late:
        late.sendall(_client_hello())
        assert read_until_closed(late) == b""
    assert gateway.metric("ws_connections_rejected_total", reason="capacity") == 1
    held.close()
    wait_for(lambda: gateway.gateway.server.open_connections == 0, what="the place freed")
    context = ssl.create_default_context(cafile=str(files.ca_cert))
    with context.wrap_socket(socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S),
                             server_hostname="localhost") as secure:
        secure.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert read_until_closed(secure).startswith(b"HTTP/1.1 200")


def _client_hello() -> bytes:
    """The first flight of a real TLS client: its ClientHello record."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def test_tls_handshake_timeout_defaults_to_ten_seconds(start_gateway):
    """Without the flag, a handshake has 10 s."""
    assert start_gateway().gateway.server.limits.tls_handshake_timeout_s == 10.0


# --- defect 3: framing that cannot be trusted ----------------------------------------------------

SMUGGLING = {
    "two differing Content-Lengths": b"Content-Length: 31\r\nContent-Length: 4\r\n",
    "two equal Content-Lengths": b"Content-Length: 31\r\nContent-Length: 31\r\n",
    "Content-Length with chunked": b"Content-Length: 31\r\nTransfer-Encoding: chunked\r\n",
    "chunked with Content-Length": b"Transfer-Encoding: chunked\r\nContent-Length: 31\r\n",
    "a coding other than chunked": b"Transfer-Encoding: gzip\r\nContent-Length: 31\r\n",
    "chunked not last": b"Transfer-Encoding: chunked, gzip\r\n",
    "a list Content-Length": b"Content-Length: 31, 31\r\n",
    "a signed Content-Length": b"Content-Length: +31\r\n",
    "a folded header": b"Content-Length: 31\r\nX-Folded: a\r\n b\r\n",
    "a space before the colon": b"Content-Length : 31\r\n",
    "a bare LF": b"Content-Length: 31\nX: y\r\n",
}


@pytest.mark.parametrize("framing", SMUGGLING, ids=list(SMUGGLING))
def test_untrustworthy_framing_gets_400_and_the_close(gateway, tokens, framing):
    """RFC 9112 section 6.3: 400 and the connection closed; the bytes behind run as no hidden request."""
    player = gateway.connect(tokens.player(21))
    server = tokens.server()
    hidden = publish_request(server, b'{"player_id": 21, "event": "hidden"}')
    request = (f"POST /publish HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {server}\r\n".encode()
               + SMUGGLING[framing] + b"\r\n" + BODY + hidden)
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(request)
        answer = read_until_closed(sock)
    assert [(status, json.loads(data)) for status, _, data in answers_in(answer)] == [
        (400, {"error": "malformed HTTP request"})]
    assert b"\r\nConnection: close\r\n" in answer
    assert gateway.publish(server, 21, "after").status == 200
    assert receive_event(player) == {"event": "after", "payload": None}  # neither BODY nor the hidden one


def test_transfer_encoding_in_http_1_0_is_refused(gateway, tokens):
    """HTTP/1.0 has no transfer codings: a 1.0 request with one has faulty framing (RFC 9112 section 6.1)."""
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(b"POST /publish HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert answers_in(read_until_closed(sock))[0][0] == 400


# --- defect 4 and the 431 ------------------------------------------------------------------------

def test_more_than_100_headers_get_431(gateway, caplog):
    """101 headers: 431 with a JSON error and no traceback logged; the gateway goes on."""
    headers = "".join(f"X-{index}: v\r\n" for index in range(101))
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: g\r\n{headers}\r\n".encode())
        answer = answers_in(read_until_closed(sock))
    assert [(status, json.loads(data)) for status, _, data in answer] == [
        (431, {"error": "more than 100 request headers"})]
    assert all(record.exc_info is None for record in caplog.records)
    assert gateway.get("/healthz").status == 200


def test_a_header_block_over_64_kib_gets_431(gateway):
    """Headers past 64 KiB in all are refused with 431, not read on."""
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (index, b"v" * 1000)
                                                          for index in range(70)) + b"\r\n")
        assert answers_in(read_until_closed(sock))[0][0] == 431


def test_every_line_the_process_writes_is_json_under_hostile_input(tmp_path):
    """A subprocess gateway fed hostile requests writes only JSON lines, to its log and to stderr."""
    process = GatewayProcess(tmp_path, "-request-timeout", "1s")
    try:
        process.wait_ready()
        server = TokenTable(process.database_url).server()
        hostile = [
            b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % index for index in range(150)) + b"\r\n",
            b"POST /publish HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            b"POST /publish HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST /publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: %%%notbase64\r\n\r\n",
            b"GET /%ff%00?token=secret HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01\x00\xff\x01" + bytes(range(256)) + b"\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: \xff\x00\r\n\r\n",
            b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n",
            b"POST /publish HTTP/1.1\r\nContent-Length: 100\r\n\r\nshort",
            publish_request(server, b"{" * 5000 + b"}" * 5000),
            publish_request(server, b'{"player_id": 1, "event": "e"}', "Expect: 100-continue"),
        ]
        for request in hostile:
            with socket.create_connection(("127.0.0.1", process.port), timeout=TIMEOUT_S) as sock:
                sock.sendall(request)
                if b"short" in request:
                    sock.shutdown(socket.SHUT_WR)
                read_until_closed(sock)
        process.wait_ready()
    finally:
        process.send_signal()
        process.wait()
    lines = (process.log_file.read_text() + process.stderr_file.read_text()).split("\n")[:-1]
    assert lines
    for line in lines:
        json.loads(line)  # raises on a line that is not one JSON object
    assert "secret" not in "\n".join(lines)


def test_accept_errors_at_the_descriptor_limit_are_one_json_line_and_survived(tmp_path):
    """At RLIMIT_NOFILE the refused accepts are logged as JSON lines; once sockets free up the gateway serves again."""
    process = GatewayProcess(tmp_path, "-request-timeout", "30s", max_open_files=64)
    held: list[socket.socket] = []
    try:
        process.wait_ready()
        for _ in range(80):
            held.append(socket.create_connection(("127.0.0.1", process.port), timeout=TIMEOUT_S))
        wait_for(lambda: "accept_failed" in process.log_file.read_text(), what="an accept_failed log line")
        for sock in held:
            sock.close()
        held.clear()
        process.wait_ready()
    finally:
        for sock in held:
            sock.close()
        process.send_signal()
        process.wait()
    lines = process.log_file.read_text().splitlines() + process.stderr_file.read_text().splitlines()
    events = [json.loads(line).get("event") for line in lines]
    assert "accept_failed" in events
    failed = [json.loads(line) for line in lines if '"accept_failed"' in line]
    assert failed[0]["errno"] == "EMFILE"


# --- defect 7: Connection: close ------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/publish", "/healthz"])
def test_connection_close_is_answered_with_connection_close_and_closed(gateway, tokens, path):
    """RFC 9112 section 9.6: the answer to a request with Connection: close says so, and the connection ends."""
    if path == "/publish":
        request = publish_request(tokens.server(), BODY, "Connection: close")
    else:
        request = b"GET /healthz HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(request + request)  # the second one must never be answered
        answer = answers_in(read_until_closed(sock))
    assert len(answer) == 1 and answer[0][0] == 200
    assert b"\r\nConnection: close\r\n" in answer[0][1] + b"\r\n"


def test_the_answer_before_a_close_is_sent_however_much_the_client_sent_after_it(gateway, tokens):
    """A publisher that sends 64 KiB more after a `Connection: close` publish still gets its 200: the
    gateway closes with those bytes unread, which resets the connection, and a reset discards what
    the kernel still holds unsent. The answer must be sent before the close (not held back for it),
    or a delivered message's publisher never hears so, retries, and the player gets it twice."""
    request = publish_request(tokens.server(), BODY, "Connection: close") + b"x" * 65536
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(request)
        answer = answers_in(read_until_closed(sock))
    assert len(answer) == 1 and answer[0][0] == 200, answer
    assert json.loads(answer[0][2]) == {"delivered": 0, "queued": True}


# --- one entry for publishing ----------------------------------------------------------------------

def test_every_way_a_publishing_request_arrives_is_answered_by_answer(gateway, tokens, monkeypatch):
    """A query, an escape, chunking, HTTP/1.0, Expect: 100-continue: the same `Publishing.answer`, the same 200."""
    server = tokens.server()
    answered: list[str] = []
    original = Publishing.answer

    def counted(self, request):
        answered.append(request.path)
        return original(self, request)
    monkeypatch.setattr(Publishing, "answer", counted)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    ways = [
        publish_request(server, BODY),
        publish_request(server, BODY, path="/publish?x=1"),
        publish_request(server, BODY, path="/publi%73h"),
        publish_request(server, b"", "Transfer-Encoding: chunked", length=False) + chunked,
        publish_request(server, BODY).replace(b"HTTP/1.1", b"HTTP/1.0"),
        publish_request(server, BODY, "Expect: 100-continue"),
    ]
    for request in ways:
        with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
            sock.sendall(request)
            received = b""
            while not received.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk
        final = received.split(b"HTTP/1.1 100 Continue\r\n\r\n")[-1]
        assert final.startswith(b"HTTP/1.1 200 OK"), (request[:60], received)
        assert json.loads(final.partition(b"\r\n\r\n")[2]) == {"delivered": 0, "queued": True}
    assert answered == ["/publish"] * len(ways)


def test_a_body_over_max_body_is_refused_before_it_is_read(start_gateway):
    """A declared length over -max-body gets 413 at once and the connection ends; a chunked one is cut at the limit."""
    gateway = start_gateway("-max-body", "100")
    server = gateway.tokens.server()
    declared = publish_request(server, b"").replace(b"Content-Length: 0", b"Content-Length: 1000000000")
    chunked = publish_request(server, b"", "Transfer-Encoding: chunked", length=False) + b"c8\r\n" + b"x" * 200
    for request in (declared, chunked):
        with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
            sock.sendall(request)
            answer = answers_in(read_until_closed(sock))
        assert [(status, json.loads(data)) for status, _, data in answer] == [
            (413, {"error": "body larger than 100 bytes"})]


# --- gevent internals that the web face still relies on -------------------------------------------

def test_gevent_internals_we_override_are_where_we_expect_them():
    """If a gevent or gevent-websocket upgrade moves one of these, this fails first, naming it."""
    assert "_write_with_headers" in vars(pywsgi.WSGIHandler)
    assert "self._sendall(towrite)" in inspect.getsource(pywsgi.WSGIHandler._write_with_headers)
    assert "self._log_error(" in inspect.getsource(pywsgi.WSGIHandler.handle_error)
    assert "self.handle_one_request()" in inspect.getsource(pywsgi.WSGIHandler.handle)
    assert "self.wsgi_input._discard()" in inspect.getsource(pywsgi.WSGIHandler.handle_one_response)
    assert "self.do_read()" in inspect.getsource(gevent.baseserver.BaseServer._do_read)
    assert "wrap_socket_and_handle" in inspect.getsource(gevent.server.StreamServer.set_listener) \
        or "wrap_socket_and_handle" in inspect.getsource(gevent.server.StreamServer)
    assert "self.print_exception(" in inspect.getsource(gevent.hub.Hub.handle_error)
    assert callable(WebSocketHandler.upgrade_connection)
    assert "self.websocket = WebSocket(" in inspect.getsource(WebSocketHandler.upgrade_connection)


def test_a_retired_library_websocket_is_finalised_without_touching_socket_or_handler():
    """gevent-websocket's WebSocket object, retired after the upgrade, writes nothing when it is dropped and never asks its handler for the application (which built a throw-away class twice per connection)."""
    written: list[bytes] = []
    asked: list[str] = []

    class Stream:
        def write(self, data: bytes) -> None:
            written.append(data)

        def read(self, size: int) -> bytes:
            return b""

    class Handler:
        @property
        def server(self):
            asked.append("server")
            raise AssertionError("the finaliser asked the handler for its server")

    websocket = WebSocket({}, Stream(), Handler())
    retire_library_websocket(websocket)
    websocket.__del__()  # what dropping the last reference runs
    del websocket
    gc.collect()
    assert (written, asked) == ([], [])


def test_readme_documents_the_new_settings():
    """-request-timeout, -tls-handshake-timeout and -max-total-conns's meaning are in the README."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for flag in ("`-request-timeout`", "`-tls-handshake-timeout`"):
        assert flag in readme


def test_a_connect_leaves_no_cyclic_garbage(gateway, tokens):
    """An admitted upgrade's leftovers (the library's WebSocket, the request's environ, the handshake's
    buffered reader) are freed when dropped, not kept for a full collection."""
    players = [tokens.player(player_id) for player_id in range(1, 21)]
    RawClient(gateway.host, gateway.port, f"/ws?token={players[0]}").sock.close()  # warm: caches, metric children
    wait_for(lambda: gateway.gateway.server.open_connections == 0, what="the warm-up connection gone")
    gc.collect()
    gc.disable()
    try:
        clients = [RawClient(gateway.host, gateway.port, f"/ws?token={token}") for token in players[1:]]
        assert {client.status for client in clients} == {101}
        wait_for(lambda: gateway.gateway.hub.connection_count() == len(clients), what="every player seated")
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        # Only the handshake makes these (other tests' leftovers may be in the garbage too).
        leftovers = [type(thing).__qualname__ for thing in gc.garbage
                     if type(thing).__module__.startswith("geventwebsocket")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert leftovers == []
    for client in clients:
        client.sock.close()


def test_connections_are_accepted_with_nagle_off(gateway):
    """The listener has TCP_NODELAY, and this kernel hands it to each accepted connection."""
    assert gateway.gateway.server.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    with socket.socket() as listener:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname(), timeout=TIMEOUT_S):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
