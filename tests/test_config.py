"""wsgateway.config: Go-compatible flags, durations, sizes, addresses and DSNs, precedence, errors."""
from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from wsgateway.config import (FLAGS, ConfigError, database_url, load, parse_addr, parse_duration, parse_size,
                              setting_option)


def load_args(*argv: str, env: dict[str, str] | None = None):
    """`load` isolated from the test process's environment."""
    return load(list(argv), env={} if env is None else env)


def refusal(*argv: str, env: dict[str, str] | None = None) -> str:
    """The message of the `ConfigError` these arguments raise; it must be one line."""
    with pytest.raises(ConfigError) as caught:
        load_args(*argv, env=env)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# --- defaults -------------------------------------------------------------------------------

def test_go_flag_defaults():
    """Every flag inherited from the Go ws-server defaults to the Go value."""
    config = load_args()
    assert (config.listen_host, config.listen_port) == ("", 8080)
    assert config.db == "sqlite"
    assert config.database_url == "sqlite:///ws_tokens.db"  # from file:ws_tokens.db?cache=shared
    assert config.origins == ()
    assert config.max_conns_per_player == 10
    assert config.max_queued == 100
    assert config.offline_ttl_s == 10.0
    assert config.rate_limit == 200
    assert config.rate_period_s == 1.0
    assert config.revalidate_period_s == 60.0


def test_new_flag_defaults():
    """The gateway's own flags have their documented defaults."""
    config = load_args()
    assert config.db_timeout_s == 5.0
    assert config.max_body_bytes == 1024 * 1024
    assert config.max_message_bytes == 64 * 1024
    assert config.ping_period_s == 30.0
    assert config.pong_wait_s == 60.0
    assert config.shutdown_timeout_s == 10.0
    assert config.max_outbox_messages == 4096
    assert config.max_outbox_bytes == 4 * 1024 * 1024
    assert config.max_total_conns == 0
    assert config.request_timeout_s == 10.0
    assert config.tls_handshake_timeout_s == 10.0
    assert config.auth_fail_limit == 30
    assert (config.log_file, config.log_level, config.pid_file) == ("", "info", "")


# --- command-line forms ----------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["-max-conns", "3"],
    ["-max-conns=3"],
    ["--max-conns", "3"],
    ["--max-conns=3"],
])
def test_flag_forms(argv):
    """`-flag value`, `-flag=value`, `--flag value` and `--flag=value` all set the flag, as in Go."""
    assert load_args(*argv).max_conns_per_player == 3


def test_last_repeated_flag_wins():
    """A flag given twice takes its last value, as Go's flag package does."""
    assert load_args("-max-conns", "1", "-max-conns", "2").max_conns_per_player == 2


def test_origins_are_split_and_trimmed():
    """-origins is a comma-separated list; blanks and empty items are ignored."""
    assert load_args("-origins", " https://a.example , b.example,,").origins == ("https://a.example", "b.example")


def test_zero_limits_mean_unlimited_or_off():
    """0 is accepted where it means "unlimited" or "off"."""
    config = load_args("-max-conns", "0", "-max-queued", "0", "-offline-ttl", "0", "-rate-limit", "0",
                       "-max-total-conns", "0", "-request-timeout", "0",
                       "-tls-handshake-timeout", "0")
    assert (config.max_conns_per_player, config.max_queued, config.offline_ttl_s, config.rate_limit) == (0, 0, 0, 0)
    assert (config.max_total_conns, config.request_timeout_s, config.tls_handshake_timeout_s) == (0, 0.0, 0.0)


def test_log_level_is_case_insensitive():
    """-log-level accepts any case and is stored lower-case."""
    assert load_args("-log-level", "DEBUG").log_level == "debug"


# --- durations, sizes, addresses -----------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("250ms", 0.25), ("10s", 10.0), ("1m", 60.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("0", 0.0),
    ("1m30.5s", 90.5), ("500us", 0.0005), ("2h45m", 9900.0),
])
def test_go_durations(text, seconds):
    """Go duration syntax is read as seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10x", "-1s", "", "1m-", "10", "m", "1 m", "s10"])
def test_bad_durations_refused(text):
    """Text that Go's time.ParseDuration would not accept (or a negative one) is refused."""
    with pytest.raises(ValueError):
        parse_duration(text)


