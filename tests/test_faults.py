"""Faults a gateway meets in production: the database going away (MariaDB down or
partitioned, a locked sqlite file), clients that vanish without a word, and SIGTERM
while publishes are in flight. The gateway must keep what it can, answer the rest
clearly, and recover by itself."""
from __future__ import annotations

import http.client
import json
import random
import signal
import socket
import sqlite3
import struct
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import gevent
import pytest
import websocket
from sqlalchemy.engine import make_url

from tests.helpers import (TIMEOUT_S, GatewayProcess, GatewayUnderTest, RawClient, TcpForwarder, TokenTable,
                           receive_event, wait_for)

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
