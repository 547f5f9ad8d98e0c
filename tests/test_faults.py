"""Faults a gateway meets in production: the database going away (MariaDB down or
partitioned, a locked sqlite file), clients that vanish without a word, and SIGTERM
while publishes are in flight. The gateway must keep what it can, answer the rest
clearly, and recover by itself."""
from __future__ import annotations

import http.client
import json
import signal
import socket
import sqlite3
import struct
import time
from typing import Any, Callable, Iterator

import gevent
import pytest
import websocket
from sqlalchemy.engine import make_url

from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import receive_event
from tests.support.frames import RawClient, answer_pings
from tests.support.gateways import GatewayUnderTest, TokenTable
from tests.support.processes import GatewayProcess, TcpForwarder

DB_TIMEOUT_S = 1.0
OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA


# --- the database goes away ----------------------------------------------------------------------
class Outage:
    """A way of making the token database unreachable for a running gateway."""

    def __init__(self, database_url: str, begin: Callable[[], None], end: Callable[[], None]) -> None:
        self.database_url = database_url
        self.begin = begin
        self.end = end


@pytest.fixture
def mysql_forwarder(mysql_url) -> Iterator[tuple[TcpForwarder, str]]:
    """A relay to MariaDB that the test can cut or pause, and the database URL through it."""
    url = make_url(mysql_url)
    forwarder = TcpForwarder((url.host or "127.0.0.1", url.port or 3306))
    yield forwarder, url.set(host="127.0.0.1", port=forwarder.port).render_as_string(hide_password=False)
    forwarder.close()


@pytest.fixture(params=["mysql-down", "mysql-partitioned", "sqlite-locked"])
def outage(request, tmp_path) -> Iterator[Outage]:
    """MariaDB refusing connections, MariaDB silent behind a partition, or a sqlite file
    held under an exclusive lock by another writer (a long migration, say)."""
    if request.param.startswith("mysql"):
        forwarder, url = request.getfixturevalue("mysql_forwarder")
        from sqlalchemy import create_engine, text
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE IF EXISTS ws_token"))
        engine.dispose()
        if request.param == "mysql-down":
            yield Outage(url, forwarder.cut, forwarder.restore)
        else:
            yield Outage(url, forwarder.pause, forwarder.resume)
        return
    path = tmp_path / "locked.db"
    holder: list[sqlite3.Connection] = []

    def lock() -> None:
        connection = sqlite3.connect(path, isolation_level=None, timeout=0)
        connection.execute("BEGIN EXCLUSIVE")
        holder.append(connection)

    def unlock() -> None:
        holder.pop().execute("ROLLBACK")

    yield Outage(f"sqlite:///{path}", lock, unlock)
    for connection in holder:
        connection.close()


