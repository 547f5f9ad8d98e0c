"""Settings: command line, environment and config file, parsed into one frozen `Config`.

The flag names, defaults and duration syntax are those of echoCTF's Go ws-server, so an
existing deployment switches by changing only the command. Every flag is accepted as
`-flag value`, `-flag=value` and `--flag value`, like Go's `flag` package.
Precedence: command line > `WS_GATEWAY_*` environment > `-c FILE` > defaults.

A bad value is reported as one line naming the setting (`ConfigError`); `cli` turns it
into exit status 2.
"""
from __future__ import annotations

import difflib
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NoReturn, Sequence, Union
from urllib.parse import quote

import configargparse

from wsgateway import __version__

ENV_PREFIX = "WS_GATEWAY_"

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class ConfigError(Exception):
    """A setting has a value we refuse; the message names the setting and the problem."""


@dataclass(frozen=True)
class Config:
    """Typed settings. A zero in a limit means "no limit" unless the field says otherwise."""

    listen_host: str  # "" = every interface
    listen_port: int  # 0 = any free port (tests)
    db: str  # "sqlite" or "mysql"
    database_url: str  # SQLAlchemy URL derived from -dsn
    origins: tuple[str, ...]  # allowed Origin headers; empty = any origin
    trusted_proxies: tuple[Network, ...]  # peers whose X-Forwarded-For is believed; empty = nobody's
    max_conns_per_player: int  # 0 = unlimited
    max_total_conns: int  # open connections of every kind (HTTP, TLS, WebSocket) at once; 0 = unlimited
    max_queued: int  # offline messages kept per player; 0 = offline queueing off
    offline_ttl_s: float  # how long an offline message waits; 0 = offline queueing off
    max_offline_bytes: int  # accounted bytes of all offline queues together, oldest given up past it; 0 = no bound
    max_offline_players: int  # offline queues at once, the oldest given up past it; 0 = no bound
    history_size: int  # messages kept per player stream (and in the broadcast stream) for resuming; 0 = no history
    history_ttl_s: float  # how long a kept message stays; 0 = no history
    max_history_bytes: int  # accounted bytes of all history together, oldest given up past it; 0 = no bound
    rate_limit: int  # bucket size (burst) per server subject; 0 = unlimited
    rate_period_s: float  # the bucket refills `rate_limit` tokens over this period
    revalidate_period_s: float  # live tokens rechecked, server tokens cached, this often
    db_timeout_s: float  # a database call taking longer fails (503) instead of hanging
    auth_fail_limit: int  # refused tokens per client address per minute before 429; 0 = no limit
    max_body_bytes: int  # largest accepted HTTP request body
    max_batch: int  # messages in one /publish/batch request (at least 1)
    max_message_bytes: int  # largest accepted client WebSocket message
    ping_period_s: float  # server ping interval
    pong_wait_s: float  # a socket that leaves a ping unanswered this long is closed
    shutdown_timeout_s: float  # how long SIGTERM waits for sockets and requests to finish
    request_timeout_s: float  # a request's line, headers and body must arrive this fast; 0 = no limit
    max_outbox_messages: int  # frames waiting for a slow socket before it is closed
    max_outbox_bytes: int  # bytes waiting for a slow socket before it is closed
    broker_url: str  # "" = in-process broker (one gateway); redis://... = a cluster of gateways
    broker_prefix: str  # Redis key prefix: gateways sharing it act as one
    presence_ttl_s: float  # a dead gateway's players count as offline after this
    broker_stream_length: int  # envelopes a gateway's Redis stream keeps for it while it is away
    workers: int  # processes sharing -addr (more than 1 needs -broker)
    idempotency_window_s: float  # how long a publish's Idempotency-Key is remembered
    idempotency_max_keys: int  # keys remembered at once; past it the oldest are forgotten
    notify_missed: bool  # tell a reconnecting player what its offline queue lost
    log_file: str  # "" = standard output
    log_level: str
    pid_file: str  # "" = none
    console: bool  # serve the browser console at /console
    tls_cert_file: str  # PEM certificate chain; "" = plain http:// and ws://
    tls_key_file: str  # PEM private key of tls_cert_file; set together with it
    tls_handshake_timeout_s: float  # a TLS client must finish its handshake this fast; 0 = no limit