def test_duration_flag_reaches_config():
    """A duration flag is stored in seconds."""
    assert load_args("-offline-ttl", "1h30m").offline_ttl_s == 5400.0


@pytest.mark.parametrize("text, size", [("65536", 65536), ("64KiB", 65536), ("1MiB", 1048576), ("2k", 2048)])
def test_sizes(text, size):
    """Sizes are bytes, with binary K/M/G multiples."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1.5MiB", "-1", "64XB", "KiB"])
def test_bad_sizes_refused(text):
    """A size that is not a whole number with a known unit is refused."""
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text, address", [
    (":8080", ("", 8080)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("[::1]:8080", ("::1", 8080)),
    ("localhost:9000", ("localhost", 9000)),
])
def test_listen_addresses(text, address):
    """Go listen addresses become (host, port); an empty host means every interface."""
    assert parse_addr(text) == address


@pytest.mark.parametrize("text", ["8080", "", ":", ":65536", "::1:8080", "[::1]8080", "host:http", "a:b:1"])
def test_bad_listen_addresses_refused(text):
    """An address without a numeric port in range, or an unbracketed IPv6 host, is refused."""
    with pytest.raises(ValueError):
        parse_addr(text)


def test_addr_flag_reaches_config():
    """-addr sets the listen host and port."""
    config = load_args("-addr", "[::1]:0")
    assert (config.listen_host, config.listen_port) == ("::1", 0)


# --- DSNs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dsn, url", [
    ("file:ws_tokens.db?cache=shared", "sqlite:///ws_tokens.db"),
    ("file:/var/lib/ws/tokens.db?cache=shared&mode=rwc", "sqlite:////var/lib/ws/tokens.db"),
    ("file:///var/lib/ws/tokens.db?cache=shared", "sqlite:////var/lib/ws/tokens.db"),
    ("file://localhost/var/lib/ws/tokens.db", "sqlite:////var/lib/ws/tokens.db"),
    ("/srv/ws@blue/tokens.db", "sqlite:////srv/ws@blue/tokens.db"),
    ("tokens.db", "sqlite:///tokens.db"),
    ("sqlite:////var/lib/ws/tokens.db", "sqlite:////var/lib/ws/tokens.db"),
    ("sqlite:///relative.db", "sqlite:///relative.db"),
])
def test_sqlite_dsns(dsn, url):
    """Go sqlite DSNs (file:PATH?params, SQLite URIs) become SQLAlchemy URLs; URLs pass through."""
    assert database_url("sqlite", dsn) == url


@pytest.mark.parametrize("dsn", ["file:", "", "file::memory:?cache=shared", ":memory:"])
def test_unusable_sqlite_dsns_refused(dsn):
    """An empty path or an in-memory database (which would hold no tokens) is refused."""
    with pytest.raises(ValueError):
        database_url("sqlite", dsn)


@pytest.mark.parametrize("dsn, url", [
    ("root@/echoCTF", "mysql+pymysql://root@127.0.0.1:3306/echoCTF"),
    ("root:secret@/echoCTF", "mysql+pymysql://root:secret@127.0.0.1:3306/echoCTF"),
    ("u:p@tcp(db.example)/echoCTF", "mysql+pymysql://u:p@db.example:3306/echoCTF"),
    ("u:p@tcp(db.example:3307)/echoCTF", "mysql+pymysql://u:p@db.example:3307/echoCTF"),
    ("u:p@tcp([::1])/echoCTF", "mysql+pymysql://u:p@[::1]:3306/echoCTF"),
    ("u:p@tcp(db:3306)/echoCTF?parseTime=true&charset=utf8mb4", "mysql+pymysql://u:p@db:3306/echoCTF"),
    ("u@unix(/run/mysqld/mysqld.sock)/echoCTF",
     "mysql+pymysql://u@localhost/echoCTF?unix_socket=/run/mysqld/mysqld.sock"),
    ("mysql+pymysql://u:p@db/echoCTF", "mysql+pymysql://u:p@db/echoCTF"),
    ("mysql://u:p@db/echoCTF", "mysql+pymysql://u:p@db/echoCTF"),
    ("mariadb://u:p@db/echoCTF", "mysql+pymysql://u:p@db/echoCTF"),
])
def test_mysql_dsns(dsn, url):
    """Go MySQL DSNs become pymysql URLs (Go's defaults: 127.0.0.1, port 3306); URLs pass through."""
    assert database_url("mysql", dsn) == url


@pytest.mark.parametrize("password", ["p@ss", "p/w", "p:q", "100%", "a b"])
def test_mysql_password_special_characters_survive(password):
    """A password with @, /, :, % or a space reaches SQLAlchemy unchanged (Go splits at the last @)."""
    url = make_url(database_url("mysql", f"gw:{password}@tcp(db:3306)/echoCTF"))
    assert (url.username, url.password, url.host, url.port, url.database) == ("gw", password, "db", 3306, "echoCTF")


@pytest.mark.parametrize("dsn", ["file:ws_tokens.db?cache=shared", "tokens.db", "u@tcp(db)/", "u@/"])
def test_bad_mysql_dsns_refused(dsn):
    """A sqlite DSN or one without a database name is not a MySQL DSN."""
    with pytest.raises(ValueError):
        database_url("mysql", dsn)


@pytest.mark.parametrize("argv", [
    ["-db", "mysql"],  # the default DSN is a sqlite one
    ["-db", "mysql", "-dsn", "sqlite:///x.db"],
    ["-db", "sqlite", "-dsn", "mysql+pymysql://u:p@db/echoCTF"],
    ["-db", "sqlite", "-dsn", "u:p@tcp(db:3306)/echoCTF"],
    ["-db", "sqlite", "-dsn", "root@/echoCTF"],
    ["-db", "sqlite", "-dsn", "tcp(db:3306)/echoCTF"],
    ["-db", "mysql", "-dsn", "postgresql://u@db/x"],
])
def test_db_and_dsn_mismatch_refused(argv):
    """A DSN of the other database family is refused, naming -dsn."""
    assert refusal(*argv).startswith("-dsn:")


def test_mysql_dsn_flag_reaches_config():
    """-db mysql with a Go DSN yields the converted URL in the config."""
    config = load_args("-db", "mysql", "-dsn", "u:p@tcp(db:3306)/echoCTF")
    assert (config.db, config.database_url) == ("mysql", "mysql+pymysql://u:p@db:3306/echoCTF")


# --- config file, environment, precedence ----------------------------------------------------------

def test_config_file_with_section_header(tmp_path):
    """`-c FILE` reads `key = value` lines under an optional [gateway] header; comments are ignored."""
    path = tmp_path / "gateway.ini"
    path.write_text("# comment\n[gateway]\nmax-conns = 5\noffline-ttl = 30s\norigins =\n\nlog-file =\n")
    config = load_args("-c", str(path))
    assert (config.max_conns_per_player, config.offline_ttl_s, config.origins, config.log_file) == (5, 30.0, (), "")


def test_config_file_without_header(tmp_path):
    """The [gateway] header is optional; `--config` is the long form of `-c`."""
    path = tmp_path / "gateway.ini"
    path.write_text("max-queued = 7\n")
    assert load_args("--config", str(path)).max_queued == 7


def test_environment_variables():
    """WS_GATEWAY_<FLAG> (dashes as underscores, upper case) sets a flag."""
    config = load_args(env={"WS_GATEWAY_MAX_CONNS": "4", "WS_GATEWAY_OFFLINE_TTL": "1m",
                            "WS_GATEWAY_DSN": "file:env.db?cache=shared"})
    assert (config.max_conns_per_player, config.offline_ttl_s, config.database_url) == (4, 60.0, "sqlite:///env.db")


def test_precedence_command_line_env_file_default(tmp_path):
    """Command line beats environment, which beats the config file, which beats the default."""
    path = tmp_path / "gateway.ini"
    path.write_text("max-conns = 5\nmax-queued = 6\nrate-limit = 7\n")
    env = {"WS_GATEWAY_MAX_CONNS": "50", "WS_GATEWAY_MAX_QUEUED": "60"}
    config = load_args("-c", str(path), "-max-conns", "500", env=env)
    assert config.max_conns_per_player == 500  # command line
    assert config.max_queued == 60  # environment over file
    assert config.rate_limit == 7  # file over default
    assert config.offline_ttl_s == 10.0  # default


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("addr", "8080"), ("db", "oracle"), ("max-conns", "-1"), ("max-conns", "ten"), ("max-queued", "1.5"),
    ("offline-ttl", "10x"), ("offline-ttl", "-1s"), ("offline-ttl", ""), ("offline-ttl", "1m-"),
    ("rate-limit", "x"), ("rate-period", "0"), ("revalidate-period", "0s"), ("db-timeout", "0"), ("auth-fail-limit", "-1"),
    ("max-body", "0"), ("max-body", "1TiB"), ("max-message-size", "big"), ("ping-period", "0"),
    ("pong-wait", "forever"), ("shutdown-timeout", "-5s"), ("max-outbox", "0"), ("max-outbox-bytes", "0"),
    ("log-level", "verbose"), ("dsn", "file:"), ("max-total-conns", "-1"), ("request-timeout", "5"),
    ("tls-handshake-timeout", "soon"),
])
def test_bad_value_names_the_flag(flag, value):
    """A bad value raises a one-line ConfigError that starts with `-flag:`."""
    assert refusal(f"-{flag}={value}").startswith(f"-{flag}:")


