"""The operations commands of ws-gateway (db, token, publish, broadcast): where settings come from,
what they print, exit codes, --help; run in process through cli.main and as bin/ws-gateway,
against real databases and a real running gateway."""
from __future__ import annotations

import os
import re

import pytest

from tests.support.clients import receive_close, receive_event
from tests.support.processes import free_port, gateway_environment, run_gateway_cli
from wsgateway.cli import main
from wsgateway.commands import split_command


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """cli.main in this process: (exit status, stdout, stderr)."""
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(autouse=True)
def no_gateway_environment(monkeypatch):
    """The commands read WS_GATEWAY_* like the gateway: start each test without any."""
    for name in list(os.environ):
        if name.startswith("WS_GATEWAY_") and name != "WS_GATEWAY_TEST_TIMEOUT":
            monkeypatch.delenv(name)


# --- finding the command among the settings ------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    ([], ([], None, [])),
    (["-max-conns", "3"], (["-max-conns", "3"], None, [])),
    (["token", "list"], ([], "token", ["list"])),
    (["-c", "etc/gateway.ini", "token", "list"], (["-c", "etc/gateway.ini"], "token", ["list"])),
    (["token", "list", "-dsn", "file:x.db", "--show-tokens"], (["-dsn", "file:x.db"], "token", ["list", "--show-tokens"])),
    (["-origins", "token", "db", "init"], (["-origins", "token"], "db", ["init"])),
    (["-dsn=file:x.db", "-console", "db", "init"], (["-dsn=file:x.db", "-console"], "db", ["init"])),
    (["publish", "--token", "db", "--player", "1"], ([], "publish", ["--token", "db", "--player", "1"])),
    (["token", "revoke", "--", "-dsn"], ([], "token", ["revoke", "--", "-dsn"])),
    (["--help"], (["--help"], None, [])),
], ids=["nothing", "settings-only", "command", "config-first", "settings-after", "value-named-like-a-command",
        "switch-and-equals", "command-words-after", "double-dash", "help"])
def test_split_command(argv, expected):
    """Settings (and their values) are told apart from the command and its own words, wherever they stand."""
    assert split_command(argv) == expected


# --- db init ---------------------------------------------------------------------------------------
def test_db_init_creates_the_table_once(capsys, any_database_url):
    """`db init` creates ws_token on sqlite and MariaDB; run again it says so and changes nothing."""
    db = "mysql" if any_database_url.startswith("mysql") else "sqlite"
    assert run(capsys, "db", "init", "-db", db, "-dsn", any_database_url) == (0, "created table ws_token\n", "")
    assert run(capsys, "-db", db, "-dsn", any_database_url, "db", "init") == (
        0, "table ws_token exists, left as it is\n", "")


def test_db_init_on_an_unreachable_database_exits_1(capsys):
    """A database that cannot be reached: exit 1 and one line with the driver's reason."""
    status, out, err = run(capsys, "-db", "mysql", "-dsn", "root@tcp(127.0.0.1:1)/x", "-db-timeout", "1s",
                           "db", "init")
    assert (status, out) == (1, "")
    assert one_line(err).startswith("ws-gateway db init: database error") and "Can't connect" in err


# --- token add / list / revoke ---------------------------------------------------------------------
def test_token_add_prints_only_the_token_which_then_connects(capsys, gateway, sqlite_url):
    """`token add --player` prints one token and nothing else; a player connects with it."""
    status, out, err = run(capsys, "-dsn", sqlite_url, "token", "add", "--player", "21", "--ttl", "24h")
    assert status == 0 and err == ""
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}\n", out), out
    client = gateway.connect(out.strip())
    server = gateway.tokens.server()
    assert gateway.publish(server, 21, "hello").status == 200
    assert receive_event(client) == {"event": "hello", "payload": None}


