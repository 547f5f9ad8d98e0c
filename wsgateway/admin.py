"""The token table as an operator sees it: create the schema, add, revoke and list tokens.

What `ws-gateway db ...` and `ws-gateway token ...` run, on the same database and with
the same schema and decoding as the gateway (`tokens.SqlTokenStore`), so a token added
here authenticates there exactly as one written by the application backend.

Tokens are random (`secrets.token_urlsafe`), 32 characters (the column holds at most 32
bytes), and never start with `-`, so one can always be passed as a command-line word.
Nothing here prints or logs a token: callers decide what to show.

Database trouble raises `StoreUnavailable` (`StoreMisconfigured` when the database refuses
the settings, or the table or sqlite file is missing); an input we refuse raises
`ValueError` naming the option.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Iterator, TypeVar

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from wsgateway.errors import StoreMisconfigured, StoreUnavailable
from wsgateway.tokens import MAX_TOKEN_BYTES, SqlTokenStore, _as_datetime, _as_text, _store_error, utc_now

TOKEN_CHARS = 32  # token_urlsafe(24): 192 random bits in 32 URL-safe characters
MAX_PLAYER_ID = 2**32 - 1  # player_id is INTEGER(10) UNSIGNED
SQLITE_DATETIME = "%Y-%m-%d %H:%M:%S.%f"  # how expires_at is written as sqlite text
_MYSQL_NO_SUCH_TABLE = 1146

T = TypeVar("T")


@dataclass(frozen=True)
class TokenRow:
    """One row of `ws_token`, decoded."""

    token: str
    is_server: bool
    player_id: int | None
    subject_id: str
    expires_at: datetime | None  # naive UTC; None when the stored text is no date

    @property
    def kind(self) -> str:
        return "server" if self.is_server else "player"

    @property
    def identity(self) -> str:
        """Who the gateway takes the holder for: the player id when set, else the subject."""
        return str(self.player_id) if self.player_id is not None else self.subject_id

    def expired(self, now: datetime) -> bool:
        return self.expires_at is None or self.expires_at <= now


def masked(token: str) -> str:
    """A token shown without giving it away: its first 4 characters."""
    return token[:4] + "…"


class TokenAdmin:
    """Operations on `ws_token` for one database. `close()` when done."""

    def __init__(self, database_url: str, *, db_timeout_s: float,
                 now: Callable[[], datetime] = utc_now, create_file: bool = True) -> None:
        """`create_file=False`: a missing sqlite file is refused (`StoreMisconfigured`)
        instead of created, so that `token list` on a mistyped path leaves nothing behind."""
        self._store = SqlTokenStore(database_url, db_timeout_s=db_timeout_s, cache_period_s=0.0,
                                    create_file=create_file)
        self._is_sqlite = database_url.startswith("sqlite")
        self._now = now

    def close(self) -> None:
        self._store.close()

    def init_schema(self) -> bool:
        """Create `ws_token` and its index unless the table exists (idempotent; an
        existing table is never altered). True when it created the table."""
        return self._store.ensure_schema()

    def add(self, *, ttl_s: float, player: str | None = None, server: str | None = None,
            subject: str | None = None) -> str:
        """Store a new random token and return it. `player`: a numeric player id (stored
        in `player_id`) or a name (stored in `subject_id`); `server`: the server's
        subject. `subject` overrides the stored `subject_id` of a numeric player."""
        if (player is None) == (server is None):
            raise ValueError("give exactly one of --player or --server")
        if ttl_s <= 0:
            raise ValueError("--ttl: must be longer than zero")
        player_id: int | None = None
        if server is not None:
            subject_id = _subject("--server", server)
        else:
            assert player is not None
            if player.isdigit():
                player_id = int(player)
                if player_id > MAX_PLAYER_ID:
                    raise ValueError(f"--player: {player} is larger than {MAX_PLAYER_ID}")
                subject_id = _subject("--subject", subject if subject is not None else player)
            else:
                subject_id = _subject("--player", player)
        token = _new_token()
        expires_at = self._now() + timedelta(seconds=ttl_s)

        def insert(connection: Connection) -> None:
            connection.execute(text(
                "INSERT INTO ws_token (token, player_id, subject_id, is_server, expires_at) "
                "VALUES (:token, :player_id, :subject_id, :is_server, :expires_at)"),
                {"token": token, "player_id": player_id, "subject_id": subject_id,
                 "is_server": server is not None,
                 "expires_at": expires_at.strftime(SQLITE_DATETIME) if self._is_sqlite else expires_at})
        self._run(insert)
        return token

    def revoke(self, token: str) -> TokenRow | None:
        """Delete `token`; the row it had, or None when there was no such token. Live
        sockets holding it are closed by the gateway's next revalidation (1008)."""
        def delete(connection: Connection) -> TokenRow | None:
            forms = self._stored_forms(token)
            rows = list(self._select(connection, "WHERE token IN :forms", forms=forms))
            if rows:
                connection.execute(text("DELETE FROM ws_token WHERE token IN :forms").bindparams(
                    bindparam("forms", expanding=True)), {"forms": forms})
            return rows[0] if rows else None
        return self._run(delete)

    def list_tokens(self, kind: str | None = None) -> list[TokenRow]:
        """Every token (or every `kind` = "player"/"server" token), servers first, then
        by expiry."""
        where = "" if kind is None else "WHERE is_server = :is_server"
        params = {} if kind is None else {"is_server": kind == "server"}
        return self._run(lambda connection: list(self._select(connection, where, **params)))

    def now(self) -> datetime:
        return self._now()

    # --- internals ----------------------------------------------------------------
    def _stored_forms(self, token: str) -> list[object]:
        """sqlite keeps a token as TEXT or BLOB, whichever its writer used; MySQL's
        VARBINARY compares equal to the text."""
        return [token, token.encode("utf-8")] if self._is_sqlite else [token]

    def _select(self, connection: Connection, where: str, **params: object) -> Iterator[TokenRow]:
        statement = text("SELECT token, player_id, subject_id, is_server, expires_at FROM ws_token "
                         f"{where} ORDER BY is_server DESC, expires_at")
        if "forms" in params:
            statement = statement.bindparams(bindparam("forms", expanding=True))
        for row in connection.execute(statement, params):
            yield TokenRow(token=_as_text(row.token), is_server=bool(row.is_server),
                           player_id=None if row.player_id is None else int(row.player_id),
                           subject_id=_as_text(row.subject_id), expires_at=_as_datetime(row.expires_at))

    def _run(self, work: Callable[[Connection], T]) -> T:
        try:
            with self._store.engine.connect() as connection:
                if not self._is_sqlite:  # the store reads in autocommit; a change is one transaction
                    connection.execution_options(isolation_level="REPEATABLE READ")
                with connection.begin():
                    return work(connection)
        except DBAPIError as exc:
            error = _store_error(exc, self._store.sqlite_path)
            cause = exc.orig
            if "no such table" in str(cause) or getattr(cause, "args", (None,))[:1] == (_MYSQL_NO_SUCH_TABLE,):
                error = StoreMisconfigured(f"{error} (create it with: ws-gateway db init)")
            raise error from exc
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"database error: {exc}") from exc


def _subject(option: str, value: str) -> str:
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{option}: not valid UTF-8") from None
    if not value.strip() or size > MAX_TOKEN_BYTES:
        raise ValueError(f"{option}: must be 1 to {MAX_TOKEN_BYTES} bytes, not {size}")
    return value


def _new_token() -> str:
    while True:
        token = secrets.token_urlsafe(TOKEN_CHARS * 3 // 4)
        if not token.startswith("-"):
            assert len(token.encode()) <= MAX_TOKEN_BYTES
            return token