@pytest.mark.parametrize("how", ["flag", "file", "environment"])
def test_header_timeout_is_the_old_name_of_request_timeout(how, tmp_path):
    """-header-timeout still sets the whole-request deadline, as a flag, a file key or WS_GATEWAY_HEADER_TIMEOUT."""
    if how == "flag":
        config = load_args("-header-timeout", "3s")
    elif how == "file":
        path = tmp_path / "gateway.ini"
        path.write_text("header-timeout = 3s\n")
        config = load_args("-c", str(path))
    else:
        config = load([], env={"WS_GATEWAY_HEADER_TIMEOUT": "3s"})
    assert config.request_timeout_s == 3.0


def test_request_timeout_wins_over_its_old_name_in_the_environment():
    """With both names set, the current one counts."""
    config = load([], env={"WS_GATEWAY_HEADER_TIMEOUT": "3s", "WS_GATEWAY_REQUEST_TIMEOUT": "4s"})
    assert config.request_timeout_s == 4.0


def test_bad_environment_value_names_the_flag():
    """A bad WS_GATEWAY_* value is reported under the flag's name."""
    assert refusal(env={"WS_GATEWAY_MAX_CONNS": "many"}).startswith("-max-conns:")


def test_bad_config_file_value_names_the_flag(tmp_path):
    """A bad value in the config file is reported under the flag's name."""
    path = tmp_path / "gateway.ini"
    path.write_text("rate-period = soon\n")
    assert refusal("-c", str(path)).startswith("-rate-period:")