def test_token_list_masks_tokens_unless_asked(capsys, gateway, sqlite_url):
    """`token list` shows a 4-character prefix, kind, player/subject, expiry and expired; --show-tokens all of it."""
    _, player, _ = run(capsys, "-dsn", sqlite_url, "token", "add", "--player", "21", "--ttl", "24h")
    _, server, _ = run(capsys, "-dsn", sqlite_url, "token", "add", "--server", "backend-1", "--ttl", "365d")
    expired = gateway.tokens.player(22, ttl_s=-60)
    player, server = player.strip(), server.strip()

    status, listing, err = run(capsys, "-dsn", sqlite_url, "token", "list")
    assert (status, err) == (0, "")
    lines = listing.splitlines()
    assert lines[0].split() == ["TOKEN", "KIND", "PLAYER/SUBJECT", "EXPIRES", "(UTC)", "EXPIRED"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[server[:4] + "…"][1:3] == ["server", "backend-1"] and rows[server[:4] + "…"][-1] == "no"
    assert rows[player[:4] + "…"][1:3] == ["player", "21"] and rows[player[:4] + "…"][-1] == "no"
    assert rows[expired[:4] + "…"][1:3] == ["player", "22"] and rows[expired[:4] + "…"][-1] == "yes"
    for token in (player, server, expired):
        assert token not in listing

    _, shown, _ = run(capsys, "-dsn", sqlite_url, "token", "list", "--show-tokens", "--kind", "server")
    assert [line.split()[0] for line in shown.splitlines()[1:]] == [server]


def test_token_revoke_closes_live_sockets_at_revalidation(capsys, gateway, sqlite_url):
    """`token revoke` deletes the token, says which (masked); the gateway's revalidation closes its socket with 1008."""
    token = gateway.tokens.player(21)
    client = gateway.connect(token)
    status, out, err = run(capsys, "-dsn", sqlite_url, "token", "revoke", token)
    assert (status, err) == (0, "")
    assert out.startswith(f"revoked {token[:4]}… (player 21)") and token not in out
    gateway.gateway.revalidator.run_once()
    assert receive_close(client)[0] == 1008
    status, out, err = run(capsys, "-dsn", sqlite_url, "token", "revoke", token)
    assert (status, out, one_line(err)) == (1, "", "ws-gateway token revoke: no such token")


def test_token_commands_on_mariadb(capsys, mysql_url):
    """add, list and revoke work on MariaDB with the gateway's -db/-dsn settings."""
    settings = ["-db", "mysql", "-dsn", mysql_url]
    assert run(capsys, *settings, "db", "init")[0] == 0
    status, token, _ = run(capsys, *settings, "token", "add", "--server", "backend-9", "--ttl", "1h")
    token = token.strip()
    assert status == 0
    assert f"{token[:4]}…  server  backend-9" in run(capsys, *settings, "token", "list")[1]
    assert run(capsys, *settings, "token", "revoke", token)[0] == 0
    assert token[:4] + "…" not in run(capsys, *settings, "token", "list")[1]


def test_settings_come_from_config_file_and_environment(capsys, tmp_path, monkeypatch):
    """-c FILE (before or after the command) and WS_GATEWAY_DSN choose the database, as for the gateway."""
    from_file, from_env = tmp_path / "file.db", tmp_path / "env.db"
    config = tmp_path / "gateway.ini"
    config.write_text(f"[gateway]\ndsn = file:{from_file}\n")
    assert run(capsys, "-c", str(config), "db", "init")[0] == 0
    assert run(capsys, "token", "add", "--player", "1", "--ttl", "1h", "-c", str(config))[0] == 0
    monkeypatch.setenv("WS_GATEWAY_DSN", f"file:{from_env}")
    assert run(capsys, "db", "init")[0] == 0
    assert run(capsys, "token", "list")[1].count("\n") == 1  # header only: the environment's database
    assert run(capsys, "-c", str(config), "token", "list")[1].count("\n") == 1  # environment beats file
    monkeypatch.delenv("WS_GATEWAY_DSN")
    assert run(capsys, "-c", str(config), "token", "list")[1].count("\n") == 2


@pytest.mark.parametrize("argv, fragment", [
    (["token", "add", "--ttl", "1h"], "one of the arguments --player --server is required"),
    (["token", "add", "--player", "1", "--server", "s", "--ttl", "1h"], "not allowed with"),
    (["token", "add", "--player", "1"], "--ttl"),
    (["token", "frobnicate"], "invalid choice"),
    (["token"], "required"),
    (["db"], "required"),
    (["token", "list", "--kind", "robot"], "invalid choice"),
], ids=["no-subject", "both-subjects", "no-ttl", "unknown-action", "no-action", "db-no-action", "bad-kind"])
def test_bad_usage_exits_2_with_usage(capsys, tmp_path, argv, fragment):
    """Wrong usage exits 2 with the usage line and argparse's error naming the problem."""
    status, out, err = run(capsys, "-dsn", f"file:{tmp_path / 't.db'}", *argv)
    assert (status, out) == (2, "")
    assert err.startswith("usage: ws-gateway") and fragment in err, err


@pytest.mark.parametrize("argv, option", [
    (["token", "add", "--player", "1", "--ttl", "10x"], "--ttl"),
    (["token", "add", "--player", "1", "--ttl", "0"], "--ttl"),
    (["token", "add", "--player", "99999999999", "--ttl", "1h"], "--player"),
    (["token", "add", "--server", "s" * 40, "--ttl", "1h"], "--server"),
    (["publish", "--token", "t", "--player", "1", "--event", "e", "--payload", "{bad"], "--payload"),
    (["publish", "--player", "1", "--event", "e"], "--token"),
    (["broadcast", "--token", "t", "--event", "e", "--url", "ftp://x"], "--url"),
    (["broadcast", "--token", "t", "--event", "e", "--timeout", "soon"], "--timeout"),
    (["-max-conns", "many", "token", "list"], "-max-conns"),
], ids=["ttl-syntax", "ttl-zero", "player-too-large", "server-too-long", "payload-json", "no-token", "url",
        "timeout", "bad-setting"])
def test_bad_input_exits_2_with_one_line_naming_it(capsys, tmp_path, argv, option):
    """Refused input exits 2 with one stderr line naming the option."""
    status, out, err = run(capsys, "-dsn", f"file:{tmp_path / 't.db'}", *argv)
    assert (status, out) == (2, "")
    assert option in one_line(err), err


# --- publish / broadcast --------------------------------------------------------------------------------
def test_publish_and_broadcast_through_bin_ws_gateway(gateway, tokens, tmp_path):
    """bin/ws-gateway publish/broadcast reach a running gateway and print its answer."""
    client = gateway.connect(tokens.player(21))
    server = tokens.server()
    url = f"http://{gateway.host}:{gateway.port}"
    published = run_gateway_cli("publish", "--url", url, "--token", server, "--player", "21",
                                "--event", "e", "--payload", '{"a":1}', cwd=tmp_path)
    assert (published.returncode, published.stdout, published.stderr) == (
        0, '{"delivered": 1, "queued": false}\n', "")
    assert receive_event(client) == {"event": "e", "payload": {"a": 1}}
    broadcast = run_gateway_cli("broadcast", "--url", url, "--token", server, "--event", "all", cwd=tmp_path)
    assert (broadcast.returncode, broadcast.stdout) == (0, '{"delivered": 1}\n')
    assert receive_event(client) == {"event": "all", "payload": None}


def test_publish_defaults_to_the_gateways_own_address_and_env_token(capsys, gateway, tokens, monkeypatch):
    """Without --url the settings' -addr is used; WS_GATEWAY_SERVER_TOKEN stands in for --token."""
    client = gateway.connect(tokens.player(21))
    monkeypatch.setenv("WS_GATEWAY_SERVER_TOKEN", tokens.server())
    status, out, err = run(capsys, "-addr", f"127.0.0.1:{gateway.port}", "broadcast", "--player", "21",
                           "--event", "only-you", "--payload", "[1, 2]")
    assert (status, out, err) == (0, '{"delivered": 1}\n', "")
    assert receive_event(client) == {"event": "only-you", "payload": [1, 2]}


def test_publish_refused_by_the_gateway_exits_1_with_its_message(capsys, gateway, tokens):
    """A refusal exits 1 with the gateway's status and error message; the token is not echoed."""
    player_token = tokens.player(21)
    status, out, err = run(capsys, "publish", "--url", f"http://{gateway.host}:{gateway.port}",
                           "--token", player_token, "--player", "21", "--event", "e")
    assert (status, out) == (1, "")
    assert one_line(err) == "ws-gateway publish: the gateway answered 403: invalid, expired or non-server token"
    assert player_token not in err


def test_publish_to_nothing_exits_1(capsys):
    """No gateway at the URL: after the retries, exit 1 with one line saying nothing answered."""
    status, out, err = run(capsys, "publish", "--url", f"http://127.0.0.1:{free_port()}", "--token", "t",
                           "--player", "1", "--event", "e", "--retries", "0")
    assert (status, out) == (1, "")
    assert "no answer from" in one_line(err) and "refused" in err


# --- help -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, mentions", [
    (["db", "init", "--help"], ["Idempotent", "-dsn"]),
    (["token", "add", "--help"], ["--player", "--server", "--ttl", "only it"]),
    (["token", "revoke", "--help"], ["TOKEN", "1008"]),
    (["token", "list", "--help"], ["--show-tokens", "--kind"]),
    (["publish", "--help"], ["--url", "--token", "--player", "--event", "--payload", "--idempotency-key", "Retry-After"]),
    (["broadcast", "--help"], ["--url", "--token", "--event", "--payload"]),
    (["presence", "--help"], ["--url", "--token", "PLAYER", "-broker"]),
    (["disconnect", "--help"], ["--url", "--token", "PLAYER", "4002", "revoke"]),
    (["token", "--help"], ["add", "revoke", "list"]),
])
def test_every_command_has_help(capsys, argv, mentions):
    """--help on each command exits 0 and explains its options."""
    status, out, _ = run(capsys, *argv)
    assert status == 0
    for word in mentions:
        assert word in out, word


