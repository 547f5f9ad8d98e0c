"""Who is who: player and server tokens from the `ws_token` table.

A token is valid only while its row exists, its `is_server` matches the use and its
`expires_at` (UTC) is in the future; echoCTF's ws-server forgets the expiry, we don't.
A player is named by `player_id` when it is set, else by `subject_id`; a server by its
`subject_id`; identities are always strings.

The store knows no HTTP. It raises `StoreUnavailable` when the database does not answer
within `db_timeout_s`, so callers can answer 503 instead of hanging, and its subclass
`StoreMisconfigured` when the database answers but refuses the settings (access denied,
unknown database, an sqlite file that cannot be opened, a table without our columns).

Lookups at connect time are coalesced (`coalescing.Coalescer`): the tokens asked for
while a query is in flight go together into the next `IN (...)` query, so a reconnect
storm of thousands of players costs tens of queries, not thousands queued behind the
connection pool. A token found invalid (unknown, expired, of the other kind) is
remembered as such, as a keyed digest, for `unknown_ttl_s` (the smaller of
UNKNOWN_TOKEN_TTL_S and the revalidation period): a client that retries a bad token
costs no query, and a token created, or extended, after it was refused is accepted
within that time.

A sqlite file replaced at its path (a restored backup, a deploy renaming a new file into
place) is followed: before each query the path's inode is compared with that of the file
the pool opened, and on a change the pool is disposed, so the next query reads the new
file and the refusals remembered from the old one are forgotten. A path that has gone
(and no file at it) is StoreUnavailable, never a new, empty file.

An sqlite file is created only on a connection's first use (never when the store is
built), readable and writable by its owner only (0600): it holds bearer tokens. SQLite
gives its -journal and -wal files the mode of the database file.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterable, Protocol, TypeVar

import gevent
from gevent.threadpool import ThreadPool
from sqlalchemy import bindparam, create_engine, event, inspect, make_url, text
from sqlalchemy import types as sqltypes
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.sql.elements import TextClause

from wsgateway.coalescing import Coalescer
from wsgateway.errors import StoreMisconfigured, StoreUnavailable
from wsgateway.recent_tokens import RecentTokens

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 32  # the column is VARBINARY(32): a longer token cannot exist
REVALIDATION_BATCH = 500  # tokens per IN (...) query
SERVER_CACHE_LIMIT = 10_000  # server tokens remembered at once
LOOKUP_BATCH = 500  # tokens per coalesced connect-time query
LOOKUPS_IN_FLIGHT = 1  # coalesced queries running at once; the next batch gathers meanwhile
UNKNOWN_TOKEN_TTL_S = 10.0  # longest a refused token is remembered as invalid
UNKNOWN_TOKENS_KEPT = 50_000  # refused tokens remembered at once (oldest forgotten first)

MYSQL_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS ws_token (
    token       VARBINARY(32) NOT NULL PRIMARY KEY,
    player_id   INTEGER(10) UNSIGNED DEFAULT NULL,
    subject_id  VARBINARY(32) NOT NULL,
    is_server   BOOLEAN NOT NULL,
    expires_at  DATETIME(6) NOT NULL
)""",
    "CREATE INDEX idx_ws_token_server_exp ON ws_token (is_server, expires_at)",
)
# SQLite rejects `INTEGER(10) UNSIGNED`; these are the same columns and index. BLOB keeps
# bytes and text exactly as written, like VARBINARY (VARBINARY would get NUMERIC affinity).
SQLITE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS ws_token (
    token       BLOB NOT NULL PRIMARY KEY,
    player_id   INTEGER DEFAULT NULL CHECK (player_id >= 0),
    subject_id  BLOB NOT NULL,
    is_server   BOOLEAN NOT NULL,
    expires_at  DATETIME NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS idx_ws_token_server_exp ON ws_token (is_server, expires_at)",
)
_MYSQL_DUPLICATE_KEY_NAME = 1061

_TOKEN_ROWS = text("SELECT token, player_id, subject_id, is_server, expires_at FROM ws_token WHERE token IN :tokens"
                   ).bindparams(bindparam("tokens", expanding=True))
