"""`ws-gateway checkconfig`, run as bin/ws-gateway: the effective settings one per line
(passwords masked), every problem on its own stderr line, the database's table and Redis
checked for real, and nothing created."""
from __future__ import annotations

import sqlite3
import subprocess

from tests.support.processes import free_port, run_gateway_cli
from tests.support.redis_server import REDIS_URL
from wsgateway.config import FLAGS


def checkconfig(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return run_gateway_cli("checkconfig", "-db-timeout", "2s", *args, cwd=tmp_path)


def settings_printed(stdout: str) -> dict[str, str]:
    lines = [line for line in stdout.splitlines() if not line.startswith("#")]
    pairs = [line.split(" =", 1) for line in lines]
    assert [name for name, _ in pairs] == [flag.name for flag in FLAGS]
    return {name: value.strip() for name, value in pairs}


def test_defaults_on_a_fresh_directory_pass_and_create_nothing(tmp_path):
    """Default settings: exit 0, every flag printed once in gateway.ini syntax, no sqlite file created."""
    result = checkconfig(tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    printed = settings_printed(result.stdout)
    assert printed["addr"] == ":8080" and printed["db-timeout"] == "2s" and printed["dsn"] == \
        "file:ws_tokens.db?cache=shared"
    assert f"# database: sqlite file {str(tmp_path / 'ws_tokens.db')!r} does not exist yet; the gateway " \
           "creates it at start" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_every_bad_setting_is_one_line(tmp_path):
    """Three bad settings from flag, variable and file: exit 2, three lines, each naming its setting."""
    config_file = tmp_path / "gateway.ini"
    config_file.write_text("[gateway]\nmax-queued = many\n")
    result = run_gateway_cli("checkconfig", "-c", str(config_file), "-offline-ttl", "10x", cwd=tmp_path,
                             env={**__import__("os").environ, "WS_GATEWAY_MAX_CONNS": "-1"})
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert [line.split(": ")[1] for line in lines] == ["-max-conns", "-max-queued", "-offline-ttl"], lines
    assert all(line.startswith("ws-gateway checkconfig: ") for line in lines)
    assert settings_printed(result.stdout)["max-queued"] == "many"


def test_unknown_flag_is_one_line(tmp_path):
    """A misspelled flag stops checkconfig as it stops the gateway: exit 2, one line."""
    result = checkconfig(tmp_path, "-max-queue", "5")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "ws-gateway checkconfig: -max-queue: no such flag (did you mean -max-queued?)\n"


def test_mysql_password_is_masked_and_refusal_is_exit_2(tmp_path):
    """A wrong MariaDB password: shown as ***, never in clear; Access denied is a configuration error (2)."""
    result = checkconfig(tmp_path, "-db", "mysql", "-dsn", "root:s3cret-pw@tcp(127.0.0.1:3306)/test")
    assert result.returncode == 2
    assert settings_printed(result.stdout)["dsn"] == "root:***@tcp(127.0.0.1:3306)/test"
    assert "s3cret-pw" not in result.stdout + result.stderr
    assert "Access denied" in result.stderr and len(result.stderr.splitlines()) == 1


def test_mysql_table_without_a_column_is_named(tmp_path, mysql_url):
    """MariaDB with a ws_token lacking player_id: exit 2 naming the column."""
    from sqlalchemy import create_engine, text

    engine = create_engine(mysql_url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS ws_token"))
        connection.execute(text("CREATE TABLE ws_token (token VARBINARY(32) PRIMARY KEY, subject_id VARBINARY(32), "
                                "is_server BOOLEAN, expires_at DATETIME)"))
    try:
        result = checkconfig(tmp_path, "-db", "mysql", "-dsn", mysql_url)
    finally:
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE ws_token"))
        engine.dispose()
    assert result.returncode == 2
    assert result.stderr == ("ws-gateway checkconfig: -dsn: table ws_token has no column player_id "
                             "(expected an integer type)\n")


def test_sqlite_table_and_redis_that_answer_pass(tmp_path):
    """An sqlite file made by db init (0600) and the real Redis: exit 0 with a note for each."""
    dsn = f"file:{tmp_path / 'tokens.db'}"
    assert run_gateway_cli("db", "init", "-dsn", dsn, cwd=tmp_path).returncode == 0
    result = checkconfig(tmp_path, "-dsn", dsn, "-broker", REDIS_URL)
    assert (result.returncode, result.stderr) == (0, "")
    assert "# database: ok (sqlite); table ws_token has the expected columns" in result.stdout
    assert "# broker: ok (redis " in result.stdout


def test_world_readable_sqlite_file_is_a_problem(tmp_path):
    """A token file every local user can read is reported (it holds bearer tokens)."""
    path = tmp_path / "tokens.db"
    assert run_gateway_cli("db", "init", "-dsn", f"file:{path}", cwd=tmp_path).returncode == 0
    path.chmod(0o644)
    result = checkconfig(tmp_path, "-dsn", f"file:{path}")
    assert result.returncode == 2
    assert "is readable by every local user: chmod 600 it" in result.stderr


def test_redis_that_does_not_answer_is_exit_1(tmp_path):
    """-broker pointing where nothing listens: exit 1 (not a configuration error), one line, password masked."""
    result = checkconfig(tmp_path, "-broker", f"redis://:pw-123@127.0.0.1:{free_port()}/0")
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and "-broker: redis unreachable at redis://:***@" in result.stderr
    assert "pw-123" not in result.stdout + result.stderr


def test_sqlite_table_of_another_shape_is_named(tmp_path):
    """sqlite: a ws_token without is_server is refused by name."""
    path = tmp_path / "tokens.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE ws_token (token BLOB, player_id INTEGER, subject_id BLOB, expires_at DATETIME)")
    path.chmod(0o600)
    result = checkconfig(tmp_path, "-dsn", f"file:{path}")
    assert result.returncode == 2
    assert "-dsn: table ws_token has no column is_server" in result.stderr