def test_gateway_help_lists_the_commands(tmp_path):
    """bin/ws-gateway --help still shows the settings, and now the commands."""
    result = run_gateway_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "-max-conns" in result.stdout and "-tls-cert" in result.stdout and "-console" in result.stdout
    assert re.search(r"token add\|revoke\|list", result.stdout)


def test_token_add_through_bin_on_a_fresh_directory(tmp_path):
    """As a process: db init then token add in an empty directory; stdout is the token alone."""
    environment = gateway_environment()
    assert run_gateway_cli("db", "init", cwd=tmp_path, env=environment).returncode == 0
    added = run_gateway_cli("token", "add", "--server", "backend-1", "--ttl", "365d", cwd=tmp_path, env=environment)
    assert added.returncode == 0 and added.stderr == ""
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}\n", added.stdout)
    assert (tmp_path / "ws_tokens.db").exists()  # the default -dsn, relative to where it runs


# --- presence / disconnect --------------------------------------------------------------------------
def test_presence_and_disconnect_through_bin_ws_gateway(gateway, tokens, tmp_path):
    """bin/ws-gateway presence [PLAYER] prints the gateway's counts; disconnect PLAYER closes it (4002) and says how many."""
    client = gateway.connect(tokens.player(21))
    server = tokens.server()
    url = f"http://{gateway.host}:{gateway.port}"
    everyone = run_gateway_cli("presence", "--url", url, "--token", server, cwd=tmp_path)
    assert (everyone.returncode, everyone.stdout, everyone.stderr) == (0, '{"players": 1, "connections": 1}\n', "")
    one = run_gateway_cli("presence", "--url", url, "--token", server, "21", cwd=tmp_path)
    assert (one.returncode, one.stdout) == (0, '{"player_id": "21", "connections": 1}\n')
    cut = run_gateway_cli("disconnect", "--url", url, "--token", server, "21", cwd=tmp_path)
    assert (cut.returncode, cut.stdout, cut.stderr) == (0, '{"disconnected": 1}\n', "")
    assert receive_close(client) == (4002, "disconnected by the server")