_DURATION_UNITS_S = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3,
    "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """Seconds in a Go duration (`250ms`, `10s`, `1h30m`, also `0`); `d` (days) is accepted too."""
    text = text.strip()
    if text == "0":
        return 0.0
    if not text or text.startswith("-"):
        raise ValueError(f"{text!r} is not a duration (use e.g. 250ms, 10s, 1m, 1h30m)")
    seconds = 0.0
    position = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _DURATION_UNITS_S[match.group(2)]
        position = match.end()
    if position != len(text):
        raise ValueError(f"{text!r} is not a duration (use e.g. 250ms, 10s, 1m, 1h30m)")
    return seconds


_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "kb": 1024, "k": 1024,
               "mib": 1024**2, "mb": 1024**2, "m": 1024**2, "gib": 1024**3, "gb": 1024**3, "g": 1024**3}


def parse_size(text: str) -> int:
    """Bytes in `1048576`, `64KiB`, `1MiB` (K, M, G are binary multiples)."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size (use e.g. 65536, 64KiB, 1MiB)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def parse_count(text: str) -> int:
    """A non-negative integer."""
    if not re.fullmatch(r"\s*\d+\s*", text):
        raise ValueError(f"{text!r} is not a non-negative integer")
    return int(text)


def parse_addr(text: str) -> tuple[str, int]:
    """Go listen address: `:8080`, `127.0.0.1:8080`, `[::1]:8080`, `localhost:0`."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]*):(\d{1,5})", text.strip())
    if not match or int(match.group(2)) > 65535:
        raise ValueError(f"{text!r} is not a listen address (use e.g. :8080 or 127.0.0.1:8080)")
    host = match.group(1)
    if host.startswith("["):
        host = host[1:-1]
    return host, int(match.group(2))


def parse_networks(text: str) -> tuple[Network, ...]:
    """Comma-separated addresses or CIDRs (`10.0.0.0/8, ::1`); empty is none."""
    networks = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR (use e.g. 10.0.0.1, 10.0.0.0/8, ::1)") from None
    return tuple(networks)


_GO_MYSQL_DSN = re.compile(
    r"(?:(?P<user>[^:@/]*)(?::(?P<password>.*))?@)?"
    r"(?:(?P<net>tcp|unix)\((?P<address>[^)]*)\))?"
    r"/(?P<database>[^?]*)"
    r"(?:\?(?P<params>.*))?"
)


def database_url(db: str, dsn: str) -> str:
    """The SQLAlchemy URL for a Go-style DSN, or the DSN itself when it already is a URL."""
    dsn = dsn.strip()
    if db == "sqlite" and dsn.startswith("file://"):  # SQLite URI: file:[//localhost]/PATH
        dsn = "file:" + dsn[len("file://"):].removeprefix("localhost")
    if "://" in dsn:
        scheme = dsn.split("://", 1)[0].lower()
        family = "sqlite" if scheme.startswith("sqlite") else "mysql" if scheme.startswith(("mysql", "mariadb")) else ""
        if family != db:
            raise ValueError(f"{dsn.split('://', 1)[0]}:// URL does not match -db {db}")
        if scheme in ("mysql", "mariadb"):
            return "mysql+pymysql://" + dsn.split("://", 1)[1]
        return dsn
    if db == "sqlite":
        mysql_like = None if dsn.startswith("file:") else _GO_MYSQL_DSN.fullmatch(dsn)
        if mysql_like and (mysql_like.group("user") is not None or mysql_like.group("net")):
            raise ValueError(f"{dsn!r} is a MySQL DSN: add -db mysql")
        path = dsn[len("file:"):] if dsn.startswith("file:") else dsn
        path = path.split("?", 1)[0]
        if not path:
            raise ValueError(f"{dsn!r} is not a sqlite DSN (use file:PATH?cache=shared or sqlite:///PATH)")
        if path == ":memory:":
            raise ValueError("an in-memory sqlite database would be empty: give a file")
        return "sqlite:///" + path
    match = _GO_MYSQL_DSN.fullmatch(dsn)
    if dsn.startswith("file:") or not match or not match.group("database"):
        raise ValueError(
            f"{dsn!r} is not a MySQL DSN (use user:pass@tcp(host:3306)/db, user@/db, "
            "user@unix(/path.sock)/db or mysql+pymysql://...)")
    user = quote(match.group("user") or "", safe="")
    password = match.group("password")
    credentials = user + (":" + quote(password, safe="") if password else "")
    database = quote(match.group("database"), safe="")
    if match.group("net") == "unix":
        return f"mysql+pymysql://{credentials}@localhost/{database}?unix_socket={quote(match.group('address'))}"
    address = match.group("address") or "127.0.0.1:3306"
    if ":" not in address.rsplit("]", 1)[-1]:
        address += ":3306"
    return f"mysql+pymysql://{credentials}@{address}/{database}"


def masked_password(value: str) -> str:
    """A DSN or URL (`-dsn`, `-broker`) with its password, if any, shown as `***`, for
    printing settings; everything else is left as written."""
    if "://" in value:
        scheme, rest = value.split("://", 1)
        userinfo, at, location = rest.rpartition("@")
        if at and ":" in userinfo:
            return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{location}"
        return value
    match = _GO_MYSQL_DSN.fullmatch(value.strip())
    if match and match.group("password"):
        start, end = match.span("password")
        return value.strip()[:start] + "***" + value.strip()[end:]
    return value


class _Flag:
    """One setting: its Go-style name, default text, parser and help. A switch is a
    boolean that, like in Go, takes its value only as `-flag=value` (`-flag` alone = true)."""

    def __init__(self, name: str, default: str, parse: Callable[[str], object], help: str,
                 *, switch: bool = False, old_names: tuple[str, ...] = ()) -> None:
        self.name = name
        self.old_names = old_names  # earlier names, still accepted (flag, file key, environment)
        self.default = default
        self.parse = parse
        self.help = help
        self.switch = switch


def _text(value: str) -> str:
    return value


def _log_level(value: str) -> str:
    level = value.strip().lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ValueError(f"{value!r} is not a log level (use debug, info, warning or error)")
    return level


def _database_driver(value: str) -> str:
    driver = value.strip().lower()
    if driver not in ("sqlite", "mysql"):
        raise ValueError(f"unknown database driver {value!r} (use sqlite or mysql)")
    return driver


def parse_boolean(text: str) -> bool:
    """Go's and ConfigArgParse's spellings of a boolean: true/false, yes/no, on/off, 1/0;
    empty (`console =` in a file) is false."""
    word = text.strip().lower()
    if word in ("true", "yes", "on", "1", "t"):
        return True
    if word in ("false", "no", "off", "0", "f", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def _positive_count(value: str) -> int:
    count = parse_count(value)
    if count <= 0:
        raise ValueError(f"{value!r} must be larger than zero")
    return count


# redis+cluster://[user:password@]host:port[,host:port...][/0][?options]
_CLUSTER_URL = re.compile(r"rediss?\+cluster://([^@/]*@)?(\[[0-9a-fA-F:.]+\]|[^,:/@\[\]]+):\d+"
                          r"(,(\[[0-9a-fA-F:.]+\]|[^,:/@\[\]]+):\d+)*(/0?)?(\?.*)?")


def _broker_url(value: str) -> str:
    url = value.strip()
    if url and not re.match(r"(redis|rediss|unix|redis\+cluster|rediss\+cluster)://", url):
        raise ValueError(f"{value!r} is not a Redis URL (use redis://host:6379/0, rediss://..., unix://..., "
                         "or redis+cluster://host:7000,host:7001 for a Redis Cluster)")
    if url.split("://", 1)[0].endswith("+cluster") and not _CLUSTER_URL.fullmatch(url):
        raise ValueError(f"{masked_password(value)!r} is not a Redis Cluster URL (its seeds as host:port,host:port; "
                         "database 0 only)")
    return url


def _key_prefix(value: str) -> str:
    prefix = value.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", prefix):
        raise ValueError(f"{value!r} is not a key prefix (1-64 of letters, digits, _ . : -)")
    return prefix


def _positive_duration(value: str) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r} must be longer than zero")
    return seconds


def _positive_size(value: str) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError(f"{value!r} must be larger than zero")
    return size


FLAGS: tuple[_Flag, ...] = (
    _Flag("addr", ":8080", parse_addr, "HTTP listen address"),
    _Flag("db", "sqlite", _database_driver, "database driver: sqlite or mysql"),
    _Flag("dsn", "file:ws_tokens.db?cache=shared", _text,
          "database DSN (Go forms, or a SQLAlchemy URL)"),
    _Flag("origins", "", _text, "comma-separated allowed Origins for /ws and /events (empty = any)"),
    _Flag("trusted-proxies", "", parse_networks,
          "comma-separated proxy addresses or CIDRs whose X-Forwarded-For gives the client address (empty = none)"),
    _Flag("max-conns", "10", parse_count, "max connections per player, WebSockets and event streams (0 = unlimited)"),
    _Flag("max-total-conns", "0", parse_count,
          "max open connections of every kind (HTTP and WebSocket); more get 503 at once (0 = unlimited)"),
    _Flag("max-queued", "100", parse_count, "max offline messages per player, oldest dropped (0 = no queue)"),
    _Flag("offline-ttl", "10s", parse_duration, "how long an offline message waits (0 = no queue)"),
    _Flag("max-offline-bytes", "64MiB", parse_size,
          "bytes held by all offline queues together (with -broker: the whole cluster's), the oldest message "
          "given up past it (0 = no bound)"),
    _Flag("max-offline-players", "10000", parse_count,
          "offline queues held at once (with -broker: the whole cluster's), the oldest queue given up past it "
          "(0 = no bound)"),
    _Flag("history-size", "0", parse_count,
          "messages kept per player, and of broadcasts, for clients resuming with last_event_id (0 = no history)"),
    _Flag("history-ttl", "2m", parse_duration, "how long a kept message can be resumed from (0 = no history)"),
    _Flag("max-history-bytes", "64MiB", parse_size,
          "bytes held by all history together (with -broker: the whole cluster's), the oldest message given up "
          "past it (0 = no bound)"),
    _Flag("rate-limit", "200", parse_count, "messages per rate period per server token (0 = unlimited)"),
    _Flag("rate-period", "1s", _positive_duration, "rate limit window"),
    _Flag("revalidate-period", "1m", _positive_duration, "token revalidation interval"),
    _Flag("db-timeout", "5s", _positive_duration, "longest wait for the database before answering 503"),
    _Flag("auth-fail-limit", "30", parse_count,
          "refused tokens per client address per minute; past it the address gets 429 (0 = no limit)"),
    _Flag("max-body", "1MiB", _positive_size, "largest HTTP request body"),
    _Flag("max-batch", "1000", _positive_count, "most messages in one /publish/batch request"),
    _Flag("max-message-size", "64KiB", _positive_size, "largest client WebSocket message (larger: close 1009)"),
    _Flag("ping-period", "30s", _positive_duration, "server ping interval"),
    _Flag("pong-wait", "60s", _positive_duration, "close a socket that leaves a ping unanswered this long"),
    _Flag("shutdown-timeout", "10s", _positive_duration, "how long shutdown waits for sockets and requests"),
    _Flag("request-timeout", "10s", parse_duration,
          "time allowed to send a whole request (line, headers, body), or to stay idle between requests "
          "(0 = no limit)", old_names=("header-timeout",)),
    _Flag("max-outbox", "4096", _positive_count, "frames waiting for one socket before it is closed as too slow"),
    _Flag("max-outbox-bytes", "4MiB", _positive_size, "bytes waiting for one socket before it is closed as too slow"),
    _Flag("broker", "", _broker_url, "redis://[:password@]host:port/db (or rediss://), or a Redis Cluster "
          "redis+cluster://[:password@]host:port,host:port (rediss+cluster://): gateways sharing it act as one"),
    _Flag("broker-prefix", "wsgw", _key_prefix, "Redis key prefix of this gateway cluster"),
    _Flag("presence-ttl", "15s", _positive_duration, "a dead gateway's players count as offline after this"),
    _Flag("broker-stream-length", "10000", _positive_count,
          "envelopes each gateway's Redis stream keeps while that gateway is not reading (about; oldest trimmed)"),
    _Flag("workers", "1", _positive_count, "processes serving -addr on this host (more than 1 needs -broker)"),
    _Flag("idempotency-window", "5m", _positive_duration,
          "a repeated Idempotency-Key from the same server token is answered, not delivered, this long"),
    _Flag("idempotency-max-keys", "100000", _positive_count, "idempotency keys remembered at once (oldest forgotten)"),
    _Flag("notify-missed", "false", parse_boolean,
          "send gateway.missed before the backlog when a player's offline queue lost messages", switch=True),
    _Flag("log-file", "", _text, "JSON log file (default: standard output)"),
    _Flag("log-level", "info", _log_level, "debug, info, warning or error"),
    _Flag("pid-file", "", _text, "write the process id here while running"),
    _Flag("console", "false", parse_boolean, "serve the browser console at /console", switch=True),
    _Flag("tls-cert", "", _text, "PEM certificate (chain) file: serve https:// and wss:// (with -tls-key)"),
    _Flag("tls-key", "", _text, "PEM private key file of -tls-cert"),
    _Flag("tls-handshake-timeout", "10s", parse_duration,
          "time a TLS client has to finish its handshake (0 = no limit)"),
)
_CONFIG_FILE_OPTIONS = ("-c", "--config")
HELP_OPTIONS = ("-h", "-help", "--help")  # Go's flag package answers -h and -help
VERSION_OPTIONS = ("-version", "--version")
SYNTAX = """Every setting is a flag, written as in Go: -max-conns 5, -max-conns=5 or --max-conns 5
(a switch such as -console takes a value only after '=': -console=false). Flags are
never abbreviated. Each is also read from the environment as WS_GATEWAY_<NAME> (upper
case, '-' as '_': WS_GATEWAY_MAX_CONNS=5) and from the file given with -c FILE, as
`name = value` lines with the flag names (an optional [gateway] header is allowed; see
etc/gateway.ini). Precedence: flag > environment > file > default."""


def setting_option(arg: str) -> tuple[bool, bool]:
    """Whether command-line word `arg` is one of the settings' options, and if so whether
    the next word is its value. Lets a caller pick the settings out of a longer command
    line (`ws-gateway -c FILE token list`)."""
    name, has_value = arg.split("=", 1)[0], "=" in arg
    if name in _CONFIG_FILE_OPTIONS:
        return True, not has_value
    for flag in FLAGS:
        if name.lstrip("-") in (flag.name, *flag.old_names) and name.startswith("-"):
            return True, not has_value and not flag.switch
    return False, False


class _OneLineErrorParser(configargparse.ArgumentParser):
    """argparse prints usage and exits; we want one line naming the setting, raised."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("Unable to open config file"):
            message = "-c: " + message
        # argparse says "argument --addr: expected one argument"; we say "-addr: ..."
        message = re.sub(r"^argument -(-[\w-]+): ", r"\1: ", message)
        message = re.sub(r"^argument -c/--config: ", "-c: ", message)
        if message.startswith("unrecognized arguments: "):
            # Flags were checked before parsing: what is left is a config-file key we do
            # not know (handed over as "--key=value") or a stray word.
            word = message.removeprefix("unrecognized arguments: ").split(" ", 1)[0]
            if word.startswith("--"):
                key = word[2:].split("=", 1)[0]
                close = difflib.get_close_matches(key, [flag.name for flag in FLAGS], n=1)
                message = f"-c: unknown key {key!r} in the config file" + (
                    f" (did you mean {close[0]}?)" if close else "")
            else:
                message = f"unexpected argument {word!r} (settings are written -flag value)"
        raise ConfigError(message)


