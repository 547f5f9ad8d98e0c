"""The gateway's lifecycle: graceful shutdown in process, and bin/ws-gateway as a real process
(start from anywhere, pid file, signals, JSON logs without tokens)."""
from __future__ import annotations

import _socket
import errno
import gc
import http.client
import json
import select
import signal
import socket
import sqlite3
import time

import gevent
import pytest
import websocket

from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import receive_close, receive_event
from tests.support.frames import RawClient
from tests.support.gateways import GatewayUnderTest, TokenTable
from tests.support.processes import GatewayProcess
from wsgateway.connection import CLOSE_HANDSHAKE_TIMEOUT_S
from wsgateway.server import freeze_startup_heap

UPGRADE_HEADERS = ("Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


class HalfSentRequest:
    """An HTTP request whose request line the gateway has read and whose headers are still
    to come: a request in flight, which shutdown must let finish."""

    def __init__(self, gateway: GatewayUnderTest, request_line: str) -> None:
        server = gateway.gateway.server
        self.sock = socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S)
        wait_for(lambda: len(server.idle_handlers) == 1, what="gateway waiting for a request line")
        self.sock.sendall(request_line.encode())
        wait_for(lambda: not server.idle_handlers, what="gateway reading the headers")

    def finish(self, headers: str, body: bytes = b"") -> tuple[int, dict]:
        """Send the rest; return the status and JSON body of the response."""
        self.sock.sendall(headers.encode() + b"\r\n" + body)
        response = http.client.HTTPResponse(self.sock)
        response.begin()
        body = json.loads(response.read())
        self.sock.close()
        return response.status, body


def test_a_wave_of_connections_waits_in_the_accept_queue_instead_of_being_dropped(gateway):
    """While the gateway is busy, 1,000 connections that arrive at once all complete their TCP handshake (they wait in an accept queue as deep as the kernel allows), where gevent's default queue of 128 dropped the rest for the clients to retry 1 s later."""
    wave = 1000
    poll = gevent.monkey.get_original("select", "poll")()
    clients = []
    try:
        # Plain C sockets and poll: the test never yields, so the gateway accepts nothing meanwhile.
        for _ in range(wave):
            client = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
            client.setblocking(False)
            assert client.connect_ex((gateway.host, gateway.port)) in (0, errno.EINPROGRESS)
            poll.register(client.fileno(), select.POLLOUT)
            clients.append(client)
        assert len(poll.poll(200)) == wave  # writable: the handshake completed
    finally:
        for client in clients:
            client.close()


def test_shutdown_closes_sockets_with_1001_and_refuses_newcomers(gateway, tokens):
    """Shutdown closes player sockets with 1001; while draining, connects are refused, /ws and /readyz get 503."""
    clients = [gateway.connect(tokens.player(player_id)) for player_id in (21, 22)]
    token = tokens.player(23)
    readiness = HalfSentRequest(gateway, "GET /readyz HTTP/1.1\r\n")
    upgrade = HalfSentRequest(gateway, f"GET /ws?token={token} HTTP/1.1\r\n")
    stopper = gevent.spawn(gateway.gateway.shutdown, TIMEOUT_S)
    wait_for(lambda: gateway.gateway.draining, what="draining")
    for client in clients:
        assert receive_close(client) == (1001, "server shutting down")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S)
    status, body = readiness.finish("Host: gateway\r\n")
    assert status == 503 and body["accepting"] == "shutting down"
    status, body = upgrade.finish(f"Host: gateway\r\n{UPGRADE_HEADERS}")
    assert (status, body) == (503, {"error": "server shutting down"})
    stopper.join(TIMEOUT_S)
    assert stopper.successful()
    assert gateway.metric("ws_disconnects_total", code="1001") == 2
    assert gateway.metric("ws_connections_rejected_total", reason="shutting_down") == 1
    assert gateway.gateway.hub.connection_count() == 0


def test_publish_in_flight_at_shutdown_is_refused_503_not_queued(gateway, tokens):
    """A publish still being read when shutdown begins gets 503, not a 200 "queued" that dies with the process."""
    client = gateway.connect(tokens.player(21))
    server_token = tokens.server()
    body = json.dumps({"player_id": 21, "event": "late"}).encode()
    publish = HalfSentRequest(gateway, "POST /publish HTTP/1.1\r\n")
    stopper = gevent.spawn(gateway.gateway.shutdown, TIMEOUT_S)
    wait_for(lambda: gateway.gateway.draining, what="draining")
    status, answer = publish.finish(f"Host: gateway\r\nAuthorization: Bearer {server_token}\r\n"
                                    f"Content-Length: {len(body)}\r\n", body)
    assert (status, answer) == (503, {"error": "server shutting down"})
    opcode, frame = client.recv_data_frame(True)  # the very next frame: no "late" event came first
    assert (opcode, frame.data[:2]) == (websocket.ABNF.OPCODE_CLOSE, b"\x03\xe9")  # 1001
    stopper.join(TIMEOUT_S)
    assert gateway.metric("ws_messages_queued_total") == 0