def timed(action: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = action()
    return result, time.monotonic() - started


def test_database_outage_keeps_live_traffic_and_recovers_by_itself(start_gateway, outage):
    """DB outage: sockets stay, cached-token publishes flow, connects get 503 fast, /readyz fails; then all recovers."""
    gateway = start_gateway("-db-timeout", f"{DB_TIMEOUT_S:g}s", database_url=outage.database_url)
    live = gateway.connect(gateway.tokens.player(21))
    cached_server = gateway.tokens.server("backend-1")
    fresh_server = gateway.tokens.server("backend-2")
    newcomer = gateway.tokens.player(22)
    assert gateway.publish(cached_server, 21, "before").status == 200  # this server token is now cached
    assert receive_event(live) == {"event": "before", "payload": None}

    outage.begin()
    bound_s = DB_TIMEOUT_S + 0.5  # -db-timeout, and the time to answer
    refusal, took_s = timed(lambda: gateway.refused(f"?token={newcomer}"))
    assert refusal == (503, {"error": "token store unavailable, retry later"})
    assert took_s < bound_s
    reply, took_s = timed(lambda: gateway.publish(fresh_server, 21, "uncached"))
    assert (reply.status, reply.json, reply.headers["retry-after"]) == (
        503, {"error": "token store unavailable, retry later"}, "1")
    assert took_s < bound_s
    readiness, took_s = timed(lambda: gateway.get("/readyz"))
    assert readiness.status == 503 and readiness.json["database"] == "unreachable"
    assert took_s < bound_s
    assert gateway.gateway.revalidator.run_once() == 0  # revalidation fails: nobody is closed for it
    for number in range(3):
        reply, took_s = timed(lambda: gateway.publish(cached_server, 21, "during", number))
        assert reply.status == 200 and reply.json == {"delivered": 1, "queued": False}
        assert took_s < 0.5, "a publish with a cached token waited on the database"
        assert receive_event(live) == {"event": "during", "payload": number}
    assert gateway.gateway.hub.is_connected("21")
    assert gateway.metric("ws_http_requests_total", endpoint="publish", status="500") == 0

    outage.end()
    wait_for(lambda: gateway.get("/readyz").status == 200, 3 * bound_s, what="/readyz ready again")
    gateway.connect(newcomer)
    assert gateway.publish(fresh_server, 22, "after").status == 200
    assert gateway.publish(cached_server, 21, "after").status == 200
    assert receive_event(live) == {"event": "after", "payload": None}


# --- clients that vanish -------------------------------------------------------------------------
def assert_gauge_is_truth(gateway: GatewayUnderTest, connections: int) -> None:
    """The active-connections gauge, the hub and the server's handler greenlets agree on `connections`."""
    assert gateway.gateway.hub.connection_count() == connections
    assert gateway.metric("ws_active_connections") == connections
    wait_for(lambda: len(gateway.gateway.server.pool) == connections, what=f"{connections} handler greenlets")


def test_reset_connection_is_released_at_once(start_gateway):
    """A client whose TCP connection is reset (RST) is removed at once as 1006, not after -pong-wait."""
    gateway = start_gateway("-pong-wait", "60s")
    bystander = gateway.connect(gateway.tokens.player(22))
    vanishing = RawClient(gateway.host, gateway.port, f"/ws?token={gateway.tokens.player(21)}")
    wait_for(lambda: gateway.gateway.hub.connection_count() == 2, what="both connected")
    vanishing.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    vanishing.sock.close()  # linger 0: the kernel sends RST instead of FIN
    wait_for(lambda: not gateway.gateway.hub.is_connected("21"), what="reset client removed")
    assert gateway.metric("ws_disconnects_total", code="1006") == 1
    assert_gauge_is_truth(gateway, 1)
    assert gateway.publish(gateway.tokens.server(), 22, "still").status == 200
    assert receive_event(bystander) == {"event": "still", "payload": None}


def test_half_open_connection_is_released_within_pong_wait(start_gateway):
    """A client cut off without FIN or RST (a partition) is released within -pong-wait, even while sent to."""
    gateway = start_gateway("-ping-period", "100ms", "-pong-wait", "500ms")
    partition = TcpForwarder((gateway.host, gateway.port))
    bystander = RawClient(gateway.host, gateway.port, f"/ws?token={gateway.tokens.player(22)}")
    heard: list[bytes] = []
    keeper = gevent.spawn(answer_pings, bystander, heard)
    try:
        stranded = RawClient("127.0.0.1", partition.port, f"/ws?token={gateway.tokens.player(21)}")
        wait_for(lambda: gateway.gateway.hub.connection_count() == 2, what="both connected")
        partition.pause()
        server = gateway.tokens.server()
        started = time.monotonic()
        for _ in range(20):  # frames pile up towards a peer that will never read them
            assert gateway.publish(server, 21, "lost", "x" * 10_000).status == 200
        limit_s = 0.5 + 1.0 + TIMEOUT_S / 5  # -pong-wait, one check interval, and slack
        wait_for(lambda: not gateway.gateway.hub.is_connected("21"), limit_s, what="half-open client released")
        assert time.monotonic() - started < limit_s
        assert gateway.metric("ws_disconnects_total", code="4001") == 1
        assert_gauge_is_truth(gateway, 1)
        assert gateway.publish(server, 22, "still").status == 200
        wait_for(lambda: heard, what="the bystander's event")
        assert json.loads(heard[0]) == {"event": "still", "payload": None}
        stranded.close()
    finally:
        keeper.kill()
        bystander.close()
        partition.close()


# --- SIGTERM under load ------------------------------------------------------------------------
SHUTDOWN_TIMEOUT_S = 5.0


def test_sigterm_under_load_gives_every_socket_1001_and_every_publish_a_definite_answer(tmp_path):
    """SIGTERM mid-traffic: each socket gets 1001, a 200 means delivered, anything else means not; exit 0 in time."""
    # Server-token checks cached for only 50 ms: publishes query the database, so some are
    # still being processed when the drain begins.
    process = GatewayProcess(tmp_path, "-shutdown-timeout", f"{SHUTDOWN_TIMEOUT_S:g}s", "-rate-limit", "0",
                             "-revalidate-period", "50ms")
    try:
        process.wait_ready()
        table = TokenTable(process.database_url)
        server_token = table.server()
        players = 40
        clients = [websocket.create_connection(f"{process.ws_url}?token={table.player(index)}", timeout=TIMEOUT_S)
                   for index in range(players)]
        table.engine.dispose()
        received: list[set[int]] = [set() for _ in range(players)]
        close_codes: list[int | None] = [None] * players

        def read(index: int) -> None:
            while True:
                opcode, frame = clients[index].recv_data_frame(True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    close_codes[index] = struct.unpack("!H", frame.data[:2])[0]
                    return
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    received[index].add(json.loads(frame.data)["payload"])

        outcomes: dict[int, tuple[str, Any]] = {}  # publish number -> ("answer", (status, body)) or ("transport", error)
        numbers = iter(range(10**9))

        def publish_until_refused() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=TIMEOUT_S)
            while True:
                number = next(numbers)
                body = json.dumps({"player_id": number % players, "event": "n", "payload": number})
                try:
                    connection.request("POST", "/publish", body, {"Authorization": f"Bearer {server_token}"})
                    response = connection.getresponse()
                    outcomes[number] = ("answer", (response.status, json.loads(response.read())))
                    if response.will_close:
                        connection.close()
                except (OSError, http.client.HTTPException) as error:
                    outcomes[number] = ("transport", type(error).__name__)
                    connection.close()
                    if isinstance(error, ConnectionRefusedError):
                        return  # the listener is gone: nothing more can be in flight

        readers = [gevent.spawn(read, index) for index in range(players)]
        publishers = [gevent.spawn(publish_until_refused) for _ in range(12)]
        wait_for(lambda: len(outcomes) >= 300, what="traffic flowing")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        gevent.joinall(publishers, timeout=SHUTDOWN_TIMEOUT_S + TIMEOUT_S, raise_error=True)
        gevent.joinall(readers, timeout=SHUTDOWN_TIMEOUT_S + TIMEOUT_S, raise_error=True)
        assert process.wait(SHUTDOWN_TIMEOUT_S + TIMEOUT_S) == 0
        assert time.monotonic() - started < SHUTDOWN_TIMEOUT_S
        assert close_codes == [1001] * players

        answers = {kind: 0 for kind in ("delivered", "refused_503", "transport")}
        for number, (kind, detail) in outcomes.items():
            arrived = number in received[number % players]
            if kind == "answer" and detail[0] == 200:
                assert detail[1] == {"delivered": 1, "queued": False}, (number, detail)
                assert arrived, f"publish {number} answered 200 but never arrived"
                answers["delivered"] += 1
            else:
                assert kind == "transport" or detail == (503, {"error": "server shutting down"}), (number, detail)
                assert not arrived, f"publish {number} arrived although answered {detail}"
                answers["refused_503" if kind == "answer" else "transport"] += 1
        assert answers["delivered"] >= 300
        assert process.stderr_file.read_text() == ""
    finally:
        process.kill()