def build_parser() -> configargparse.ArgumentParser:
    """The parser: every flag as `--name`, `WS_GATEWAY_NAME`, and `-c FILE`. It sees the
    command line only after `_command_line` has checked it and spelled every flag long,
    and never prints: help and version are `_command_line`'s, errors are `ConfigError`."""
    parser = _OneLineErrorParser(
        prog="ws-gateway",
        add_help=False,
        add_config_file_help=False,
        add_env_var_help=False,
        auto_env_var_prefix=ENV_PREFIX,
        args_for_setting_config_path=list(_CONFIG_FILE_OPTIONS),
        allow_abbrev=False,
    )
    for flag in FLAGS:
        # A switch is an optional-value option: `-console` alone stores "true"; the config
        # file and the environment hand it over as `--console=VALUE`.
        extra: dict[str, Any] = {"nargs": "?", "const": "true"} if flag.switch else {}
        # Only the long forms: argparse (3.11) matches a single-dash word by prefix even with
        # allow_abbrev=False (`-max-queue` was taken for -max-queued); `_command_line`
        # refuses what is not a flag before the parser sees it.
        old = [f"--{old_name}" for old_name in flag.old_names]
        parser.add_argument(f"--{flag.name}", *old, dest=flag.name.replace("-", "_"), default=flag.default,
                            **extra)
    return parser


