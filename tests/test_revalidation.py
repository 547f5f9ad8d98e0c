"""Revalidation over real sockets: revoked or expired tokens lose their live connections,
and a database failure never disconnects anyone."""
from __future__ import annotations

import logging
import sqlite3
import time

import pytest
from sqlalchemy.engine import make_url

from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import receive_close, receive_event

PERIOD_S = 0.2


@pytest.mark.parametrize("action", ["revoke", "expire"])
def test_invalidated_token_closes_its_socket_with_1008(start_gateway, any_database_url, action):
    """A deleted or expired live token gets its socket closed with 1008 within a few periods; others stay."""
    gateway = start_gateway("-revalidate-period", "200ms", database_url=any_database_url)
    doomed_token = gateway.tokens.player(21)
    doomed = gateway.connect(doomed_token)
    survivor = gateway.connect(gateway.tokens.player(22))
    getattr(gateway.tokens, action)(doomed_token)
    started = time.monotonic()
    assert receive_close(doomed) == (1008, "token revoked or expired")
    assert time.monotonic() - started < 5 * PERIOD_S + 1.0
    wait_for(lambda: gateway.metric("ws_disconnects_total", code="1008") == 1, what="disconnect 1008 counted")
    assert not gateway.gateway.hub.is_connected("21")
    assert gateway.publish(gateway.tokens.server(), 22, "still-here").status == 200
    assert receive_event(survivor) == {"event": "still-here", "payload": None}
    assert gateway.gateway.hub.connection_count() == 1


def test_database_error_during_revalidation_keeps_connections(start_gateway, caplog):
    """While the database cannot answer, revalidation logs its failure and closes nobody."""
    caplog.set_level(logging.WARNING, logger="wsgateway")
    gateway = start_gateway("-revalidate-period", "200ms", "-db-timeout", "300ms")
    clients = {player_id: gateway.connect(gateway.tokens.player(player_id)) for player_id in (21, 22)}
    server = gateway.tokens.server()

    def failures() -> int:
        return sum(getattr(record, "event", "") == "revalidation_failed" for record in caplog.records)

    database_file = make_url(gateway.gateway.config.database_url).database
    lock = sqlite3.connect(database_file, isolation_level=None, timeout=TIMEOUT_S)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # no reader gets in: every revalidation query times out
        wait_for(lambda: failures() >= 2, what="two failed revalidations logged")
        assert gateway.gateway.hub.connection_count() == 2
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert gateway.metric("ws_disconnects_total", code="1008") == 0
    for player_id, client in clients.items():
        assert gateway.publish(server, player_id, "after the outage").status == 200
        assert receive_event(client) == {"event": "after the outage", "payload": None}
