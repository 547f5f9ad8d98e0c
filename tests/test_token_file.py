"""A sqlite token file replaced while the gateway runs (a restored backup, a deploy that
renames a new file into place): the gateway reads the file that is at the path now.
Tokens only the old file had stop connecting and their sockets are closed at the next
revalidation; tokens only the new file has connect; /readyz tells whether the file at
the path can serve, and a path left empty is never filled with a new, empty file."""
from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import websocket

from tests.support import wait_for
from tests.support.clients import receive_close, receive_event
from tests.support.gateways import GatewayUnderTest, TokenTable


def db_path(gateway: GatewayUnderTest) -> Path:
    return Path(gateway.gateway.config.database_url.removeprefix("sqlite:///"))


def ws_status(gateway: GatewayUnderTest, token: str) -> int:
    try:
        gateway.connect(token)
    except websocket.WebSocketBadStatusException as refusal:
        return refusal.status_code
    return 101


@pytest.fixture
def replaced(start_gateway, tmp_path):
    """A gateway on a sqlite file, and a way to put another file at its path with os.replace."""
    gateway = start_gateway("-revalidate-period", "300ms")
    path = db_path(gateway)

    def replace_with(prepare) -> None:
        staged = tmp_path / "staged.db"
        shutil.copy(path, staged)
        table = TokenTable(f"sqlite:///{staged}")
        prepare(table)
        table.engine.dispose()
        os.replace(staged, path)
    return gateway, replace_with


def test_replaced_file_is_read_at_once_and_removed_tokens_are_closed(replaced):
    """After os.replace: a removed token gets 401 and its socket 1008, a new one connects, a kept one stays."""
    gateway, replace_with = replaced
    tokens = gateway.tokens
    removed_connected = tokens.player(21, token="removed-connected")
    removed = tokens.player(22, token="removed-idle")
    kept = tokens.player(23, token="kept")
    server = tokens.server(token="server-kept")
    removed_client = gateway.connect(removed_connected)
    kept_client = gateway.connect(kept)
    assert ws_status(gateway, "arrives-later") == 401  # refused once: remembered as unknown

    def new_file(table: TokenTable) -> None:
        table.revoke(removed_connected)
        table.revoke(removed)
        table.player(24, token="arrives-later")
        table.player(25, token="only-in-new")
    replace_with(new_file)

    assert ws_status(gateway, removed) == 401
    assert ws_status(gateway, "only-in-new") == 101
    assert ws_status(gateway, "arrives-later") == 101  # what the old file refused is forgotten
    assert receive_close(removed_client)[0] == 1008  # the next revalidation reads the new file
    assert gateway.publish(server, 23, "still-here").status == 200
    assert receive_event(kept_client) == {"event": "still-here", "payload": None}
    assert gateway.get("/readyz").status == 200


def test_readyz_follows_the_file_at_the_path(replaced, tmp_path):
    """A file without the table, or no file, is not ready (503) and never created; a good file back is ready."""
    gateway, replace_with = replaced
    path = db_path(gateway)
    token = gateway.tokens.player(21, token="survivor")
    backup = tmp_path / "backup.db"
    shutil.copy(path, backup)
    assert gateway.get("/readyz").status == 200

    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    os.replace(empty, path)
    reply = gateway.get("/readyz")
    assert (reply.status, reply.json["database"]) == (503, "unreachable")
    assert ws_status(gateway, token) == 503

    os.remove(path)
    assert gateway.get("/readyz").status == 503
    assert ws_status(gateway, token) == 503
    assert not path.exists()

    os.replace(backup, path)
    wait_for(lambda: gateway.get("/readyz").status == 200, what="ready again")
    assert ws_status(gateway, token) == 101