_METAVARS: dict[Callable[[str], object], str] = {
    parse_addr: "address", parse_duration: "duration", _positive_duration: "duration",
    parse_size: "size", _positive_size: "size", parse_count: "n", _positive_count: "n",
}


def help_text(epilog: str | None = None) -> str:
    """What `ws-gateway --help` prints: the syntax, then every flag as Go's flag package
    lists them (name and kind of value, then what it does and its default)."""
    lines = ["usage: ws-gateway [-c FILE] [-flag value ...] [COMMAND ...]", "",
             "Real-time WebSocket message gateway (drop-in for echoCTF's ws-server).", "", SYNTAX, "",
             "settings:", "  -c FILE", "        config file of `name = value` lines using the flag names"]
    for flag in FLAGS:
        kind = "" if flag.switch else " " + _METAVARS.get(flag.parse, "string")
        default = "" if not flag.default or flag.default == "false" or "(default" in flag.help \
            else f" (default {flag.default})"
        lines += [f"  -{flag.name}{kind}", f"        {flag.help}{default}"]
    lines += ["  -version", "        print the version and exit", "  -h, -help", "        print this help and exit"]
    return "\n".join(lines) + "\n" + (f"\n{epilog}\n" if epilog else "")


def _command_line(argv: Sequence[str], epilog: str | None) -> list[str]:
    """argv checked and rewritten for the parser: each setting's `-name[=V]` as
    `--name[=V]`, values left alone. Prints help or the version and raises SystemExit(0)
    when asked to; raises `ConfigError` for a word that looks like a flag and is none,
    as Go does (and as `-c FILE` does for a key it does not know).

    The rewriting matters too: ConfigArgParse looks for `-c FILE` with a parser that knows
    no other option, and would read any setting that starts with c (`-console`) as `-c onsole`."""
    rewritten: list[str] = []
    value_follows = False
    for arg in argv:
        if value_follows:
            rewritten.append(arg)
            value_follows = False
            continue
        if arg in HELP_OPTIONS:
            print(help_text(epilog), end="")
            raise SystemExit(0)
        if arg in VERSION_OPTIONS:
            print(f"ws-gateway {__version__}")
            raise SystemExit(0)
        is_setting, value_follows = setting_option(arg)
        if not is_setting and arg.startswith("-") and arg not in ("-", "--"):
            raise ConfigError(_unknown_flag(arg.split("=", 1)[0]))
        if is_setting and not arg.startswith("--") and arg.split("=", 1)[0] not in _CONFIG_FILE_OPTIONS:
            arg = "-" + arg
        rewritten.append(arg)
    return rewritten