def test_idle_keepalive_connection_does_not_hold_shutdown(gateway):
    """A keep-alive HTTP connection waiting for its next request is ended at once by shutdown."""
    connection = http.client.HTTPConnection(gateway.host, gateway.port, timeout=TIMEOUT_S)
    connection.request("GET", "/healthz")
    response = connection.getresponse()
    assert response.status == 200 and not response.will_close
    response.read()
    wait_for(lambda: len(gateway.gateway.server.idle_handlers) == 1, what="connection idle between requests")
    started = time.monotonic()
    gateway.gateway.shutdown(timeout_s=TIMEOUT_S)
    assert time.monotonic() - started < TIMEOUT_S / 5
    assert connection.sock.recv(1) == b""  # the gateway hung up
    connection.close()


def test_shutdown_gives_up_on_unanswered_close_after_its_timeout(gateway, tokens):
    """A client that never answers the 1001 close does not hold shutdown past its timeout."""
    mute = RawClient(gateway.host, gateway.port, f"/ws?token={tokens.player(21)}")  # never reads or answers
    wait_for(lambda: gateway.gateway.hub.connection_count() == 1, what="connection registered")
    started = time.monotonic()
    gateway.gateway.shutdown(timeout_s=0.5)
    assert 0.4 < time.monotonic() - started < 0.5 + 1.0
    assert mute.read_close() == 1001
    assert gateway.gateway.hub.connection_count() == 0
    mute.close()


def test_shutdown_hangs_up_on_unanswered_closes_after_the_close_handshake_timeout(gateway, tokens):
    """With a long shutdown timeout, a client that never answers the 1001 close is hung up once the close handshake timeout has passed, while one that answers is done at once."""
    mute = RawClient(gateway.host, gateway.port, f"/ws?token={tokens.player(21)}")
    polite = gateway.connect(tokens.player(22))
    wait_for(lambda: gateway.gateway.hub.connection_count() == 2, what="connections registered")
    stopper = gevent.spawn(gateway.gateway.shutdown, 30.0)
    assert receive_close(polite) == (1001, "server shutting down")
    polite.close()  # answers the close
    started = time.monotonic()
    stopper.join(30.0)
    assert stopper.successful()
    assert CLOSE_HANDSHAKE_TIMEOUT_S - 0.5 < time.monotonic() - started < CLOSE_HANDSHAKE_TIMEOUT_S + 1.0
    assert mute.read_close() == 1001
    assert gateway.metric("ws_disconnects_total", code="1001") == 2
    mute.close()


# --- bin/ws-gateway as a process -----------------------------------------------------------------
@pytest.fixture
def gateway_process(tmp_path):
    """Start bin/ws-gateway from a directory of its own (not the project's); killed at the end."""
    started: list[GatewayProcess] = []

    def start(*flags: str) -> GatewayProcess:
        workdir = tmp_path / "elsewhere"
        workdir.mkdir(exist_ok=True)
        process = GatewayProcess(workdir, *flags)
        started.append(process)
        process.wait_ready()
        return process

    yield start
    for process in started:
        process.kill()


def deliver_once(process: GatewayProcess, client: websocket.WebSocket, table: TokenTable, player_id: int) -> str:
    """Publish with a Bearer token and see it arrive, which proves the client is registered."""
    server_token = table.server()
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=TIMEOUT_S)
    body = json.dumps({"player_id": player_id, "event": "hello", "payload": None})
    connection.request("POST", "/publish", body, {"Authorization": f"Bearer {server_token}",
                                                  "Content-Type": "application/json"})
    assert connection.getresponse().status == 200
    connection.close()
    assert receive_event(client) == {"event": "hello", "payload": None}
    return server_token


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_process_starts_anywhere_and_drains_on_signal(gateway_process, signum):
    """Run from elsewhere it creates its table and pid file; on the signal: 1001, exit 0 in time, pid file gone."""
    process = gateway_process("-shutdown-timeout", "3s")
    assert process.pid_file.read_text().strip() == str(process.process.pid)
    with sqlite3.connect(process.db_path) as database:
        assert database.execute("SELECT name FROM sqlite_master WHERE name = 'ws_token'").fetchall()
    table = TokenTable(process.database_url)
    client = websocket.create_connection(f"{process.ws_url}?token={table.player(21)}", timeout=TIMEOUT_S)
    deliver_once(process, client, table, 21)
    table.engine.dispose()

    started = time.monotonic()
    process.send_signal(signum)
    assert receive_close(client) == (1001, "server shutting down")
    assert process.wait(timeout_s=3 + TIMEOUT_S) == 0
    assert time.monotonic() - started < 3
    assert not process.pid_file.exists()
    assert process.stderr_file.read_text() == ""


