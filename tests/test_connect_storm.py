"""A connect storm on a real gateway, on sqlite and on MariaDB: 2,000 players opening
their connections at once are all admitted, and their token lookups are coalesced
into a few batched queries (counted with SQLAlchemy's events on the gateway's own
engine) instead of one query each queued behind the connection pool."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from gevent.pool import Pool
from sqlalchemy import event, text

from tests.support import TIMEOUT_S, wait_for
from tests.support.frames import RawClient
from tests.support.gateways import GatewayUnderTest
from wsgateway import tokens as tokens_module
from wsgateway.tokens import utc_now

PLAYERS = 2000
CONCURRENT_CONNECTS = 500  # handshakes in progress at once from the test's side


def add_players(gateway: GatewayUnderTest, count: int, prefix: str = "storm-token") -> list[str]:
    moment = utc_now() + timedelta(hours=1)
    expires_at = moment.strftime("%Y-%m-%d %H:%M:%S.%f") if gateway.tokens._sqlite else moment  # noqa: SLF001
    rows = [{"token": f"{prefix}-{index:06d}", "player_id": index + 1, "subject_id": "s", "is_server": False,
             "expires_at": expires_at} for index in range(count)]
    with gateway.tokens.engine.begin() as connection:
        connection.execute(text("INSERT INTO ws_token (token, player_id, subject_id, is_server, expires_at) "
                                "VALUES (:token, :player_id, :subject_id, :is_server, :expires_at)"), rows)
    return [row["token"] for row in rows]


def open_websocket(gateway: GatewayUnderTest, token: str, sockets: list[socket.socket]) -> int:
    """The status of a raw /ws upgrade; an accepted socket is kept open in `sockets`."""
    client = RawClient(gateway.host, gateway.port, f"/ws?token={token}", timeout_s=3 * TIMEOUT_S)
    if client.status == 101:
        sockets.append(client.sock)
    else:
        client.sock.close()
    return client.status


def test_connect_storm_is_admitted_with_few_queries(start_gateway, any_database_url):
    """2,000 players connecting at once are all admitted (none refused 503), with far fewer queries than connects."""
    gateway = start_gateway("-max-conns", "0", database_url=any_database_url)
    tokens = add_players(gateway, PLAYERS)
    queries: list[str] = []

    def count(conn, cursor, statement, *args):
        if "ws_token" in statement:
            queries.append(statement)
    event.listen(gateway.gateway.store.engine, "before_cursor_execute", count)
    sockets: list[socket.socket] = []
    try:
        pool = Pool(CONCURRENT_CONNECTS)
        statuses = pool.map(lambda token: open_websocket(gateway, token, sockets), tokens)
        refused = {status: statuses.count(status) for status in set(statuses) if status != 101}
        assert refused == {}
        wait_for(lambda: gateway.metric("ws_active_connections") == PLAYERS, timeout_s=3 * TIMEOUT_S,
                 what="every player registered")
        lookups = [statement for statement in queries if "IN" in statement]
        # Measured: 140-170 queries on both databases (a batch per query time); a quarter
        # leaves room for a loaded machine, and one per connect would be 2,000.
        assert len(lookups) <= PLAYERS // 4, len(lookups)
        assert len(lookups) >= PLAYERS // tokens_module.LOOKUP_BATCH
    finally:
        event.remove(gateway.gateway.store.engine, "before_cursor_execute", count)
        for sock in sockets:
            sock.close()
    wait_for(lambda: gateway.metric("ws_active_connections") == 0, timeout_s=3 * TIMEOUT_S, what="all closed")



RUSH_PLAYERS = 8000
RUSH_DB_TIMEOUT = "0.5s"  # the lookups' deadline, shortened as a machine ten times busier would


def test_a_rush_on_mariadb_waits_its_turn_instead_of_timing_out(start_gateway, mysql_url):
    """8,000 players connecting within a second from another process, a short -db-timeout: all admitted, none 503.

    Serving the whole rush takes several times -db-timeout; without the admission queue
    every connect was accepted and read at once, the lookups in flight waited behind that
    work, and 500-5,200 of the 8,000 were refused 503 "token store unavailable" (3 runs
    of 3)."""
    gateway = start_gateway("-max-conns", "0", "-db-timeout", RUSH_DB_TIMEOUT, database_url=mysql_url)
    tokens = add_players(gateway, RUSH_PLAYERS, prefix="rush-token")
    finished = subprocess.run([sys.executable, "-m", "tests.support.rush_client", str(gateway.port),
                               str(6 * TIMEOUT_S), *tokens], capture_output=True, text=True, timeout=10 * TIMEOUT_S,
                              cwd=Path(__file__).resolve().parents[1])
    statuses = json.loads(finished.stdout)["statuses"]
    assert statuses == {"101": RUSH_PLAYERS}, finished.stderr
    assert gateway.metric("ws_connections_rejected_total", reason="store_unavailable") == 0
    wait_for(lambda: gateway.metric("ws_active_connections") == 0, timeout_s=3 * TIMEOUT_S, what="all closed")