def _old_names_renamed(env: Mapping[str, str]) -> dict[str, str]:
    """The environment with each setting's old name (`WS_GATEWAY_HEADER_TIMEOUT`) read as
    its current one, unless that is set too."""
    renamed = dict(env)
    for flag in FLAGS:
        for old_name in flag.old_names:
            old_key = ENV_PREFIX + old_name.upper().replace("-", "_")
            if old_key in renamed:
                renamed.setdefault(ENV_PREFIX + flag.name.upper().replace("-", "_"), renamed.pop(old_key))
    return renamed


def _unknown_flag(word: str) -> str:
    names = [f"-{flag.name}" for flag in FLAGS]
    close = difflib.get_close_matches("-" + word.lstrip("-"), names, n=1)
    return f"{word}: no such flag" + (f" (did you mean {close[0]}?)" if close else "")


def _config_file(argv: Sequence[str]) -> str:
    """The FILE of `-c FILE` / `-c=FILE` in argv (the last one), or ""."""
    path = ""
    for index, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name in _CONFIG_FILE_OPTIONS:
            path = value if "=" in arg else (argv[index + 1] if index + 1 < len(argv) else "")
    return path


def _parsed(flag: _Flag, raw: str) -> object:
    try:
        return flag.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"-{flag.name}: {exc}") from None