def test_disconnect_defaults_to_the_gateways_own_address_and_env_token(capsys, gateway, tokens, monkeypatch):
    """Without --url the settings' -addr is used; WS_GATEWAY_SERVER_TOKEN stands in for --token."""
    monkeypatch.setenv("WS_GATEWAY_SERVER_TOKEN", tokens.server())
    status, out, err = run(capsys, "-addr", f"127.0.0.1:{gateway.port}", "disconnect", "nobody")
    assert (status, out, err) == (0, '{"disconnected": 0}\n', "")


def test_presence_refused_by_the_gateway_exits_1_with_its_message(capsys, gateway, tokens):
    """A refusal exits 1 with the gateway's status and message, and the token is not echoed."""
    player_token = tokens.player(21)
    status, out, err = run(capsys, "presence", "--url", f"http://{gateway.host}:{gateway.port}",
                           "--token", player_token)
    assert (status, out) == (1, "")
    assert one_line(err) == "ws-gateway presence: the gateway answered 403: invalid, expired or non-server token"
    assert player_token not in err


@pytest.mark.parametrize("argv, fragment", [
    (["disconnect", "--token", "t"], "the following arguments are required: PLAYER"),
    (["presence", "--token", "t", "1", "2"], "unrecognized arguments: 2"),
])
def test_presence_and_disconnect_bad_usage_exits_2(capsys, argv, fragment):
    """A missing or extra player word is a usage error: exit 2 with argparse's message."""
    status, out, err = run(capsys, *argv)
    assert (status, out) == (2, "")
    assert fragment in err


def test_disconnect_without_a_token_exits_2(capsys, gateway):
    """No --token and no WS_GATEWAY_SERVER_TOKEN: exit 2 naming --token, nothing sent."""
    status, out, err = run(capsys, "disconnect", "--url", f"http://{gateway.host}:{gateway.port}", "21")
    assert (status, out) == (2, "")
    assert "--token" in one_line(err)
    assert gateway.metric("ws_http_requests_total", endpoint="disconnect", status="401") == 0