def test_missing_flag_value_names_the_flag():
    """A flag given without its value is reported as `-flag: ...`."""
    assert refusal("-addr").startswith("-addr:")


def test_unknown_flag_refused():
    """An unknown flag is refused and named."""
    assert "-max-connections" in refusal("-max-connections", "3")


def test_abbreviated_flag_refused():
    """A prefix of a flag is not taken for the flag (Go has no abbreviations)."""
    assert "--max-con" in refusal("--max-con", "3")


def test_stray_argument_refused():
    """A positional argument is refused."""
    assert "extra" in refusal("extra")


def test_unknown_config_file_key_refused(tmp_path):
    """A key in the config file that is no flag is refused and named."""
    path = tmp_path / "gateway.ini"
    path.write_text("[gateway]\nmax-connections = 3\n")
    assert "max-connections" in refusal("-c", str(path))


def test_missing_config_file_refused(tmp_path):
    """A config file that does not exist is refused, naming -c."""
    assert refusal("-c", str(tmp_path / "absent.ini")).startswith("-c:")


def test_unreadable_config_file_refused(tmp_path):
    """A config file that cannot be read (here: a directory) is refused, naming -c."""
    assert refusal("-c", str(tmp_path)).startswith("-c:")


@pytest.mark.parametrize("ping, pong", [("30s", "30s"), ("1m", "30s")])
def test_pong_wait_must_exceed_ping_period(ping, pong):
    """-pong-wait not longer than -ping-period would reap healthy sockets; it is refused."""
    assert refusal("-ping-period", ping, "-pong-wait", pong).startswith("-pong-wait:")


def test_broker_settings_parse():
    """-broker, -broker-prefix, -presence-ttl and -workers land typed in Config."""
    config = load_args("-broker", "redis://:pw@cache:6379/2", "-broker-prefix", "game-1",
                       "-presence-ttl", "5s", "-workers", "3")
    assert (config.broker_url, config.broker_prefix, config.presence_ttl_s, config.workers) == (
        "redis://:pw@cache:6379/2", "game-1", 5.0, 3)
    assert (load_args().broker_url, load_args().workers) == ("", 1)