def read_settings(argv: Sequence[str] | None = None, env: dict[str, str] | None = None,
                  *, epilog: str | None = None) -> dict[str, str]:
    """The text of every setting after precedence (flag > environment > file > default),
    by flag name, not yet checked. Raises `ConfigError` for an unknown flag or file key,
    or a config file that cannot be read; `--help` (with `epilog`) and `--version` print
    and raise SystemExit(0)."""
    words = list(sys.argv[1:] if argv is None else argv)
    command_line = _command_line(words, epilog)
    try:
        namespace = build_parser().parse_args(
            command_line, env_vars=_old_names_renamed(os.environ if env is None else env))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"-c: {_config_file(words)!r} is not a text file in UTF-8 "
                          f"({exc.reason})") from None
    return {flag.name: str(getattr(namespace, flag.name.replace("-", "_"))) for flag in FLAGS}


def problems(raw: dict[str, str]) -> list[str]:
    """Every refused setting in `raw` (from `read_settings`), one line each naming it;
    empty when `build` would succeed."""
    found: list[str] = []
    for flag in FLAGS:
        try:
            _parsed(flag, raw[flag.name])
        except ConfigError as exc:
            found.append(str(exc))
    if not found:
        try:
            build(raw)
        except ConfigError as exc:
            found.append(str(exc))
    return found


