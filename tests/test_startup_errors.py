"""bin/ws-gateway refusing to start, as an operator meets it: one line on stderr naming the
problem, exit 2 for what only a configuration change can fix (systemd does not restart
it: RestartPreventExitStatus=2), exit 1 for a server that does not answer, and nothing left
behind (no sqlite file created by a gateway that could not start)."""
from __future__ import annotations

import configparser
import http.client
import os
import socket
import sqlite3
import stat
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import MYSQL_SERVER_URL
from tests.support import TIMEOUT_S, wait_for
from tests.support.processes import GatewayProcess, free_port, run_gateway_cli

PROJECT = Path(__file__).resolve().parent.parent


def refused(tmp_path: Path, *args: str, status: int = 2) -> str:
    """Run bin/ws-gateway with args (on a free port); return its only stderr line."""
    result = run_gateway_cli("-addr", f"127.0.0.1:{free_port()}", "-db-timeout", "2s", *args, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("ws-gateway: ")
    return lines[0]


def test_systemd_unit_does_not_restart_exit_2():
    """The unit's "do not restart" status is the one configuration errors exit with."""
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(PROJECT / "etc" / "ws-gateway.service")
    assert unit["Service"]["RestartPreventExitStatus"] == "2"


# --- a ws_token table that is not ours ---------------------------------------------------------
def _sqlite_table(path: Path, columns: str) -> str:
    with sqlite3.connect(path) as connection:
        connection.execute(f"CREATE TABLE ws_token ({columns})")
    return f"file:{path}"


def test_sqlite_table_without_a_column_refuses_to_start(tmp_path):
    """A ws_token table lacking expires_at: exit 2 naming the column, instead of serving 503 forever."""
    dsn = _sqlite_table(tmp_path / "tokens.db", "token BLOB PRIMARY KEY, player_id INTEGER, "
                                                "subject_id BLOB, is_server BOOLEAN")
    line = refused(tmp_path, "-dsn", dsn)
    assert line == "ws-gateway: -dsn: table ws_token has no column expires_at (expected DATETIME or TIMESTAMP)"


@pytest.fixture
def mysql_database() -> str:
    """An empty MariaDB database of this test's own, dropped afterwards; its name."""
    name = f"wsgw_start_{uuid.uuid4().hex[:10]}"
    server = create_engine(MYSQL_SERVER_URL, isolation_level="AUTOCOMMIT")
    with server.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    yield name
    with server.connect() as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
    server.dispose()


def _mysql(name: str, statement: str) -> None:
    engine = create_engine(f"{MYSQL_SERVER_URL}/{name}")
    with engine.begin() as connection:
        connection.execute(text(statement))
    engine.dispose()


def test_mysql_table_without_columns_refuses_to_start(tmp_path, mysql_database):
    """MariaDB: a ws_token table without subject_id and with an integer expires_at is refused, naming both."""
    _mysql(mysql_database, "CREATE TABLE ws_token (token VARBINARY(32) PRIMARY KEY, "
                           "player_id INT UNSIGNED, is_server BOOLEAN, expires_at INT)")
    line = refused(tmp_path, "-db", "mysql", "-dsn", f"root@tcp(127.0.0.1:3306)/{mysql_database}")
    assert "table ws_token has no column subject_id" in line
    assert "column expires_at is INTEGER, expected DATETIME or TIMESTAMP" in line


def test_mysql_table_of_the_go_original_starts(tmp_path, mysql_database):
    """The Go original's table, as echoCTF creates it, passes the check and the gateway serves."""
    _mysql(mysql_database, "CREATE TABLE ws_token (token VARBINARY(32) NOT NULL PRIMARY KEY, "
                           "player_id INTEGER(10) UNSIGNED DEFAULT NULL, subject_id VARBINARY(32) NOT NULL, "
                           "is_server BOOLEAN NOT NULL, expires_at DATETIME NOT NULL)")
    process = GatewayProcess(tmp_path, "-db", "mysql", "-dsn", f"root@tcp(127.0.0.1:3306)/{mysql_database}")
    try:
        process.wait_ready()
    finally:
        process.kill()


# --- MariaDB refusing, or not answering --------------------------------------------------------
def test_access_denied_is_a_configuration_error(tmp_path):
    """A wrong MariaDB password: exit 2 (not restarted), the server's own words."""
    line = refused(tmp_path, "-db", "mysql", "-dsn", "root:wrong-password@tcp(127.0.0.1:3306)/test")
    assert "Access denied" in line and line.startswith("ws-gateway: -dsn: ")
    assert "wrong-password" not in line


def test_unknown_database_is_a_configuration_error(tmp_path):
    """A database name MariaDB does not have: exit 2."""
    line = refused(tmp_path, "-db", "mysql", "-dsn", "root@tcp(127.0.0.1:3306)/wsgw_no_such_database")
    assert "Unknown database 'wsgw_no_such_database'" in line


def test_server_not_answering_is_exit_1(tmp_path):
    """Nothing listening where MariaDB should be: exit 1, which systemd retries."""
    line = refused(tmp_path, "-db", "mysql", "-dsn", f"root@tcp(127.0.0.1:{free_port()})/test", status=1)
    assert "database unreachable" in line


# --- sqlite files ------------------------------------------------------------------------------
def test_sqlite_file_in_a_missing_directory_names_the_path(tmp_path):
    """-dsn in a directory that does not exist: exit 2 naming the file and the directory."""
    path = tmp_path / "absent" / "tokens.db"
    line = refused(tmp_path, "-dsn", f"file:{path}")
    assert line == (f"ws-gateway: -dsn: sqlite file {str(path)!r} cannot be created: "
                    f"directory {str(path.parent)!r} does not exist")


def test_sqlite_path_that_is_a_directory_names_the_path(tmp_path):
    """-dsn naming a directory: exit 2 naming it."""
    line = refused(tmp_path, "-dsn", f"file:{tmp_path}")
    assert line == f"ws-gateway: -dsn: sqlite file {str(tmp_path)!r} cannot be opened: it is a directory"


def test_sqlite_path_that_is_no_database_names_the_path(tmp_path):
    """-dsn naming a file that is not sqlite: exit 2 naming it, and the file is left as it was."""
    path = tmp_path / "notes.txt"
    path.write_text("not a database\n" * 100)
    line = refused(tmp_path, "-dsn", f"file:{path}")
    assert line == f"ws-gateway: -dsn: sqlite file {str(path)!r} is not an sqlite database"
    assert path.read_text() == "not a database\n" * 100


# --- a taken port ------------------------------------------------------------------------------
def test_taken_port_is_one_line_and_creates_no_database(tmp_path):
    """The address is bound before the database is touched: one line naming it once, no ws_tokens.db."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_gateway_cli("-addr", f"127.0.0.1:{port}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"ws-gateway: -addr: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert list(tmp_path.iterdir()) == []


# --- commands never create an sqlite file ------------------------------------------------------
@pytest.mark.parametrize("command", [["token", "list"], ["token", "revoke", "abc"],
                                     ["token", "add", "--player", "21", "--ttl", "1h"]],
                         ids=["list", "revoke", "add"])
def test_token_commands_on_a_missing_file_create_nothing(tmp_path, command):
    """token list/revoke/add on a path that does not exist: exit 2 naming it, and no empty database appears."""
    path = tmp_path / "typo.db"
    result = run_gateway_cli(*command, "-dsn", f"file:{path}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"ws-gateway {' '.join(command[:2])}: sqlite file {str(path)!r} does not exist "
                             "(ws-gateway db init, or the gateway's first start, creates it)\n")
    assert list(tmp_path.iterdir()) == []


# --- the token file is private -----------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sqlite_file_and_its_wal_are_created_0600(tmp_path):
    """ws_tokens.db (db init or the gateway's first start) is 0600 under a 022 umask, and so are -wal and -shm."""
    previous = os.umask(0o022)
    try:
        assert run_gateway_cli("db", "init", "-dsn", f"file:{tmp_path / 'init.db'}", cwd=tmp_path).returncode == 0
        assert _mode(tmp_path / "init.db") == 0o600
        process = GatewayProcess(tmp_path)  # creates tokens.db at its first start
        try:
            process.wait_ready()
            assert _mode(process.db_path) == 0o600
            with sqlite3.connect(process.db_path) as connection:  # WAL: the mode is kept in the file
                connection.execute("PRAGMA journal_mode=WAL")
        finally:
            process.kill()
        process = GatewayProcess(tmp_path)
        try:
            process.wait_ready()
            connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=TIMEOUT_S)
            connection.request("GET", "/readyz")  # the gateway reads the table: its connection opens the WAL
            assert connection.getresponse().status == 200
            connection.close()
            wait_for(lambda: Path(f"{process.db_path}-wal").exists(), what="the gateway's -wal file")
            assert _mode(Path(f"{process.db_path}-wal")) == 0o600
            assert _mode(Path(f"{process.db_path}-shm")) == 0o600
        finally:
            process.kill()
    finally:
        os.umask(previous)