def test_logs_are_json_lines_without_tokens(gateway_process):
    """Every log line is a JSON object, and no player or server token appears in the log."""
    process = gateway_process()
    table = TokenTable(process.database_url)
    player_token = table.player(21)
    bad_token = "f00dfeedf00dfeedf00dfeedf00dfeed"
    client = websocket.create_connection(f"{process.ws_url}?token={player_token}", timeout=TIMEOUT_S)
    server_token = deliver_once(process, client, table, 21)
    with pytest.raises(websocket.WebSocketBadStatusException) as refusal:
        websocket.create_connection(f"{process.ws_url}?token={bad_token}", timeout=TIMEOUT_S)
    assert refusal.value.status_code == 401
    client.close()
    table.engine.dispose()
    process.send_signal(signal.SIGTERM)
    assert process.wait() == 0

    text = process.log_file.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(line, dict) and line["event"] and line["time"] for line in lines)
    events = {line["event"] for line in lines}
    assert {"started", "ws_connected", "ws_disconnected", "http_request", "stopped"} <= events
    for secret in (player_token, bad_token, server_token):
        assert secret not in text


def test_process_keeps_its_start_up_heap_out_of_garbage_collections(gateway_process):
    """Once started, the process freezes what it built (tens of thousands of objects), and still serves."""
    process = gateway_process()
    frozen = [line for line in map(json.loads, process.log_file.read_text().splitlines())
              if line["event"] == "heap_frozen"]
    assert len(frozen) == 1 and frozen[0]["objects"] > 10_000, frozen
    table = TokenTable(process.database_url)
    client = websocket.create_connection(f"{process.ws_url}?token={table.player(21)}", timeout=TIMEOUT_S)
    deliver_once(process, client, table, 21)
    table.engine.dispose()


def test_a_crowd_of_new_long_lived_objects_triggers_no_full_collection():
    """After the start-up heap is frozen, objects that arrive and stay (connections coming in, as many as 10,000 players leave behind) cause no full garbage collection, where CPython's default ran one each time they grew by a quarter."""
    thresholds = gc.get_threshold()
    full_collections = []

    def count(phase: str, info: dict) -> None:
        if phase == "stop" and info["generation"] == 2:
            full_collections.append(info)
    try:
        freeze_startup_heap()
        gc.callbacks.append(count)
        crowd = [[index] for index in range(300_000)]  # about 10,000 connections' tracked objects
        assert not full_collections
        del crowd
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def test_keep_alive_publishes_do_not_wait_for_delayed_acks(gateway, tokens):
    """Publishes on one keep-alive connection are answered at once, not ~40 ms late (Nagle's algorithm is off)."""
    server = tokens.server()
    client = gateway.connect(tokens.player(21))
    connection = http.client.HTTPConnection(gateway.host, gateway.port, timeout=TIMEOUT_S)
    body = json.dumps({"player_id": 21, "event": "e"})
    durations = []
    try:
        for _ in range(20):
            started = time.monotonic()
            connection.request("POST", "/publish", body, {"Authorization": f"Bearer {server}"})
            response = connection.getresponse()
            response.read()
            durations.append(time.monotonic() - started)
            assert response.status == 200
            receive_event(client)
    finally:
        connection.close()
    durations.sort()
    assert durations[len(durations) // 2] < 0.02, durations


def log_events(path) -> list[str]:
    return [json.loads(line)["event"] for line in path.read_text().splitlines()] if path.exists() else []


def test_sighup_reopens_the_log_file_and_the_gateway_serves_on(gateway_process):
    """SIGHUP after logrotate moved the log: a new file at the path, sockets untouched, then SIGTERM drains as usual."""
    process = gateway_process("-shutdown-timeout", "3s")
    table = TokenTable(process.database_url)
    client = websocket.create_connection(f"{process.ws_url}?token={table.player(21)}", timeout=TIMEOUT_S)
    deliver_once(process, client, table, 21)
    rotated = process.log_file.with_name("ws-gateway.log.1")
    process.log_file.rename(rotated)

    process.send_signal(signal.SIGHUP)
    wait_for(lambda: "log_reopened" in log_events(process.log_file), what="log_reopened in the new file")
    deliver_once(process, client, table, 21)  # the same socket, still served
    assert process.process.poll() is None and process.pid_file.exists()
    assert "started" in log_events(rotated) and "started" not in log_events(process.log_file)
    table.engine.dispose()

    process.send_signal(signal.SIGTERM)
    assert receive_close(client) == (1001, "server shutting down")
    assert process.wait(timeout_s=3 + TIMEOUT_S) == 0
    assert not process.pid_file.exists()
    assert "stopped" in log_events(process.log_file)
    assert process.stderr_file.read_text() == ""