# What the gateway reads from each column, as SQLAlchemy reflects the declared type.
# sqlite stores any value in any column, so there only NullType (no declared type) and
# text dates are accepted besides these. `_Binary` is the base of every binary type
# (BINARY, VARBINARY, the BLOBs); the test of the Go original's table fails if it moves.
_EXPECTED_COLUMNS: dict[str, tuple[tuple[type, ...], str]] = {
    "token": ((sqltypes.String, sqltypes._Binary), "VARBINARY(32) or another string type"),
    "player_id": ((sqltypes.Integer,), "an integer type"),
    "subject_id": ((sqltypes.String, sqltypes._Binary), "VARBINARY(32) or another string type"),
    "is_server": ((sqltypes.Integer, sqltypes.Boolean), "BOOLEAN or an integer type"),
    "expires_at": ((sqltypes.DateTime,), "DATETIME or TIMESTAMP"),
}
# The server answered and refused: wrong credentials or database name, no grant. Retrying
# cannot help, so at start these are configuration errors. (1044 no access to the
# database, 1045 access denied, 1049 unknown database, 1142 command denied on a table,
# 1698 access denied without a password.)
_MYSQL_REFUSALS = frozenset({1044, 1045, 1049, 1142, 1698})


def schema_problems(connection: Connection, *, sqlite: bool) -> list[str]:
    """What is wrong with an existing `ws_token` table, one line per column: a column the
    gateway reads that is missing, or declared with a type it cannot read."""
    declared = {column["name"].lower(): column["type"] for column in inspect(connection).get_columns("ws_token")}
    found: list[str] = []
    for name, (families, wanted) in _EXPECTED_COLUMNS.items():
        column_type = declared.get(name)
        if column_type is None:
            found.append(f"table ws_token has no column {name} (expected {wanted})")
            continue
        if isinstance(column_type, families):
            continue
        if sqlite and (isinstance(column_type, sqltypes.NullType)
                       or (name == "expires_at" and isinstance(column_type, sqltypes.String))):
            continue
        found.append(f"table ws_token: column {name} is {column_type}, expected {wanted}")
    return found


def _open_sqlite_privately(engine: Engine, path: str, *, create: bool) -> None:
    """Before every new connection: create a missing file empty with mode 0600 (sqlite3
    would create it 0644 under the usual umask), or refuse when `create` is False."""
    @event.listens_for(engine, "do_connect")
    def before_connect(*_: object) -> None:
        if os.path.exists(path):
            return
        if not create:
            raise StoreMisconfigured(f"sqlite file {path!r} does not exist "
                                     "(ws-gateway db init, or the gateway's first start, creates it)")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:  # another process created it meanwhile
            pass
        except OSError as exc:
            raise StoreMisconfigured(f"sqlite file {path!r} cannot be created: "
                                     f"{_missing_directory(path) or exc.strerror or exc}") from None


def _missing_directory(path: str) -> str | None:
    """Why a file cannot be at `path` when it is its directory's fault, else None."""
    directory = os.path.dirname(os.path.abspath(path))
    return None if os.path.isdir(directory) else f"directory {directory!r} does not exist"


def _store_error(exc: SQLAlchemyError, path: str | None) -> StoreUnavailable:
    """`StoreMisconfigured` when the database refused the settings, else `StoreUnavailable`."""
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    if path is not None and isinstance(cause, sqlite3.DatabaseError):
        detail = str(cause)
        if "unable to open database file" in detail:
            reason = "it is a directory" if os.path.isdir(path) else _missing_directory(path) or detail
            return StoreMisconfigured(f"sqlite file {path!r} cannot be opened: {reason}")
        if "file is not a database" in detail:
            return StoreMisconfigured(f"sqlite file {path!r} is not an sqlite database")
    if isinstance(exc, DBAPIError) and _mysql_error_code(exc) in _MYSQL_REFUSALS:
        return StoreMisconfigured(f"the database refuses these settings: {_describe(exc)}")
    return StoreUnavailable(_describe(exc))

_VALID_PLAYER_TOKENS = text("SELECT token, expires_at FROM ws_token WHERE is_server = 0 AND token IN :tokens"
                            ).bindparams(bindparam("tokens", expanding=True))


def utc_now() -> datetime:
    """Naive UTC now, the form `expires_at` is stored in."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class TokenStore(Protocol):
    """Authenticates tokens. Every method may block its greenlet (never the process)
    for at most the store's timeout, then raises `StoreUnavailable`."""

    def authenticate_player(self, token: str) -> str | None:
        """The player id of a valid player token, else None. A valid answer is never
        cached; a refusal may be, for at most the revalidation period."""

    def authenticate_server(self, token: str) -> str | None:
        """The subject id of a valid server token, else None. May be cached for at
        most the revalidation period, and never past the token's expiry; so may a refusal."""

    def valid_player_tokens(self, tokens: Iterable[str]) -> set[str]:
        """The subset of `tokens` that are still valid player tokens (batched queries)."""

    def is_reachable(self) -> bool:
        """Whether the database answers now."""

    def close(self) -> None:
        """Release database connections."""


