"""SqlTokenStore against real databases: every test using `any_database_url` runs on sqlite
and on MariaDB. Rows are written the way an application backend writes them."""
from __future__ import annotations

import sqlite3
import time
import traceback
from datetime import datetime, timedelta, timezone
from typing import Iterator

import gevent
import pytest
from sqlalchemy import create_engine, event, inspect, make_url, text

from tests.support import TIMEOUT_S
from tests.support.gateways import TokenTable
from tests.support.processes import TcpForwarder
from wsgateway.errors import StoreUnavailable
from wsgateway import tokens as tokens_module
from wsgateway.tokens import REVALIDATION_BATCH, SqlTokenStore, utc_now


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def make_store(url: str, **options) -> SqlTokenStore:
    options.setdefault("db_timeout_s", TIMEOUT_S)
    options.setdefault("cache_period_s", 60.0)
    return SqlTokenStore(url, **options)


@pytest.fixture
def store(any_database_url) -> Iterator[SqlTokenStore]:
    """A store on an empty database with the schema created."""
    store = make_store(any_database_url)
    assert store.ensure_schema() is True
    yield store
    store.close()


@pytest.fixture
def table(any_database_url, store) -> Iterator[TokenTable]:
    table = TokenTable(any_database_url)
    yield table
    table.engine.dispose()


def insert_many(url: str, rows: list[dict]) -> None:
    """Insert many ws_token rows in one transaction; `ttl_s` in each row sets its expiry."""
    sqlite = url.startswith("sqlite")
    for row in rows:
        moment = utc_now() + timedelta(seconds=row.pop("ttl_s"))
        row["expires_at"] = moment.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else moment
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO ws_token (token, player_id, subject_id, is_server, expires_at) "
                "VALUES (:token, :player_id, :subject_id, :is_server, :expires_at)"), rows)
    finally:
        engine.dispose()


