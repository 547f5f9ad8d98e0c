"""bin/ws-gateway on the command line: refused settings, unusable database or address, where
settings come from, and --help."""
from __future__ import annotations

import http.client
import re
import socket
import subprocess
import sys

import pytest
import websocket

from tests.support import TIMEOUT_S, wait_for
from tests.support.gateways import TokenTable
from tests.support.processes import (GATEWAY_BIN, PROCESS_START_TIMEOUT_S, GatewayProcess, free_port,
    gateway_environment, run_gateway_cli)


def one_line(stderr: str) -> str:
    """The only line of `stderr`; fails when there are more, or a traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("args, setting", [
    (["-db", "pg"], "-db"),
    (["-db", "mysql", "-dsn", "garbage"], "-dsn"),
    (["-offline-ttl", "10x"], "-offline-ttl"),
    (["-max-conns", "-1"], "-max-conns"),
    (["-rate-limit", "abc"], "-rate-limit"),
    (["-c", "/nonexistent/gateway.ini"], "-c"),
    (["-no-such-flag", "1"], "-no-such-flag"),
    (["-max-queue", "5"], "-max-queue"),
    (["-max-con", "5"], "-max-con"),
    (["-c", "/bin/ls"], "-c"),
], ids=["db", "dsn", "offline-ttl", "max-conns", "rate-limit", "config-file", "unknown-flag",
        "prefix-of-max-queued", "prefix-of-max-conns", "binary-config-file"])
def test_bad_setting_exits_2_with_one_line_naming_it(tmp_path, args, setting):
    """A refused setting exits with status 2 and exactly one stderr line that names it."""
    result = run_gateway_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert re.search(rf"(?<![\w-]){re.escape(setting)}(?![\w-])", line), line
    assert line.startswith("ws-gateway: ")


def test_unknown_key_in_config_file_exits_2(tmp_path):
    """A config file with a key that is no setting exits 2 with one line naming the key."""
    config_file = tmp_path / "gateway.ini"
    config_file.write_text("[gateway]\nmax-conns = 3\nmax-connz = 4\n")
    result = run_gateway_cli("-c", str(config_file), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "max-connz" in one_line(result.stderr)


def test_unreachable_database_at_start_exits_with_one_line(tmp_path):
    """A database that cannot be reached at start: non-zero exit, one clear line, no traceback."""
    result = run_gateway_cli("-addr", f"127.0.0.1:{free_port()}", "-db", "mysql",
                             "-dsn", "root@tcp(127.0.0.1:1)/x", "-db-timeout", "1s", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "database unreachable" in one_line(result.stderr)
    assert "Traceback" not in result.stdout


def test_unreachable_redis_cluster_at_start_exits_with_one_line(tmp_path):
    """A Redis Cluster none of whose seeds answers: exit 1, one line naming -broker, no traceback."""
    result = run_gateway_cli("-addr", f"127.0.0.1:{free_port()}", "-dsn", f"file:{tmp_path / 'tokens.db'}",
                             "-broker", f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}",
                             "-db-timeout", "1s", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "-broker: redis unreachable at start" in one_line(result.stderr)
    assert "Traceback" not in result.stderr


def test_address_in_use_exits_with_one_line(tmp_path):
    """A listen address already taken: non-zero exit and one line naming -addr."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_gateway_cli("-addr", f"127.0.0.1:{port}", "-dsn", f"file:{tmp_path / 'tokens.db'}",
                                 cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    line = one_line(result.stderr)
    assert "-addr" in line and "in use" in line, line