@pytest.mark.parametrize("url", ["redis+cluster://10.0.0.1:7000,10.0.0.2:7000", "rediss+cluster://:pw@cache:7000/0",
                                 "redis+cluster://[::1]:7000,cache:7001?ssl_cert_reqs=none"])
def test_a_redis_cluster_is_a_broker(url):
    """-broker takes a Redis Cluster as redis+cluster:// (rediss+cluster:// for TLS) with its seeds."""
    assert load_args("-broker", url).broker_url == url


def test_history_is_refused_on_a_redis_cluster():
    """-history-size needs a single Redis for now: on a Redis Cluster it is refused by name."""
    with pytest.raises(ConfigError) as refusal:
        load_args("-broker", "redis+cluster://a:7000", "-history-size", "10")
    assert str(refusal.value).startswith("-history-size:")


def test_cluster_seeds_name_every_node_and_keep_credentials():
    """A cluster URL gives the first seed's URL (scheme, credentials, options) and every seed's address."""
    from wsgateway.redis_link import cluster_seeds

    assert cluster_seeds("rediss+cluster://:pw@a:7000,[::1]:7001/0?ssl_cert_reqs=none") == (
        "rediss://:pw@a:7000?ssl_cert_reqs=none", [("a", 7000), ("::1", 7001)])
    assert cluster_seeds("redis+cluster://a:7000") == ("redis://a:7000", [("a", 7000)])


@pytest.mark.parametrize("argv, setting", [
    (["-workers", "2"], "-workers:"),
    (["-workers", "0", "-broker", "redis://x"], "-workers:"),
    (["-broker", "http://cache:6379"], "-broker:"),
    (["-broker", "redis+cluster://cache"], "-broker:"),
    (["-broker", "redis+cluster://cache:7000,other"], "-broker:"),
    (["-broker", "redis+cluster://cache:7000/2"], "-broker:"),
    (["-broker-prefix", "has space"], "-broker-prefix:"),
    (["-presence-ttl", "0"], "-presence-ttl:"),
])
def test_bad_broker_settings_are_refused_by_name(argv, setting):
    """Workers without a broker, non-Redis URLs and bad prefixes are refused naming the flag."""
    with pytest.raises(ConfigError) as refusal:
        load_args(*argv)
    assert str(refusal.value).startswith(setting)


# --- -console, -tls-cert, -tls-key (operator tools) ----------------------------------------------

@pytest.mark.parametrize("argv", [
    ["-console"], ["-console=true"], ["--console"], ["--console=yes"], ["-console", "-max-conns", "3"],
    ["-max-conns", "3", "-console"],
], ids=["bare", "equals-true", "double-dash", "double-dash-yes", "before-a-flag", "last"])
def test_console_switch_forms(argv):
    """`-console` alone turns the console on, as do `-console=true` and `--console`; it never eats the next flag."""
    config = load_args(*argv)
    assert config.console is True
    assert config.max_conns_per_player == (3 if "-max-conns" in argv else 10)


def test_console_is_off_by_default_and_can_be_turned_off():
    """The console is off by default; `-console=false` keeps it off even when the environment says true."""
    assert load_args().console is False
    assert load_args("-console=false", env={"WS_GATEWAY_CONSOLE": "true"}).console is False


@pytest.mark.parametrize("line, expected", [("console = true", True), ("console = false", False),
                                            ("console =", False), ("console = on", True)])
def test_console_in_config_file(tmp_path, line, expected):
    """`console = true` in the -c file turns it on; false or empty leaves it off."""
    path = tmp_path / "gateway.ini"
    path.write_text(f"[gateway]\n{line}\n")
    assert load_args("-c", str(path)).console is expected


def test_console_from_environment():
    """WS_GATEWAY_CONSOLE=true turns the console on."""
    assert load_args(env={"WS_GATEWAY_CONSOLE": "true"}).console is True


def test_bad_console_value_names_the_flag():
    """`-console=maybe` (or an environment value that is no boolean) is refused naming -console."""
    assert refusal("-console=maybe").startswith("-console:")
    assert refusal(env={"WS_GATEWAY_CONSOLE": "sometimes"}).startswith("-console:")