def record_statements(store: SqlTokenStore) -> list[tuple[str, int]]:
    """From now on, every statement the store sends about ws_token, with its parameter count."""
    statements: list[tuple[str, int]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if "ws_token" in statement:
            statements.append((statement, len(parameters)))

    event.listen(store.engine, "before_cursor_execute", record)
    return statements


# --- schema ---------------------------------------------------------------------------------
def test_ensure_schema_creates_table_and_index_once(any_database_url):
    """ensure_schema creates ws_token and its index when missing, then reports False when present."""
    store = make_store(any_database_url)
    try:
        assert store.ensure_schema() is True
        inspector = inspect(store.engine)
        assert inspector.has_table("ws_token")
        columns = {column["name"] for column in inspector.get_columns("ws_token")}
        assert columns == {"token", "player_id", "subject_id", "is_server", "expires_at"}
        assert inspector.get_pk_constraint("ws_token")["constrained_columns"] == ["token"]
        indexes = {index["name"]: index["column_names"] for index in inspector.get_indexes("ws_token")}
        assert indexes["idx_ws_token_server_exp"] == ["is_server", "expires_at"]
        assert store.ensure_schema() is False
        assert make_store(any_database_url).ensure_schema() is False  # another gateway starting later
    finally:
        store.close()


def test_ensure_schema_never_alters_an_existing_table(any_database_url):
    """An existing ws_token (here with an extra column) is left exactly as it is, rows included."""
    engine = create_engine(any_database_url)
    blob = "BLOB" if any_database_url.startswith("sqlite") else "VARBINARY(32)"
    with engine.begin() as connection:
        connection.execute(text(
            f"CREATE TABLE ws_token (token {blob} NOT NULL PRIMARY KEY, player_id INTEGER DEFAULT NULL, "
            f"subject_id {blob} NOT NULL, is_server BOOLEAN NOT NULL, expires_at DATETIME NOT NULL, "
            "note VARCHAR(40) DEFAULT 'kept')"))
    engine.dispose()
    table = TokenTable(any_database_url)
    token = table.player(7)
    store = make_store(any_database_url)
    try:
        assert store.ensure_schema() is False
        columns = {column["name"] for column in inspect(store.engine).get_columns("ws_token")}
        assert "note" in columns
        with store.engine.connect() as connection:
            assert connection.execute(text("SELECT note FROM ws_token")).scalars().all() == ["kept"]
        assert store.authenticate_player(token) == "7"
    finally:
        store.close()
        table.engine.dispose()


# --- player tokens ----------------------------------------------------------------------------
def test_valid_player_token_names_the_player(store, table):
    """A valid player token authenticates as its player_id, as a string."""
    token = table.player(21)
    assert store.authenticate_player(token) == "21"


def test_player_identity_falls_back_to_subject_id(store, table):
    """A player token without player_id is named by its subject_id, always a str."""
    token = table.player(None, subject_id="team-blue")
    identity = store.authenticate_player(token)
    assert identity == "team-blue" and type(identity) is str
    zero = table.player(0, subject_id="ignored")
    assert store.authenticate_player(zero) == "0"


def test_expired_player_token_is_refused(store, table):
    """A player token whose expires_at is past is refused."""
    assert store.authenticate_player(table.player(21, ttl_s=-1)) is None
    token = table.player(21)
    table.expire(token)
    assert store.authenticate_player(token) is None


def test_unknown_player_token_is_refused(store, table):
    """A token with no row is refused, as is an empty one."""
    table.player(21)
    assert store.authenticate_player("no-such-token") is None
    assert store.authenticate_player("") is None


def test_server_token_is_not_a_player_token(store, table):
    """A valid server token is refused where a player token is required."""
    assert store.authenticate_player(table.server("backend-1")) is None


def test_revoked_player_token_is_refused_at_once(store, table):
    """Player tokens are never cached: deleting the row refuses the token on the next call."""
    token = table.player(21)
    assert store.authenticate_player(token) == "21"
    table.revoke(token)
    assert store.authenticate_player(token) is None


def test_tokens_match_exactly(store, table):
    """Tokens match byte for byte: another case, or an added or missing space, is a different token."""
    table.player(21, token="AbCd-token")
    table.player(22, token="padded ")
    assert store.authenticate_player("AbCd-token") == "21"
    for near_miss in ("abcd-token", "ABCD-TOKEN", "AbCd-token ", " AbCd-token", "AbCd-toke", "padded"):
        assert store.authenticate_player(near_miss) is None, near_miss
    assert store.authenticate_player("padded ") == "22"
    assert store.valid_player_tokens(["abcd-token", "AbCd-token", "padded"]) == {"AbCd-token"}


# --- server tokens ------------------------------------------------------------------------------
def test_valid_server_token_names_the_subject(store, table):
    """A valid server token authenticates as its subject_id, as a string."""
    subject = store.authenticate_server(table.server("backend-1"))
    assert subject == "backend-1" and type(subject) is str


def test_expired_server_token_is_refused(store, table):
    """A server token whose expires_at is past is refused."""
    assert store.authenticate_server(table.server(ttl_s=-1)) is None


def test_player_token_is_not_a_server_token(store, table):
    """A valid player token is refused where a server token is required."""
    assert store.authenticate_server(table.player(21)) is None
    assert store.authenticate_server("no-such-token") is None


def test_server_token_is_cached_for_the_cache_period(any_database_url, table):
    """A revoked server token stays valid from the cache until cache_period_s has passed, then is rechecked."""
    clock = FakeClock()
    store = make_store(any_database_url, cache_period_s=30.0, monotonic=clock)
    try:
        token = table.server("backend-1")
        assert store.authenticate_server(token) == "backend-1"
        table.revoke(token)
        clock.advance(29.0)
        assert store.authenticate_server(token) == "backend-1"
        clock.advance(2.0)
        assert store.authenticate_server(token) is None
        assert store.authenticate_server(token) is None  # a refusal is not cached as valid either
    finally:
        store.close()


def test_server_token_is_never_cached_past_its_expiry(any_database_url, table):
    """A cached server token is valid only until its own expires_at, even within the cache period."""
    clock = FakeClock()
    started = utc_now()
    wall = {"now": started}
    store = make_store(any_database_url, cache_period_s=3600.0, monotonic=clock, now=lambda: wall["now"])
    try:
        token = table.server("backend-1", ttl_s=30)
        assert store.authenticate_server(token) == "backend-1"
        clock.advance(20.0)
        wall["now"] = started + timedelta(seconds=20)
        assert store.authenticate_server(token) == "backend-1"
        clock.advance(15.0)
        wall["now"] = started + timedelta(seconds=35)
        assert store.authenticate_server(token) is None
    finally:
        store.close()


# --- batch revalidation ---------------------------------------------------------------------
def test_valid_player_tokens_batches_many_tokens(any_database_url, store):
    """valid_player_tokens checks 1200 tokens in batches of 500 and keeps only valid player tokens."""
    rows, expected = [], set()
    for index in range(1200):
        token = f"tok-{index:05d}"
        kind = index % 10
        if kind == 0:
            rows.append({"token": token, "player_id": index, "subject_id": "s", "is_server": False, "ttl_s": -60})
        elif kind == 1:
            rows.append({"token": token, "player_id": None, "subject_id": "srv", "is_server": True, "ttl_s": 3600})
        elif kind == 2:
            continue  # unknown: no row at all
        else:
            rows.append({"token": token, "player_id": index, "subject_id": "s", "is_server": False, "ttl_s": 3600})
            expected.add(token)
    insert_many(any_database_url, rows)
    statements = record_statements(store)
    asked = [f"tok-{index:05d}" for index in range(1200)] + ["x" * 40, ""]
    valid = store.valid_player_tokens(asked)
    assert valid == expected
    assert len(valid) == 840
    assert len(statements) == 3
    forms = 2 if any_database_url.startswith("sqlite") else 1  # sqlite looks up text and blob forms
    # full batches, then the rest padded to a power of two (a few prepared statements, see _query)
    assert [parameters for _, parameters in statements] == [REVALIDATION_BATCH * forms] * 2 + [256 * forms]


def test_valid_player_tokens_of_nothing_is_empty(store):
    """valid_player_tokens of no tokens (or only impossible ones) is empty without a query."""
    statements = record_statements(store)
    assert store.valid_player_tokens([]) == set()
    assert store.valid_player_tokens(["y" * 33, ""]) == set()
    assert statements == []


# --- token forms -------------------------------------------------------------------------------
@pytest.mark.parametrize("token", ["x" * 33, "é" * 17, "t" * 1000])
def test_tokens_longer_than_32_bytes_are_refused_quietly(any_database_url, store, table, token):
    """A token longer than 32 bytes (UTF-8) cannot exist in the column: refused, no error, no query."""
    table.player(21, token="x" * 32)
    assert store.authenticate_player("x" * 32) == "21"
    statements = record_statements(store)
    assert store.authenticate_player(token) is None
    assert store.authenticate_server(token) is None
    assert statements == []
    assert store.valid_player_tokens([token, "x" * 32]) == {"x" * 32}
    assert [parameters for _, parameters in statements] == [2 if any_database_url.startswith("sqlite") else 1]


def sqlite_path(url: str) -> str:
    return url[len("sqlite:///"):]


def test_sqlite_finds_tokens_written_as_text_and_as_blob(sqlite_url):
    """On sqlite, a token (and subject) written as TEXT and one written as BLOB are both found."""
    store = make_store(sqlite_url)
    store.ensure_schema()
    expiry = (utc_now() + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S")
    with sqlite3.connect(sqlite_path(sqlite_url)) as raw:
        raw.execute("INSERT INTO ws_token VALUES (?, ?, ?, ?, ?)", ("text-token", None, "text-subject", 0, expiry))
        raw.execute("INSERT INTO ws_token VALUES (?, ?, ?, ?, ?)", (b"blob-token", None, b"blob-subject", 0, expiry))
        raw.execute("INSERT INTO ws_token VALUES (?, ?, ?, ?, ?)", (b"blob-server", None, b"blob-backend", 1, expiry))
        types = raw.execute("SELECT typeof(token) FROM ws_token ORDER BY rowid").fetchall()
    raw.close()
    assert types == [("text",), ("blob",), ("blob",)]
    try:
        assert store.authenticate_player("text-token") == "text-subject"
        assert store.authenticate_player("blob-token") == "blob-subject"
        assert store.authenticate_server("blob-server") == "blob-backend"
        assert store.valid_player_tokens(["text-token", "blob-token", "blob-server"]) == {"text-token", "blob-token"}
    finally:
        store.close()


@pytest.mark.parametrize("layout", [
    "%Y-%m-%d %H:%M:%S+00:00",  # Go's database/sql with mattn/go-sqlite3
    "%Y-%m-%d %H:%M:%S.123456789+00:00",  # the same with nanoseconds
    "%Y-%m-%dT%H:%M:%SZ",  # RFC 3339
    "%Y-%m-%d %H:%M:%S",  # naive UTC
])
def test_sqlite_understands_go_time_formats(sqlite_url, layout):
    """On sqlite, expires_at written in Go's layouts is read as UTC, for both unexpired and expired rows."""
    store = make_store(sqlite_url)
    store.ensure_schema()
    now = utc_now()
    with sqlite3.connect(sqlite_path(sqlite_url)) as raw:
        raw.execute("INSERT INTO ws_token VALUES ('future', 1, 's', 0, ?)", ((now + timedelta(hours=1)).strftime(layout),))
        raw.execute("INSERT INTO ws_token VALUES ('past', 2, 's', 0, ?)", ((now - timedelta(hours=1)).strftime(layout),))
    raw.close()
    try:
        assert store.authenticate_player("future") == "1"
        assert store.authenticate_player("past") is None
        assert store.valid_player_tokens(["future", "past"]) == {"future"}
    finally:
        store.close()


def test_sqlite_unreadable_expiry_is_refused(sqlite_url):
    """On sqlite, a row whose expires_at is not a time (garbage, empty) refuses its token without error."""
    store = make_store(sqlite_url)
    store.ensure_schema()
    with sqlite3.connect(sqlite_path(sqlite_url)) as raw:
        raw.execute("INSERT INTO ws_token VALUES ('garbage', 1, 's', 0, 'next tuesday')")
        raw.execute("INSERT INTO ws_token VALUES ('empty', 2, 's', 0, '')")
        raw.execute("INSERT INTO ws_token VALUES ('server', NULL, 's', 1, 'soon')")
    raw.close()
    try:
        assert store.authenticate_player("garbage") is None
        assert store.authenticate_player("empty") is None
        assert store.authenticate_server("server") is None
        assert store.valid_player_tokens(["garbage", "empty"]) == set()
    finally:
        store.close()


def test_sqlite_converts_other_offsets_to_utc(sqlite_url):
    """An expires_at with a non-UTC offset is compared in UTC."""
    store = make_store(sqlite_url)
    store.ensure_schema()
    plus_two = timezone(timedelta(hours=2))
    # 30 minutes from now, written as local time at +02:00: naive reading would add two hours
    soon = datetime.now(plus_two) + timedelta(minutes=30)
    late = datetime.now(timezone(timedelta(hours=-3))) - timedelta(minutes=30)
    with sqlite3.connect(sqlite_path(sqlite_url)) as raw:
        raw.execute("INSERT INTO ws_token VALUES ('soon', 1, 's', 0, ?)", (soon.strftime("%Y-%m-%d %H:%M:%S%z"),))
        raw.execute("INSERT INTO ws_token VALUES ('late', 2, 's', 0, ?)", (late.isoformat(sep=" "),))
    raw.close()
    clock = {"now": utc_now() + timedelta(minutes=45)}
    later = make_store(sqlite_url, now=lambda: clock["now"])
    try:
        assert store.authenticate_player("soon") == "1"
        assert later.authenticate_player("soon") is None  # 45 minutes on, it has expired in UTC
        assert store.authenticate_player("late") is None
    finally:
        store.close()
        later.close()


# --- reachability and failures ---------------------------------------------------------------
def test_store_is_reachable(store):
    """is_reachable is True when the database answers."""
    assert store.is_reachable() is True


def test_unreachable_database_raises_store_unavailable():
    """A store pointed at a closed port raises StoreUnavailable (nothing else) and is not reachable."""
    store = SqlTokenStore("mysql+pymysql://root@127.0.0.1:1/x", db_timeout_s=1, cache_period_s=60)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.authenticate_player("some-token")
        with pytest.raises(StoreUnavailable):
            store.authenticate_server("some-token")
        with pytest.raises(StoreUnavailable):
            store.valid_player_tokens(["some-token"])
        with pytest.raises(StoreUnavailable):
            store.ensure_schema()
        assert store.is_reachable() is False
        assert time.monotonic() - started < 5 * (2 * 1 + 1)  # each call gives up within its backstop
    finally:
        store.close()


def test_locked_sqlite_raises_store_unavailable_without_blocking_others(sqlite_url):
    """A sqlite file locked by another connection makes the store give up after db_timeout_s while other greenlets run."""
    setup = make_store(sqlite_url)
    setup.ensure_schema()
    setup.close()
    table = TokenTable(sqlite_url)
    token = table.player(21)
    table.engine.dispose()
    store = make_store(sqlite_url, db_timeout_s=0.5)
    locker = sqlite3.connect(sqlite_path(sqlite_url), isolation_level=None)
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            gevent.sleep(0.01)

    ticker = gevent.spawn(tick)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        gevent.sleep(0)
        started, ticks_before = time.monotonic(), ticks
        with pytest.raises(StoreUnavailable):
            store.authenticate_player(token)
        waited_s = time.monotonic() - started
        assert 0.45 <= waited_s < TIMEOUT_S
        assert ticks - ticks_before >= 10  # ~50 expected at 10 ms each: the wait did not block the hub
        assert store.is_reachable() is False  # readiness reads the table: locked means not ready
        locker.execute("ROLLBACK")
        assert store.authenticate_player(token) == "21"
    finally:
        ticker.kill()
        locker.close()
        store.close()


def test_database_error_never_quotes_the_token(sqlite_url):
    """A failed lookup's whole exception chain, as a logged traceback would show it, never contains the token."""
    store = make_store(sqlite_url)  # no schema: the query fails with "no such table"
    token = "f00d" * 8
    try:
        with pytest.raises(StoreUnavailable) as caught:
            store.authenticate_player(token)
        rendered = "".join(traceback.format_exception(caught.value))
        assert "no such table" in rendered and "[SQL: SELECT" in rendered
        assert token not in rendered
    finally:
        store.close()


def test_lookups_compile_once_whatever_the_batch_size(any_database_url, store, table):
    """Revalidating 1 to 40 tokens adds one compiled statement, not one per batch size (memory would grow)."""
    tokens = [table.player(index) for index in range(40)]
    store.authenticate_player(tokens[0])
    before = len(store.engine._compiled_cache)
    for size in range(1, 41):
        assert store.valid_player_tokens(tokens[:size]) == set(tokens[:size])
    assert len(store.engine._compiled_cache) - before <= 1


# --- refused tokens remembered, concurrent lookups coalesced ----------------------------------
def test_refused_token_costs_no_query_until_its_memory_ends(any_database_url, table):
    """An unknown token is refused again without a query; created later, it is accepted within the unknown-token TTL."""
    clock = FakeClock()
    store = make_store(any_database_url, cache_period_s=60.0, monotonic=clock)
    try:
        assert store.unknown_ttl_s == tokens_module.UNKNOWN_TOKEN_TTL_S
        statements = record_statements(store)
        assert store.authenticate_player("not-yet-created") is None
        assert len(statements) == 1
        table.player(21, token="not-yet-created")
        assert store.authenticate_player("not-yet-created") is None
        assert len(statements) == 1
        clock.advance(store.unknown_ttl_s + 0.001)
        assert store.authenticate_player("not-yet-created") == "21"
        assert store.authenticate_player("not-yet-created") == "21"  # a valid answer is never cached
        assert len(statements) == 3
    finally:
        store.close()


def test_extended_token_is_accepted_within_the_unknown_token_ttl(any_database_url, table):
    """An expired token refused once is accepted once the backend extends it and the TTL has passed."""
    clock = FakeClock()
    store = make_store(any_database_url, cache_period_s=60.0, monotonic=clock)
    try:
        token = table.player(21, ttl_s=-5)
        assert store.authenticate_player(token) is None
        table.revoke(token)
        table.player(21, token=token, ttl_s=3600)
        clock.advance(store.unknown_ttl_s + 0.001)
        assert store.authenticate_player(token) == "21"
    finally:
        store.close()


def test_unknown_token_memory_is_at_most_the_revalidation_period(any_database_url, table):
    """With a revalidation period shorter than UNKNOWN_TOKEN_TTL_S, refusals are remembered only that long."""
    clock = FakeClock()
    store = make_store(any_database_url, cache_period_s=2.0, monotonic=clock)
    try:
        assert store.authenticate_server("later") is None
        table.server("backend-1", token="later")
        clock.advance(2.001)
        assert store.authenticate_server("later") == "backend-1"
    finally:
        store.close()


def test_refusals_are_remembered_per_kind(store, table):
    """A server token refused on /ws is still accepted for publishing, and the other way round."""
    server = table.server("backend-1")
    player = table.player(21)
    assert store.authenticate_player(server) is None
    assert store.authenticate_server(server) == "backend-1"
    assert store.authenticate_server(player) is None
    assert store.authenticate_player(player) == "21"


def test_an_admin_store_remembers_no_refusal(any_database_url, table):
    """A store without a cache period (the operations commands' TokenAdmin) never remembers a refusal."""
    store = make_store(any_database_url, cache_period_s=0.0)
    try:
        assert store.authenticate_player("soon") is None
        table.player(21, token="soon")
        assert store.authenticate_player("soon") == "21"
    finally:
        store.close()


def test_tokens_with_a_lone_surrogate_are_refused_without_a_query(store):
    """A token with no UTF-8 form cannot be in the table: refused at once, and never breaks a coalesced batch."""
    statements = record_statements(store)
    assert store.authenticate_player("a\ud800") is None
    assert store.valid_player_tokens(["a\ud800"]) == set()
    assert statements == []


def test_concurrent_lookups_are_coalesced(any_database_url, store):
    """2,000 players authenticating at once are answered correctly by a few batched queries."""
    rows = [{"token": f"storm-{index:05d}", "player_id": index, "subject_id": "s", "is_server": False, "ttl_s": 600}
            for index in range(2000)]
    rows[7]["ttl_s"] = -60  # expired
    rows[8]["is_server"] = True  # not a player token
    insert_many(any_database_url, rows)
    statements = record_statements(store)
    asked = [f"storm-{index:05d}" for index in range(2000)] + ["storm-unknown", "storm-00001"]
    greenlets = [gevent.spawn(store.authenticate_player, token) for token in asked]
    gevent.joinall(greenlets, timeout=10 * TIMEOUT_S, raise_error=True)
    answers = [greenlet.value for greenlet in greenlets]
    expected = [str(index) for index in range(2000)] + [None, "1"]
    expected[7] = expected[8] = None
    assert answers == expected
    assert len(statements) <= 2000 // tokens_module.LOOKUP_BATCH + tokens_module.LOOKUPS_IN_FLIGHT + 2, statements
    assert max(count for _, count in statements) <= 2 * tokens_module.LOOKUP_BATCH  # sqlite: text and blob forms


def test_a_failing_batch_fails_its_callers_and_the_next_batch_recovers(sqlite_url, tmp_path):
    """A query that fails gives StoreUnavailable to every caller of that batch; later lookups work again."""
    store = make_store(sqlite_url)
    try:
        store.ensure_schema()
        table = TokenTable(sqlite_url)
        token = table.player(21)
        locker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
        locker.execute("DROP TABLE ws_token")
        greenlets = [gevent.spawn(store.authenticate_player, f"t{index}") for index in range(50)]
        gevent.joinall(greenlets, timeout=3 * TIMEOUT_S)
        assert all(isinstance(greenlet.exception, StoreUnavailable) for greenlet in greenlets)
        locker.close()
        store.ensure_schema()
        table.player(21, token=token)
        assert store.authenticate_player(token) == "21"
        table.engine.dispose()
    finally:
        store.close()


def test_lookups_prepare_a_few_statements_whatever_the_batch_size(any_database_url, store, table):
    """Revalidating 1 to 300 tokens sends the driver at most ten SQL texts (sqlite keeps each prepared, natively)."""
    from sqlalchemy import event

    tokens = [table.player(index) for index in range(300)]
    texts: set[str] = set()
    event.listen(store.engine, "before_cursor_execute",
                 lambda connection, cursor, statement, *rest: texts.add(statement))
    for size in range(1, 301):
        assert store.valid_player_tokens(tokens[:size]) == set(tokens[:size])
    assert 1 < len(texts) <= 10


# --- MariaDB round trips ------------------------------------------------------------------
@pytest.fixture
def relayed_mysql(mysql_url) -> Iterator[tuple[SqlTokenStore, TcpForwarder, TokenTable]]:
    """A store reading MariaDB through a relay that counts round trips and can hang up."""
    upstream = make_url(mysql_url)
    forwarder = TcpForwarder((upstream.host or "127.0.0.1", upstream.port or 3306))
    store = make_store(upstream.set(host="127.0.0.1", port=forwarder.port).render_as_string(hide_password=False))
    table = TokenTable(mysql_url)  # directly, not through the relay
    try:
        store.ensure_schema()
        yield store, forwarder, table
    finally:
        store.close()
        table.engine.dispose()
        forwarder.close()


def test_a_mysql_lookup_is_one_round_trip(relayed_mysql):
    """A lookup on a pooled connection is its query alone: no ping before it, no ROLLBACK after it.

    With both, a lookup took three round trips: on a database 0.2 s away, 0.6 s of a 1 s
    -db-timeout, and a reconnect storm's batches three times as long."""
    store, forwarder, table = relayed_mysql
    token = table.player(31)
    assert store.authenticate_player("warm-up-unknown") is None  # the pool holds a connection now
    before = forwarder.turns
    assert store.authenticate_player(token) == "31"
    assert store.valid_player_tokens([token]) == {token}
    assert forwarder.turns - before == 2


def test_a_mysql_lookup_sees_a_change_committed_after_the_previous_one(relayed_mysql):
    """Reading in autocommit, a pooled connection holds no old snapshot: a token added or
    revoked since the previous lookup on it is seen by the next one."""
    store, _, table = relayed_mysql
    first, second = table.player(32), table.player(33)
    assert store.valid_player_tokens([first, second]) == {first, second}
    table.revoke(first)
    third = table.player(34)
    assert store.valid_player_tokens([first, second, third]) == {second, third}


def test_a_mysql_connection_closed_by_the_server_is_replaced_without_an_error(relayed_mysql):
    """Every pooled connection hung up (a MariaDB restart, `wait_timeout`): the next lookup
    is answered, on a new connection, instead of failing once per dead connection."""
    store, forwarder, table = relayed_mysql
    token = table.player(35)
    assert store.authenticate_player(token) == "35"
    forwarder.cut()
    forwarder.restore()
    assert store.valid_player_tokens([token]) == {token}
    assert store.is_reachable() is True