def test_address_let_go_of_soon_after_start_is_waited_for(tmp_path):
    """A gateway started while the process it replaces still holds the address (a restart) waits until the address is free, then serves, instead of exiting."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, str(GATEWAY_BIN), "-addr", f"127.0.0.1:{port}", "-dsn", f"file:{tmp_path / 'tokens.db'}"],
        cwd=tmp_path, env=gateway_environment(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=0.5)  # still waiting for the address, not exited
        holder.close()
        answer: list[int] = []

        def healthy() -> bool:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
            try:
                connection.request("GET", "/healthz")
                answer.append(connection.getresponse().status)
                return True
            except OSError:
                return False
            finally:
                connection.close()
        wait_for(healthy, PROCESS_START_TIMEOUT_S, what="ws-gateway answering /healthz")
        assert answer == [200]
    finally:
        holder.close()
        process.terminate()
        process.wait(timeout=PROCESS_START_TIMEOUT_S)


def test_flag_beats_environment_beats_config_file(tmp_path):
    """Precedence on a running gateway: flag over WS_GATEWAY_* over the config file over defaults."""
    file_port, env_port = free_port(), free_port()
    config_file = tmp_path / "gateway.ini"
    config_file.write_text(f"[gateway]\naddr = 127.0.0.1:{file_port}\nmax-conns = 1\n"
                           "origins = https://game.example\n")
    environment = gateway_environment(WS_GATEWAY_ADDR=f"127.0.0.1:{env_port}", WS_GATEWAY_MAX_CONNS="2")
    process = GatewayProcess(tmp_path, "-c", str(config_file), env=environment)  # -addr given as a flag
    clients = []
    try:
        process.wait_ready()  # on the flag's port
        for port in (file_port, env_port):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        table = TokenTable(process.database_url)
        url = f"{process.ws_url}?token={table.player(21)}"
        table.engine.dispose()
        for _ in range(2):  # the environment's max-conns 2, not the file's 1
            clients.append(websocket.create_connection(url, timeout=TIMEOUT_S, origin="https://game.example"))
        with pytest.raises(websocket.WebSocketBadStatusException) as refusal:
            websocket.create_connection(url, timeout=TIMEOUT_S, origin="https://game.example")
        assert refusal.value.status_code == 429
        with pytest.raises(websocket.WebSocketBadStatusException) as refusal:  # the file's origins
            websocket.create_connection(url, timeout=TIMEOUT_S, origin="https://evil.example")
        assert refusal.value.status_code == 403
    finally:
        for client in clients:
            client.close()
        process.kill()


def test_help_exits_0(tmp_path):
    """--help prints the settings and exits 0."""
    result = run_gateway_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage: ws-gateway" in result.stdout and "-max-conns" in result.stdout


@pytest.mark.parametrize("flag", ["-version", "--version"])
def test_version_prints_name_and_version(tmp_path, flag):
    """-version prints `ws-gateway <version>` (the package's) on stdout, exits 0 and touches no database."""
    from wsgateway import __version__

    result = run_gateway_cli(flag, cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"ws-gateway {__version__}\n", "")
    assert list(tmp_path.iterdir()) == []


def test_help_says_what_the_readme_says(tmp_path):
    """--help explains Go-style flags, WS_GATEWAY_* and -c FILE, lists each flag once in Go's
    layout, and carries neither ConfigArgParse's epilog nor a "(default '')"."""
    from wsgateway.config import FLAGS

    result = run_gateway_cli("-help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for phrase in ("-max-conns 5, -max-conns=5 or --max-conns 5", "WS_GATEWAY_MAX_CONNS=5", "-c FILE",
                   "never abbreviated", "  -version", "commands (each has --help)"):
        assert phrase in text, phrase
    for flag in FLAGS:
        assert len(re.findall(rf"^  -{re.escape(flag.name)}(?: \w+)?$", text, re.MULTILINE)) == 1, flag.name
    assert "(default ''" not in text and "Args that start with" not in text and "goo.gl" not in text
    assert "  -dsn string\n        database DSN (Go forms, or a SQLAlchemy URL) " \
           "(default file:ws_tokens.db?cache=shared)" in text


def test_metrics_carry_the_same_version(gateway):
    """/metrics exports ws_gateway_build_info{version} = 1 with the version -version prints."""
    from wsgateway import __version__

    reply = gateway.get("/metrics")
    assert reply.status == 200
    assert f'ws_gateway_build_info{{version="{__version__}"}} 1.0' in reply.body.decode().splitlines()