def load(argv: Sequence[str] | None = None, env: dict[str, str] | None = None,
         *, epilog: str | None = None) -> Config:
    """Parse argv, environment and config file into a `Config`, or raise `ConfigError`.
    `--help` prints the settings (and `epilog`) and `--version` the version; both raise
    SystemExit(0)."""
    return build(read_settings(argv, env, epilog=epilog))


def build(raw: dict[str, str]) -> Config:
    """The `Config` of the settings' texts, or `ConfigError` for the first refused one."""
    value: dict[str, Any] = {flag.name: _parsed(flag, raw[flag.name]) for flag in FLAGS}

    try:
        url = database_url(value["db"], raw["dsn"])
    except ValueError as exc:
        raise ConfigError(f"-dsn: {exc}") from None
    if value["pong-wait"] <= value["ping-period"]:
        raise ConfigError(f"-pong-wait: {raw['pong-wait']} must be longer than -ping-period {raw['ping-period']}")
    if value["workers"] > 1 and not value["broker"]:
        raise ConfigError(f"-workers: {value['workers']} workers need -broker redis://... to act as one gateway")
    if value["history-size"] > 0 and value["history-ttl"] > 0 and value["broker"].split("://", 1)[0].endswith("+cluster"):
        raise ConfigError(f"-history-size: {value['history-size']}: the history is kept on a single Redis only, not yet "
                          "on a Redis Cluster (its steps span slots): use -history-size 0 with -broker redis+cluster://")
    if 2 * value["history-size"] > value["max-outbox"]:  # a replay: the player's own and the broadcasts
        raise ConfigError(f"-history-size: {value['history-size']} would replay up to twice as many frames at once, "
                          f"more than -max-outbox {value['max-outbox']} lets one socket hold")
    tls_cert, tls_key = raw["tls-cert"].strip(), raw["tls-key"].strip()
    if bool(tls_cert) != bool(tls_key):
        missing, given = ("-tls-key", "-tls-cert") if tls_cert else ("-tls-cert", "-tls-key")
        raise ConfigError(f"{missing}: required with {given} (give both, or neither for plain http)")
    host, port = value["addr"]
    return Config(
        listen_host=host,
        listen_port=port,
        db=value["db"],
        database_url=url,
        origins=tuple(origin.strip() for origin in raw["origins"].split(",") if origin.strip()),
        trusted_proxies=value["trusted-proxies"],
        max_conns_per_player=value["max-conns"],
        max_total_conns=value["max-total-conns"],
        max_queued=value["max-queued"],
        offline_ttl_s=value["offline-ttl"],
        max_offline_bytes=value["max-offline-bytes"],
        max_offline_players=value["max-offline-players"],
        history_size=value["history-size"],
        history_ttl_s=value["history-ttl"],
        max_history_bytes=value["max-history-bytes"],
        rate_limit=value["rate-limit"],
        rate_period_s=value["rate-period"],
        revalidate_period_s=value["revalidate-period"],
        db_timeout_s=value["db-timeout"],
        auth_fail_limit=value["auth-fail-limit"],
        max_body_bytes=value["max-body"],
        max_batch=value["max-batch"],
        max_message_bytes=value["max-message-size"],
        ping_period_s=value["ping-period"],
        pong_wait_s=value["pong-wait"],
        shutdown_timeout_s=value["shutdown-timeout"],
        request_timeout_s=value["request-timeout"],
        max_outbox_messages=value["max-outbox"],
        max_outbox_bytes=value["max-outbox-bytes"],
        broker_url=value["broker"],
        broker_prefix=value["broker-prefix"],
        presence_ttl_s=value["presence-ttl"],
        broker_stream_length=value["broker-stream-length"],
        workers=value["workers"],
        idempotency_window_s=value["idempotency-window"],
        idempotency_max_keys=value["idempotency-max-keys"],
        notify_missed=value["notify-missed"],
        log_file=raw["log-file"].strip(),
        log_level=value["log-level"],
        pid_file=raw["pid-file"].strip(),
        console=value["console"],
        tls_cert_file=tls_cert,
        tls_key_file=tls_key,
        tls_handshake_timeout_s=value["tls-handshake-timeout"],
    )