@dataclass(frozen=True)
class _CachedServer:
    subject_id: str
    valid_until: float  # time.monotonic() seconds


T = TypeVar("T")


class SqlTokenStore:
    """`TokenStore` on SQLAlchemy: MySQL/MariaDB through PyMySQL or an embedded sqlite file.

    PyMySQL is pure Python, so its socket I/O is cooperative under gevent. sqlite3 calls
    block in C (a locked file can wait seconds), so they run in a small thread pool and
    the other greenlets keep going.
    """

    def __init__(self, database_url: str, *, db_timeout_s: float, cache_period_s: float,
                 now: Callable[[], datetime] = utc_now,
                 monotonic: Callable[[], float] = time.monotonic, create_file: bool = True) -> None:
        """`create_file=False`: a missing sqlite file is `StoreMisconfigured` instead of
        being created (commands that only read or change rows must not leave one behind)."""
        self._is_sqlite = database_url.startswith("sqlite")
        self._db_timeout_s = db_timeout_s
        self._cache_period_s = cache_period_s
        self._now = now
        self._monotonic = monotonic
        self._server_cache: dict[str, _CachedServer] = {}
        self.unknown_ttl_s = min(UNKNOWN_TOKEN_TTL_S, cache_period_s)
        self._refused = RecentTokens(self.unknown_ttl_s, UNKNOWN_TOKENS_KEPT, monotonic)  # "kind:token"
        self._threads = ThreadPool(4) if self._is_sqlite else None
        self.engine = _create_engine(database_url, db_timeout_s)
        self._sqlite_path = _sqlite_path(database_url) if self._is_sqlite else None
        self._sqlite_file: tuple[int, int] | None = None  # (st_dev, st_ino) the pool reads; None: not yet seen
        # A caller waits for the query in flight, then for its own: each bounded by db_timeout_s.
        self._rows = Coalescer(self._fetch_rows, max_batch=LOOKUP_BATCH, max_in_flight=LOOKUPS_IN_FLIGHT,
                               wait_s=2 * db_timeout_s, timed_out=lambda: StoreUnavailable("database timed out"))
        if self._sqlite_path is not None:
            _open_sqlite_privately(self.engine, self._sqlite_path, create=create_file)

    @property
    def sqlite_path(self) -> str | None:
        """The sqlite file this store reads (absolute), or None for MySQL."""
        return self._sqlite_path

    # --- schema -----------------------------------------------------------------
    def ensure_schema(self) -> bool:
        """Create `ws_token` and its index when the table is missing; never alter one.

        Returns True when it created the table; raises `StoreMisconfigured` naming what is
        wrong when an existing table lacks a column the gateway reads (`schema_problems`)."""
        def create() -> bool:
            with self.engine.begin() as connection:
                if inspect(connection).has_table("ws_token"):
                    found = schema_problems(connection, sqlite=self._is_sqlite)
                    if found:
                        raise StoreMisconfigured("; ".join(found))
                    return False
                for statement in SQLITE_SCHEMA if self._is_sqlite else MYSQL_SCHEMA:
                    try:
                        connection.execute(text(statement))
                    except DBAPIError as exc:  # another gateway created it first
                        if _mysql_error_code(exc) != _MYSQL_DUPLICATE_KEY_NAME:
                            raise
                return True
        return self._run(create)

    def table_problems(self) -> list[str] | None:
        """What `schema_problems` finds in the existing `ws_token` table (empty: it is
        ours), or None when there is no such table. Creates nothing."""
        def check() -> list[str] | None:
            with self.engine.connect() as connection:
                if not inspect(connection).has_table("ws_token"):
                    return None
                return schema_problems(connection, sqlite=self._is_sqlite)
        return self._run(check)

    # --- TokenStore ---------------------------------------------------------------
    def authenticate_player(self, token: str) -> str | None:
        refused = "player:" + token
        if refused in self._refused:
            return None
        row = self._lookup(token)
        if row is None or row.is_server or not self._unexpired(row.expires_at):
            self._refused.add(refused)
            return None
        if row.player_id is not None:
            return str(row.player_id)
        return _as_text(row.subject_id)

    def authenticate_server(self, token: str) -> str | None:
        cached = self._server_cache.get(token)
        if cached is not None:
            if cached.valid_until > self._monotonic():
                return cached.subject_id
            del self._server_cache[token]
        refused = "server:" + token
        if refused in self._refused:
            return None
        row = self._lookup(token)
        expires_at = _as_datetime(row.expires_at) if row is not None else None
        now = self._now()
        if row is None or not row.is_server or expires_at is None or expires_at <= now:
            self._refused.add(refused)
            return None
        subject_id = _as_text(row.subject_id)
        lifetime_s = min(self._cache_period_s, (expires_at - now).total_seconds())
        if len(self._server_cache) >= SERVER_CACHE_LIMIT:
            self._server_cache.clear()
        self._server_cache[token] = _CachedServer(subject_id, self._monotonic() + lifetime_s)
        return subject_id

    def valid_player_tokens(self, tokens: Iterable[str]) -> set[str]:
        wanted = [token for token in set(tokens) if _storable(token)]
        valid: set[str] = set()
        for start in range(0, len(wanted), REVALIDATION_BATCH):
            batch = wanted[start:start + REVALIDATION_BATCH]
            for row in self._query(_VALID_PLAYER_TOKENS, batch):
                if self._unexpired(row.expires_at):
                    valid.add(_as_text(row.token))
        return valid

    def is_reachable(self) -> bool:
        try:
            # Reading the table, not just "SELECT 1": a locked sqlite file or a missing
            # table must make the gateway not ready, as they make logins fail.
            self._run(lambda: self._execute_scalar("SELECT 1 FROM ws_token LIMIT 1"))
        except StoreUnavailable:
            return False
        return True

    def close(self) -> None:
        self.engine.dispose()
        if self._threads is not None:
            self._threads.kill()

    # --- internals ----------------------------------------------------------------
    def _lookup(self, token: str):  # -> Row | None
        if not _storable(token):
            return None
        return self._rows.get(token)

    def _fetch_rows(self, tokens: list[str]) -> dict[str, object]:
        """The rows of `tokens` (one query), by token as asked for."""
        wanted = set(tokens)
        rows: dict[str, object] = {}
        for row in self._query(_TOKEN_ROWS, tokens):
            token = _as_text(row.token)
            if token in wanted:
                rows.setdefault(token, row)
        return rows

    def _query(self, statement: TextClause, tokens: list[str]) -> list:
        """Run `statement`, whose `:tokens` is an expanding IN list, for `tokens`.

        In MySQL a VARBINARY compares equal to the same text; in sqlite a BLOB never equals
        TEXT, and existing sqlite files hold either, so both forms are looked up there.
        The statement is compiled once whatever the list's length: with one bound parameter
        per token, every batch size was a new entry in SQLAlchemy's compiled cache (500
        entries of up to 1,000 parameters each), memory that grew with every revalidation.

        The list is padded (repeating its last value, which IN ignores) to a power of two or a full batch:
        each length is a different SQL text to the driver, and Python's sqlite3 keeps up to
        128 prepared statements per connection, about 96 KiB each at 1,000 parameters, in
        sqlite's own memory. One per length was the soak's native growth of 1.5-5 MiB per
        round (Python's heap flat); padded, a connection prepares at most eleven."""
        forms = 2 if self._is_sqlite else 1
        values: list[object] = list(tokens)
        if self._is_sqlite:
            values += [token.encode("utf-8") for token in tokens]
        values += values[-1:] * (_padded_length(len(values), REVALIDATION_BATCH * forms) - len(values))

        def run() -> list:
            with self.engine.connect() as connection:
                return list(connection.execute(statement, {"tokens": values}))
        return self._run(run)

    def _execute_scalar(self, sql: str) -> object:
        with self.engine.connect() as connection:
            return connection.execute(text(sql)).scalar()

    def _follow_replaced_file(self) -> None:
        """Dispose the pool when the sqlite path now names another file than it opened."""
        if self._sqlite_path is None:
            return
        try:
            status = os.stat(self._sqlite_path)
        except FileNotFoundError:
            if self._sqlite_file is not None:  # connecting would create an empty file there
                raise StoreUnavailable("database error: the sqlite token file is gone") from None
            return
        except OSError as exc:
            raise StoreUnavailable(f"database error: cannot stat the sqlite token file: {exc.strerror}") from None
        current = (status.st_dev, status.st_ino)
        if current == self._sqlite_file:
            return
        if self._sqlite_file is not None:
            log.warning("sqlite token file replaced: reading the new one",
                        extra={"event": "token_file_replaced"})
            self.engine.dispose()
            self._server_cache.clear()
            self._refused = RecentTokens(self.unknown_ttl_s, UNKNOWN_TOKENS_KEPT, self._monotonic)
        self._sqlite_file = current

    def _run(self, work: Callable[[], T]) -> T:
        """Run database work with a deadline; in the thread pool for sqlite."""
        self._follow_replaced_file()
        try:
            if self._threads is None:
                # One deadline for the whole call, the retry included: the retry and its
                # reconnect would otherwise each get PyMySQL's full timeout. SQLAlchemy
                # invalidates a connection interrupted by it, so no half-read reply is reused.
                with gevent.Timeout(self._db_timeout_s):
                    return _retried_once_if_disconnected(work)
            # The thread hands back its exception instead of raising it there, where gevent
            # would print it to stderr; it is re-raised here, in the waiting greenlet.
            outcome = self._threads.spawn(_capture, work).get(timeout=self._db_timeout_s)
            if isinstance(outcome, _Raised):
                raise outcome.error
            return outcome
        except gevent.Timeout:
            raise StoreUnavailable("database timed out") from None
        except SQLAlchemyError as exc:
            raise _store_error(exc, self._sqlite_path) from exc

    def _unexpired(self, expires_at: object) -> bool:
        moment = _as_datetime(expires_at)
        return moment is not None and moment > self._now()