def test_tls_files_reach_config():
    """-tls-cert and -tls-key together set the certificate and key paths; neither means plain http."""
    config = load_args("-tls-cert", "/etc/ws/cert.pem", "-tls-key", "/etc/ws/key.pem")
    assert (config.tls_cert_file, config.tls_key_file) == ("/etc/ws/cert.pem", "/etc/ws/key.pem")
    assert (load_args().tls_cert_file, load_args().tls_key_file) == ("", "")


@pytest.mark.parametrize("argv, missing", [(["-tls-cert", "c.pem"], "-tls-key"),
                                           (["-tls-key", "k.pem"], "-tls-cert")])
def test_tls_flags_come_together(argv, missing):
    """One TLS flag without the other is refused, naming the missing one."""
    assert refusal(*argv).startswith(f"{missing}:")


def test_setting_option_tells_settings_and_their_values_apart():
    """setting_option knows which words are settings and which of those take the next word as value."""
    assert setting_option("-dsn") == (True, True)
    assert setting_option("--dsn=x") == (True, False)
    assert setting_option("-c") == (True, True)
    assert setting_option("-console") == (True, False)
    assert setting_option("--player") == (False, False)
    assert setting_option("token") == (False, False)


def test_example_config_file_lists_every_setting():
    """etc/gateway.ini names every flag and loads as it is."""
    from pathlib import Path
    example = Path(__file__).resolve().parent.parent / "etc" / "gateway.ini"
    keys = {line.split("=", 1)[0].strip() for line in example.read_text().splitlines()
            if "=" in line and not line.lstrip().startswith("#")}
    assert keys == {flag.name for flag in FLAGS}
    assert load_args("-c", str(example)).console is False


@pytest.mark.parametrize("argv, flag, meant", [
    (["-max-queue", "5"], "-max-queue", "-max-queued"),
    (["-max-con", "5"], "-max-con", "-max-conns"),
    (["-max-con=5"], "-max-con", "-max-conns"),
    (["--max-queue", "5"], "--max-queue", "-max-queued"),
    (["-con"], "-con", "-console"),
], ids=["single-dash", "single-dash-conns", "equals", "double-dash", "prefix-of-switch"])
def test_flag_prefixes_are_refused_with_a_suggestion(argv, flag, meant):
    """A misspelled or shortened flag is refused by name (Go takes no abbreviations), with the flag meant."""
    message = refusal(*argv)
    assert message.startswith(f"{flag}: no such flag"), message
    assert f"did you mean {meant}?" in message


def test_config_file_key_prefix_is_refused(tmp_path):
    """A config-file key that only starts like a setting is refused, naming the key and the setting meant."""
    path = tmp_path / "gateway.ini"
    path.write_text("max-queue = 5\n")
    assert refusal("-c", str(path)) == "-c: unknown key 'max-queue' in the config file (did you mean max-queued?)"


def test_environment_variable_prefix_is_not_read():
    """WS_GATEWAY_MAX_QUEUE is no setting's variable: -max-queued keeps its default."""
    assert load_args(env={"WS_GATEWAY_MAX_QUEUE": "5"}).max_queued == 100


def test_non_utf8_config_file_is_refused_in_one_line(tmp_path):
    """A config file that is not UTF-8 text is refused naming -c and the file, not with a traceback."""
    path = tmp_path / "binary.ini"
    path.write_bytes(b"max-conns = 3\n\xd0\x00\xff\n")
    assert refusal("-c", str(path)) == f"-c: {str(path)!r} is not a text file in UTF-8 (invalid continuation byte)"


def test_problems_lists_every_refused_setting():
    """problems() reports each bad setting on its own line, where load stops at the first."""
    from wsgateway.config import problems, read_settings

    raw = read_settings(["-max-conns", "x", "-offline-ttl", "10x", "-db", "pg"], env={})
    found = problems(raw)
    assert [line.split(":", 1)[0] for line in found] == ["-db", "-max-conns", "-offline-ttl"]
    assert problems(read_settings([], env={})) == []


def test_history_size_must_fit_a_replay_in_the_outbox():
    """-history-size past half of -max-outbox is refused: a replay could not be held."""
    assert load(["-history-size", "2048"], env={}).history_size == 2048
    with pytest.raises(ConfigError, match="-history-size: 2049 would replay"):
        load(["-history-size", "2049"], env={})
    assert load(["-history-size", "3000", "-max-outbox", "6000"], env={}).history_size == 3000
