"""wsgateway.admin: schema creation, adding, revoking and listing tokens, on sqlite and MariaDB,
read back by the gateway's own TokenStore."""
from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from tests.support.gateways import TokenTable
from wsgateway.admin import TOKEN_CHARS, TokenAdmin, _new_token, masked
from wsgateway.errors import StoreUnavailable
from wsgateway.tokens import SqlTokenStore, utc_now


@pytest.fixture
def admin(any_database_url):
    """A TokenAdmin on a fresh database (sqlite, then MariaDB) whose schema exists."""
    tool = TokenAdmin(any_database_url, db_timeout_s=5)
    tool.init_schema()
    yield tool
    tool.close()


@pytest.fixture
def store(any_database_url):
    """The gateway's token store on the same database."""
    token_store = SqlTokenStore(any_database_url, db_timeout_s=5, cache_period_s=0)
    yield token_store
    token_store.close()


def test_init_schema_is_idempotent_and_never_touches_an_existing_table(any_database_url):
    """init_schema creates ws_token once; run again it leaves the table and its rows alone."""
    admin = TokenAdmin(any_database_url, db_timeout_s=5)
    try:
        assert admin.init_schema() is True
        token = admin.add(player="21", ttl_s=60)
        assert admin.init_schema() is False
        assert [row.token for row in admin.list_tokens()] == [token]
    finally:
        admin.close()


def test_added_tokens_authenticate_at_the_gateway(admin, store):
    """A player token (numeric id or name) and a server token added here authenticate in the TokenStore."""
    player = admin.add(player="21", ttl_s=3600)
    named = admin.add(player="alice", ttl_s=3600)
    server = admin.add(server="backend-1", ttl_s=3600)
    assert store.authenticate_player(player) == "21"
    assert store.authenticate_player(named) == "alice"
    assert store.authenticate_server(server) == "backend-1"
    assert store.authenticate_player(server) is None and store.authenticate_server(player) is None


def test_tokens_are_random_url_safe_and_never_start_with_a_dash():
    """Generated tokens are 32 URL-safe characters, all different, and never look like an option."""
    tokens = [_new_token() for _ in range(3000)]
    assert len(set(tokens)) == len(tokens)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{%d}" % TOKEN_CHARS, token) for token in tokens)
    assert not any(token.startswith("-") for token in tokens)


def test_ttl_sets_the_expiry(any_database_url):
    """expires_at is now + ttl (UTC); list reports expired tokens as expired."""
    moment = datetime(2030, 1, 1, 12, 0, 0)
    admin = TokenAdmin(any_database_url, db_timeout_s=5, now=lambda: moment)
    try:
        admin.init_schema()
        admin.add(server="backend-1", ttl_s=86400)
        admin.add(player="21", ttl_s=90)
        rows = admin.list_tokens()
        assert [(row.kind, row.identity, row.expires_at) for row in rows] == [
            ("server", "backend-1", moment + timedelta(days=1)), ("player", "21", moment + timedelta(seconds=90))]
        later = moment + timedelta(minutes=2)
        assert [row.expired(later) for row in rows] == [False, True]
    finally:
        admin.close()


def test_list_reads_rows_written_by_the_application(admin, any_database_url):
    """Rows inserted by another writer (text tokens, a player with a subject) are listed and filtered by kind."""
    table = TokenTable(any_database_url)
    written = table.player(7, subject_id="p7", token="application-written-token")
    table.server("scoreboard", token="server-written-token")
    table.engine.dispose()
    players = admin.list_tokens("player")
    assert [(row.token, row.player_id, row.subject_id, row.identity) for row in players] == [
        (written, 7, "p7", "7")]
    assert [row.identity for row in admin.list_tokens("server")] == ["scoreboard"]


def test_revoke_returns_the_row_and_then_nothing(admin, store):
    """revoke deletes the token and returns what it was; a second revoke finds nothing."""
    token = admin.add(player="21", ttl_s=3600)
    other = admin.add(player="22", ttl_s=3600)
    row = admin.revoke(token)
    assert row is not None and (row.kind, row.identity) == ("player", "21")
    assert admin.revoke(token) is None
    assert store.authenticate_player(token) is None
    assert store.authenticate_player(other) == "22"


def test_revoke_finds_a_token_stored_as_bytes_in_sqlite(sqlite_url):
    """In sqlite a token written as a BLOB (as Go's driver writes it) is found and revoked."""
    admin = TokenAdmin(sqlite_url, db_timeout_s=5)
    try:
        admin.init_schema()
        with admin._store.engine.begin() as connection:
            connection.execute(text("INSERT INTO ws_token VALUES (:token, 21, :subject, 0, :expires)"),
                               {"token": b"blob-token", "subject": b"p21",
                                "expires": (utc_now() + timedelta(hours=1)).isoformat(" ")})
        assert [row.token for row in admin.list_tokens()] == ["blob-token"]
        assert admin.revoke("blob-token") is not None
        assert admin.list_tokens() == []
    finally:
        admin.close()


@pytest.mark.parametrize("arguments, option", [
    ({"ttl_s": 60}, "--player or --server"),
    ({"ttl_s": 60, "player": "1", "server": "s"}, "--player or --server"),
    ({"ttl_s": 0, "player": "1"}, "--ttl"),
    ({"ttl_s": 60, "player": str(2**32)}, "--player"),
    ({"ttl_s": 60, "player": "n" * 33}, "--player"),
    ({"ttl_s": 60, "server": "s" * 33}, "--server"),
    ({"ttl_s": 60, "server": " "}, "--server"),
    ({"ttl_s": 60, "player": "21", "subject": "é" * 17}, "--subject"),
], ids=["neither", "both", "zero-ttl", "player-id-too-large", "player-name-too-long", "server-too-long",
        "blank-server", "subject-over-32-bytes"])
def test_bad_input_is_refused_naming_the_option(admin, arguments, option):
    """Refused input raises ValueError naming the option, and stores nothing."""
    with pytest.raises(ValueError, match=re.escape(option)):
        admin.add(**arguments)
    assert admin.list_tokens() == []


def test_unreachable_database_raises_store_unavailable():
    """A database that cannot be reached raises StoreUnavailable with the driver's reason."""
    admin = TokenAdmin("mysql+pymysql://root@127.0.0.1:1/x", db_timeout_s=1)
    try:
        with pytest.raises(StoreUnavailable, match="Can't connect"):
            admin.list_tokens()
    finally:
        admin.close()


def test_missing_table_says_how_to_create_it(any_database_url):
    """Without the table, the error says to run `ws-gateway db init`."""
    admin = TokenAdmin(any_database_url, db_timeout_s=5)
    try:
        with pytest.raises(StoreUnavailable, match="ws-gateway db init"):
            admin.add(player="21", ttl_s=60)
    finally:
        admin.close()


def test_masked_shows_only_a_prefix():
    """masked() shows the first 4 characters and an ellipsis."""
    assert masked("abcdefghijklmnop") == "abcd…"