def _padded_length(length: int, most: int) -> int:
    """The power of two at or above `length`, but no more than `most` (a full batch)."""
    return max(length, min(most, 1 << max(0, length - 1).bit_length()))


class _Raised:
    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _capture(work: Callable[[], T]) -> T | _Raised:
    try:
        return work()
    except Exception as exc:  # re-raised by SqlTokenStore._run in the caller's greenlet
        return _Raised(exc)


def _retried_once_if_disconnected(work: Callable[[], T]) -> T:
    """`work()`, run a second time when the first found its pooled connection dead.

    MySQL connections are not pinged when taken from the pool (a round trip before every
    query); a connection the server closed meanwhile (a restart, `wait_timeout`) fails its
    query at once instead, SQLAlchemy invalidates the pool's connections as of that moment,
    and the second run gets a new one. Safe: lookups only read."""
    try:
        return work()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    return work()


def _create_engine(database_url: str, db_timeout_s: float) -> Engine:
    # hide_parameters: SQLAlchemy's error messages otherwise quote the bound parameters,
    # which are tokens; a traceback logged anywhere would carry them.
    if database_url.startswith("sqlite"):
        # A fresh sqlite3 connection per query: cheap, and no pool state shared across threads.
        return create_engine(database_url, pool_size=4, max_overflow=0, hide_parameters=True,
                             connect_args={"timeout": db_timeout_s, "check_same_thread": False})
    timeout = max(1, int(round(db_timeout_s)))
    # One round trip per lookup: in autocommit a SELECT opens no transaction, so returning
    # the connection to the pool needs no ROLLBACK (and a lookup never reads an old
    # snapshot), and there is no ping before it (see `_retried_once_if_disconnected`).
    # With a ping and a rollback a lookup took three: on a database 0.2 s away, 0.6 s of
    # a 1 s -db-timeout. Writes that must be one transaction ask for it (`admin`).
    return create_engine(
        database_url,
        hide_parameters=True,
        isolation_level="AUTOCOMMIT",
        skip_autocommit_rollback=True,
        pool_recycle=1800,  # below MySQL's default wait_timeout of 8 hours, and proxies'
        pool_size=10,
        max_overflow=20,
        pool_timeout=db_timeout_s,
        connect_args={"connect_timeout": timeout, "read_timeout": timeout, "write_timeout": timeout,
                      "autocommit": True},  # as the server starts a session: no SET at connect
    )


def _sqlite_path(database_url: str) -> str | None:
    """The file a sqlite URL names, or None for an in-memory database."""
    path = make_url(database_url).database
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return os.path.abspath(path)


def _storable(token: str) -> bool:
    """Whether `token` could be in the table: UTF-8 (no lone surrogate) of 1-32 bytes.
    A token that is not is refused without a query; in a coalesced batch it would fail
    the whole batch's encoding."""
    try:
        size = len(token.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    return 0 < size <= MAX_TOKEN_BYTES


def _as_text(value: object) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _as_datetime(value: object) -> datetime | None:
    """`expires_at` as naive UTC; MySQL returns datetimes, sqlite whatever text was stored."""
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(_as_text(value).strip())
        except ValueError:
            return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def _describe(exc: SQLAlchemyError) -> str:
    """One line about a database failure, in the driver's words (never the URL)."""
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    detail = str(cause).splitlines()[0] if str(cause) else ""
    return f"database error: {type(cause).__name__}" + (f": {detail}" if detail else "")


def _mysql_error_code(exc: DBAPIError) -> int | None:
    args = getattr(exc.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None
