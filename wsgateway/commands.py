"""The operations subcommands of `ws-gateway`: `db`, `token`, `publish`, `broadcast`,
`checkconfig`, `listen`, `presence`, `disconnect`.

    ws-gateway [SETTINGS] db init
    ws-gateway [SETTINGS] token add (--player ID | --server SUBJECT) --ttl DURATION
    ws-gateway [SETTINGS] token revoke TOKEN
    ws-gateway [SETTINGS] token list [--show-tokens] [--kind player|server]
    ws-gateway [SETTINGS] publish [--url URL] --token TOKEN --player ID --event E [--payload JSON]
    ws-gateway [SETTINGS] broadcast [--url URL] --token TOKEN --event E [--player ID] [--payload JSON]
    ws-gateway [SETTINGS] checkconfig
    ws-gateway [SETTINGS] listen [--url URL] --token PLAYER_TOKEN [--last-event-id ID]
    ws-gateway [SETTINGS] presence [--url URL] --token TOKEN [PLAYER]
    ws-gateway [SETTINGS] disconnect [--url URL] --token TOKEN PLAYER

The gateway's settings (`-c FILE`, `WS_GATEWAY_*`, `-db`, `-dsn`, `-db-timeout`, ...) may
stand anywhere on the line and are read by `config.load`, exactly as when serving: `db`
and `token` work on the database the gateway uses, and the HTTP commands default to
the gateway's own `-addr` (https when it has `-tls-cert`). The work itself is in
`admin` (database) and `client` (HTTP); this module parses, prints and picks exit codes.

Exit status: 0 done; 2 bad usage or input (argparse's usage line, or one line naming the
option), or a database that refuses the settings (access denied, unknown database, no
such sqlite file or table); 1 the database did not answer, or the gateway failed or
refused (one line with its message).
Standard output carries only the result (`token add`: the token alone), so scripts can
capture it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any, Sequence

from wsgateway.client import GatewayClient, GatewayError, PlayerListener
from wsgateway.config import (FLAGS, Config, ConfigError, build, load, masked_password, parse_count, parse_duration,
                              problems, read_settings, setting_option)
from wsgateway.errors import StoreMisconfigured, StoreUnavailable

# SQLAlchemy comes with admin and tokens: imported by the commands that use them, not by
# a starting gateway, which imports this module before it has bound its address (cli).
if TYPE_CHECKING:
    from wsgateway.admin import TokenAdmin, TokenRow

COMMANDS = ("db", "token", "publish", "broadcast", "checkconfig", "listen", "presence", "disconnect")
TOKEN_ENV = "WS_GATEWAY_SERVER_TOKEN"  # the server-token commands' --token, kept out of `ps`
PLAYER_TOKEN_ENV = "WS_GATEWAY_PLAYER_TOKEN"  # listen's --token, kept out of `ps`

SUMMARY = """commands (each has --help):
  checkconfig                  check every setting, the database and Redis; print the settings
  db init                      create the ws_token table if it is missing
  token add|revoke|list        manage player and server tokens
  publish                      send an event to one player of a running gateway
  broadcast                    send an event to every connected player
  listen                       connect as a player and print each message as one JSON line
  presence [PLAYER]            who is online (every gateway with -broker)
  disconnect PLAYER            close a player's connections now (4002)
Settings (-c FILE, WS_GATEWAY_*, -db, -dsn, ...) apply to the commands too.
Without a command, ws-gateway serves."""

_SETTINGS_NOTE = ("The database is the gateway's: -c FILE, WS_GATEWAY_* variables, -db, -dsn and "
                  "-db-timeout are read as when serving, and may stand before or after the command.")


class UsageError(Exception):
    """Input we refuse (exit 2); the message names the option."""


def split_command(argv: Sequence[str]) -> tuple[list[str], str | None, list[str]]:
    """(settings words, command or None, the command's own words) from a command line.

    The command is the first word that is not a setting or a setting's value; settings
    may come before or after it. After `--`, every word is the command's."""
    settings: list[str] = []
    command: str | None = None
    own: list[str] = []
    words = list(argv)
    index = 0
    while index < len(words):
        word = words[index]
        if command is not None and word == "--":
            own.extend(words[index:])
            break
        is_setting, value_follows = setting_option(word)
        if is_setting:
            settings.append(word)
            if value_follows and index + 1 < len(words):
                index += 1
                settings.append(words[index])
        elif command is None and word in COMMANDS:
            command = word
        elif command is None:
            settings.append(word)
        else:
            own.append(word)
        index += 1
    return settings, command, own


def run(command: str, arguments: Sequence[str], settings: Sequence[str]) -> int:
    """Run one subcommand; returns the exit status."""
    if command == "checkconfig" and not {"-h", "--help"} & set(arguments):
        # It has no options of its own: every word is a setting, and a word that is none is
        # reported as the gateway would report it.
        return _check_config([*settings, *arguments])
    try:
        options = _parser().parse_args([command, *arguments])
    except SystemExit as done:  # --help (0), or bad usage (2) after printing the usage line
        return int(done.code or 0)
    name = " ".join(part for part in ("ws-gateway", command, getattr(options, "action", None)) if part)
    try:
        config = load(settings)
        return options.handler(options, config)
    except (ConfigError, UsageError, StoreMisconfigured) as exc:
        return _fail(name, str(exc), 2)
    except StoreUnavailable as exc:
        return _fail(name, str(exc), 1)
    except GatewayError as exc:
        answered = f"the gateway answered {exc.status}: " if exc.status is not None else ""
        return _fail(name, answered + exc.message, 1)


def _fail(name: str, message: str, status: int) -> int:
    print(f"{name}: {message}", file=sys.stderr)
    return status


# --- db and token -------------------------------------------------------------------------
def _admin(config: Config, *, create_file: bool = False) -> TokenAdmin:
    """Only `db init` creates a missing sqlite file; the other commands refuse it."""
    from wsgateway.admin import TokenAdmin

    return TokenAdmin(config.database_url, db_timeout_s=config.db_timeout_s, create_file=create_file)


def masked(token: str) -> str:
    """`admin.masked`, imported when first used (see the imports above)."""
    from wsgateway import admin

    return admin.masked(token)


def _db_init(options: argparse.Namespace, config: Config) -> int:
    admin = _admin(config, create_file=True)
    try:
        created = admin.init_schema()
    finally:
        admin.close()
    print("created table ws_token" if created else "table ws_token exists, left as it is")
    return 0


def _token_add(options: argparse.Namespace, config: Config) -> int:
    ttl_s = _duration("--ttl", options.ttl)
    admin = _admin(config)
    try:
        token = admin.add(ttl_s=ttl_s, player=options.player, server=options.server, subject=options.subject)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    finally:
        admin.close()
    print(token)
    return 0


def _token_revoke(options: argparse.Namespace, config: Config) -> int:
    admin = _admin(config)
    try:
        row = admin.revoke(options.token)
    finally:
        admin.close()
    if row is None:
        print("ws-gateway token revoke: no such token", file=sys.stderr)
        return 1
    print(f"revoked {masked(row.token)} ({row.kind} {row.identity}); "
          "live connections holding it close at the next revalidation")
    return 0


def _token_list(options: argparse.Namespace, config: Config) -> int:
    admin = _admin(config)
    try:
        rows = admin.list_tokens(options.kind)
        now = admin.now()
    finally:
        admin.close()
    print(_table(rows, now, options.show_tokens), end="")
    return 0


def _table(rows: list[TokenRow], now: datetime, show_tokens: bool) -> str:
    lines = [("TOKEN", "KIND", "PLAYER/SUBJECT", "EXPIRES (UTC)", "EXPIRED")]
    for row in rows:
        expires = row.expires_at.strftime("%Y-%m-%d %H:%M:%S") if row.expires_at else "?"
        lines.append((row.token if show_tokens else masked(row.token), row.kind, row.identity, expires,
                      "yes" if row.expired(now) else "no"))
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    return "".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() + "\n"
                   for line in lines)


# --- checkconfig ----------------------------------------------------------------------------
_SHOWN_MASKED = ("dsn", "broker")


def _check_config(settings: Sequence[str]) -> int:
    """Print the effective settings as `name = value` lines (a valid -c file, passwords
    masked), then `#` notes on what was checked; every problem is one stderr line. Exit 0
    when the gateway would start with these settings, 2 for a configuration error (as
    the gateway would exit), 1 when only the database or Redis did not answer."""
    name = "ws-gateway checkconfig"
    try:
        raw = read_settings(settings)
    except ConfigError as exc:
        return _fail(name, str(exc), 2)
    for flag in FLAGS:
        value = raw[flag.name]
        print(f"{flag.name} = {masked_password(value) if flag.name in _SHOWN_MASKED else value}".rstrip())
    refused = problems(raw)
    unanswered: list[str] = []
    if not refused:
        config = build(raw)
        refused += _file_problems(config)
        for check in (_check_database, _check_broker):
            note, refusal, silence = check(config)
            if note:
                print(f"# {note}")
            refused += refusal
            unanswered += silence
    for line in refused + unanswered:
        print(f"{name}: {line}", file=sys.stderr)
    return 2 if refused else 1 if unanswered else 0


def _file_problems(config: Config) -> list[str]:
    """TLS files that do not make a certificate and key; log and pid files that could not
    be written. Nothing is created."""
    from wsgateway.server import tls_context

    found: list[str] = []
    if config.tls_cert_file:
        try:
            tls_context(config.tls_cert_file, config.tls_key_file)
        except ConfigError as exc:
            found.append(str(exc))
    for flag, path in (("-log-file", config.log_file), ("-pid-file", config.pid_file)):
        if not path:
            continue
        target = path if os.path.exists(path) else (os.path.dirname(os.path.abspath(path)))
        if not os.path.exists(target):
            found.append(f"{flag}: directory {target!r} does not exist")
        elif not os.access(target, os.W_OK):
            found.append(f"{flag}: {target!r} is not writable")
    return found


def _check_database(config: Config) -> tuple[str, list[str], list[str]]:
    """(note, configuration problems, unanswered) for the token database; a missing
    sqlite file or table is no problem (the gateway creates them at start)."""
    from wsgateway.tokens import SqlTokenStore

    store = SqlTokenStore(config.database_url, db_timeout_s=config.db_timeout_s, cache_period_s=0.0,
                          create_file=False)
    try:
        path = store.sqlite_path
        if path is not None and not os.path.exists(path):
            directory = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(directory):
                return "", [f"-dsn: sqlite file {path!r} cannot be created: directory {directory!r} "
                            "does not exist"], []
            return f"database: sqlite file {path!r} does not exist yet; the gateway creates it at start", [], []
        found = store.table_problems()
    except StoreMisconfigured as exc:
        return "", [f"-dsn: {exc}"], []
    except StoreUnavailable as exc:
        return "", [], [f"-dsn: database unreachable ({config.db}): {exc}"]
    finally:
        store.close()
    if found is None:
        return f"database: ok ({config.db}); table ws_token does not exist yet, the gateway creates it", [], []
    if found:
        return "", [f"-dsn: {problem}" for problem in found], []
    if path is not None and os.stat(path).st_mode & 0o007:
        return "", [f"-dsn: sqlite file {path!r} is readable by every local user: chmod 600 it "
                    "(it holds bearer tokens)"], []
    return f"database: ok ({config.db}); table ws_token has the expected columns", [], []


def _check_broker(config: Config) -> tuple[str, list[str], list[str]]:
    """(note, configuration problems, unanswered) for -broker: Redis must answer PING."""
    if not config.broker_url:
        return "broker: none (in-process; one gateway)", [], []
    import redis

    from wsgateway.redis_link import REDIS_ERRORS, create_client

    where = masked_password(config.broker_url)
    client = None
    try:
        client = create_client(config.broker_url, config.db_timeout_s)
        client.ping()
        version = client.info("server").get("redis_version", "?")
    except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
        return "", [f"-broker: {where} refuses these credentials: {exc}"], []
    except redis.exceptions.ResponseError as exc:  # NOAUTH, WRONGPASS from servers that word it so
        return "", [f"-broker: {where} refuses: {exc}"], []
    except REDIS_ERRORS as exc:
        return "", [], [f"-broker: redis unreachable at {where}: {type(exc).__name__}: {exc}"]
    finally:
        if client is not None:
            client.close()
    return f"broker: ok (redis {version} at {where})", [], []


# --- publish and broadcast ----------------------------------------------------------------
def _client(options: argparse.Namespace, config: Config) -> GatewayClient:
    token = options.token or os.environ.get(TOKEN_ENV, "")
    if not token:
        raise UsageError(f"--token: a server token is required (or set {TOKEN_ENV})")
    url = options.url or _own_url(config)
    context = _ssl_context(options.cacert)
    try:
        return GatewayClient(url, token, timeout_s=_duration("--timeout", options.timeout),
                             retries=_count("--retries", options.retries), ssl_context=context)
    except ValueError as exc:
        raise UsageError(f"--url: {exc}") from None


def _own_url(config: Config) -> str:
    """The URL of the gateway these settings describe, as seen from this machine."""
    host = config.listen_host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if config.tls_cert_file else "http"
    return f"{scheme}://{host}:{config.listen_port}"


def _payload(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--payload: not valid JSON: {exc}") from None


def _player(text: str | None) -> int | str | None:
    """A numeric player id goes as a number, like the Go original's backends send it."""
    if text is None:
        return None
    return int(text) if text.isdigit() else text


def _publish(options: argparse.Namespace, config: Config) -> int:
    payload = _payload(options.payload)
    result = _client(options, config).publish(_player(options.player), options.event, payload,
                                              idempotency_key=options.idempotency_key)
    print(json.dumps({"delivered": result.delivered, "queued": result.queued}))
    return 0


def _broadcast(options: argparse.Namespace, config: Config) -> int:
    payload = _payload(options.payload)
    delivered = _client(options, config).broadcast(options.event, payload, _player(options.player),
                                                   idempotency_key=options.idempotency_key)
    print(json.dumps({"delivered": delivered}))
    return 0


def _presence(options: argparse.Namespace, config: Config) -> int:
    print(json.dumps(_client(options, config).presence(_player(options.player))))
    return 0


def _disconnect(options: argparse.Namespace, config: Config) -> int:
    print(json.dumps({"disconnected": _client(options, config).disconnect(_player(options.player))}))
    return 0


# --- listen -------------------------------------------------------------------------------
def _listen(options: argparse.Namespace, config: Config) -> int:
    """Print every message the player receives as one JSON line on stdout (flushed), the
    gateway's frame as it came (with its `"id"` when the gateway keeps a history: each
    reconnect resumes after the last id printed), connection news on stderr; exit 0 on
    SIGINT/SIGTERM, 1 when the gateway refuses the token (401/403) or the request in a way
    retrying cannot help."""
    token = options.token or os.environ.get(PLAYER_TOKEN_ENV, "")
    if not token:
        raise UsageError(f"--token: a player token is required (or set {PLAYER_TOKEN_ENV})")
    max_backoff_s = _duration("--max-backoff", options.max_backoff)
    try:
        listener = PlayerListener(options.url or _own_url(config), token,
                                  timeout_s=_duration("--timeout", options.timeout),
                                  idle_timeout_s=_duration("--idle-timeout", options.idle_timeout),
                                  max_backoff_s=max_backoff_s, backoff_s=min(0.5, max_backoff_s),
                                  ssl_context=_ssl_context(options.cacert), last_event_id=options.last_event_id)
    except ValueError as exc:
        raise UsageError(f"--url: {exc}") from None
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: listener.stop())
    listener.run(lambda text: print(_json_line(text), flush=True),
                 on_status=lambda line: print(f"ws-gateway listen: {line}", file=sys.stderr, flush=True))
    return 0


def _json_line(text: str) -> str:
    """The message as one line of JSON: the gateway's own text when it is that (it always
    is), else the text as a JSON string."""
    try:
        json.loads(text)
    except ValueError:
        return json.dumps(text)
    return text if "\n" not in text and "\r" not in text else json.dumps(json.loads(text), separators=(",", ":"))


def _ssl_context(cacert: str | None) -> ssl.SSLContext | None:
    if not cacert:
        return None
    try:
        return ssl.create_default_context(cafile=cacert)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--cacert: cannot load {cacert!r}: {exc}") from None


def _duration(option: str, text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None
    if seconds <= 0:
        raise UsageError(f"{option}: must be longer than zero")
    return seconds


def _count(option: str, text: str) -> int:
    try:
        return parse_count(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


# --- the parser -------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ws-gateway", allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = commands.add_parser("db", help="the token database", description="The token database.",
                             epilog=_SETTINGS_NOTE, allow_abbrev=False)
    db_actions = db.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = db_actions.add_parser(
        "init", help="create the ws_token table and its index if missing",
        description="Create the ws_token table and its index if they are missing, on sqlite or "
                    "MySQL/MariaDB. Idempotent: an existing table is left as it is.",
        epilog=_SETTINGS_NOTE, allow_abbrev=False)
    init.set_defaults(handler=_db_init)

    token = commands.add_parser("token", help="player and server tokens",
                                description="Add, revoke and list player and server tokens.",
                                epilog=_SETTINGS_NOTE, allow_abbrev=False)
    token_actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = token_actions.add_parser(
        "add", help="create a random token and print it",
        description="Create a random token (32 characters) and print it, and only it, on standard output.",
        epilog="examples:\n  ws-gateway token add --player 21 --ttl 24h\n"
               "  ws-gateway token add --server backend-1 --ttl 365d\n\n" + _SETTINGS_NOTE,
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    who = add.add_mutually_exclusive_group(required=True)
    who.add_argument("--player", metavar="ID",
                     help="a player token: a numeric player id, or a player name (at most 32 bytes)")
    who.add_argument("--server", metavar="SUBJECT", help="a server token for this subject (at most 32 bytes)")
    add.add_argument("--ttl", required=True, metavar="DURATION",
                     help="how long the token is valid: Go duration, e.g. 24h, 90m, 365d")
    add.add_argument("--subject", metavar="NAME",
                     help="subject_id stored for a numeric player (default: the player id)")
    add.set_defaults(handler=_token_add)

    revoke = token_actions.add_parser(
        "revoke", help="delete a token",
        description="Delete a token. The gateway closes live connections holding it (1008) at its next "
                    "revalidation (-revalidate-period). Exit 1 when there is no such token.",
        epilog="A token that starts with '-' goes after '--': ws-gateway token revoke -- -TOKEN\n\n"
               + _SETTINGS_NOTE, allow_abbrev=False)
    revoke.add_argument("token", metavar="TOKEN")
    revoke.set_defaults(handler=_token_revoke)

    listing = token_actions.add_parser(
        "list", help="list tokens (masked)",
        description="List tokens: masked token, kind, player id or subject, expiry (UTC), expired or not.",
        epilog=_SETTINGS_NOTE, allow_abbrev=False)
    listing.add_argument("--show-tokens", action="store_true", help="print whole tokens instead of a prefix")
    listing.add_argument("--kind", choices=("player", "server"), help="only tokens of this kind")
    listing.set_defaults(handler=_token_list)

    commands.add_parser(
        "checkconfig", help="check the settings, the database and Redis",
        description="Check every setting (flags, WS_GATEWAY_* variables, -c FILE, as when serving), "
                    "connect to the database and check the ws_token table's columns and types, and "
                    "with -broker check that Redis answers. Prints the effective settings as "
                    "`name = value` lines (passwords masked), then what was checked as # lines; "
                    "each problem is one line on stderr. Creates nothing.",
        epilog="Exit status: 0 the gateway would start with these settings; 2 a configuration error "
               "(the gateway would exit 2); 1 the database or Redis did not answer.",
        allow_abbrev=False)

    listen = commands.add_parser(
        "listen", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="connect as a player and print each message",
        description="Connect to /ws with a player token and print every message the player receives as "
                    "one JSON line on standard output; connection news goes to standard error. Reconnects "
                    "by itself with capped exponential backoff and jitter and resumes after the last id it "
                    "printed: with a gateway that keeps a history (-history-size) each line carries its "
                    "\"id\" and nothing published meanwhile is lost or printed twice; when the gateway "
                    "cannot resume, its gateway.missed line (\"recovered\": false) comes first. Stops "
                    "cleanly on Ctrl-C or SIGTERM (exit 0). A token the gateway refuses (401/403) exits 1 "
                    "at once.",
        epilog="example:\n  ws-gateway listen --url http://127.0.0.1:8080 --token PLAYER_TOKEN\n"
               "  ws-gateway listen --token PLAYER_TOKEN | jq .payload\n"
               "  ws-gateway listen --token PLAYER_TOKEN "
               "--last-event-id \"$(jq -r 'select(.id) | .id' out.jsonl | tail -n1)\" >> out.jsonl")
    listen.add_argument("--url", help="the gateway's base URL, http(s):// or ws(s):// (default: from the "
                                      "settings' -addr, https with -tls-cert)")
    listen.add_argument("--token", help=f"a player token (default: ${PLAYER_TOKEN_ENV})")
    listen.add_argument("--timeout", default="5s", metavar="DURATION",
                        help="for connecting and the handshake (default 5s)")
    listen.add_argument("--idle-timeout", default="90s", metavar="DURATION",
                        help="reconnect when nothing, not even a ping, arrives this long (default 90s)")
    listen.add_argument("--max-backoff", default="30s", metavar="DURATION",
                        help="longest pause between attempts (default 30s)")
    listen.add_argument("--cacert", metavar="FILE", help="trust this CA (PEM) for a wss:// gateway")
    listen.add_argument("--last-event-id", default="", metavar="ID",
                        help="resume after this id: the \"id\" of the last line an earlier run printed "
                             "(default: none yet: what was queued while the player was offline, then what "
                             "is new)")
    listen.set_defaults(handler=_listen)

    for name, handler in (("publish", _publish), ("broadcast", _broadcast)):
        publish = name == "publish"
        sub = commands.add_parser(
            name, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
            help="send an event to one player" if publish else "send an event to every connected player",
            description=("POST /publish to a running gateway: one event to one player (queued while the "
                         "player is offline). Prints the gateway's answer." if publish else
                         "POST /broadcast to a running gateway: one event to every connected player, or to "
                         "one player's live connections. Prints the gateway's answer."),
            epilog=(f"example:\n  ws-gateway {name} --url http://127.0.0.1:8080 --token SERVER_TOKEN "
                    + ("--player 21 " if publish else "") + "--event e --payload '{\"a\": 1}'\n\n"
                    "Connection errors and 5xx are retried with exponential backoff, 429 after its "
                    "Retry-After; other refusals exit 1 with the gateway's message."))
        _add_connection_options(sub)
        sub.add_argument("--player", required=publish, metavar="ID",
                         help="the player id" if publish else "only this player's live connections")
        sub.add_argument("--event", required=True, help="the event name")
        sub.add_argument("--payload", metavar="JSON", help="the payload, any JSON (default null)")
        sub.add_argument("--idempotency-key", metavar="KEY",
                         help="sent as Idempotency-Key, the same on every retry")
        sub.set_defaults(handler=handler)

    presence = commands.add_parser(
        "presence", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="who is online", description="GET /presence from a running gateway: with PLAYER, that player's "
        "connections; without, how many players and connections are online. With -broker the gateway "
        "answers for the whole cluster. Prints the gateway's answer.",
        epilog="examples:\n  ws-gateway presence --token SERVER_TOKEN        {\"players\": 980, \"connections\": 1423}\n"
               "  ws-gateway presence --token SERVER_TOKEN 21     {\"player_id\": \"21\", \"connections\": 2}")
    _add_connection_options(presence)
    presence.add_argument("player", nargs="?", metavar="PLAYER", help="one player's id")
    presence.set_defaults(handler=_presence)

    disconnect = commands.add_parser(
        "disconnect", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="close a player's connections now",
        description="POST /disconnect to a running gateway: every connection of PLAYER, on every gateway of "
        "the cluster, is closed at once with 4002 (disconnected by the server). Prints how many. The player "
        "may reconnect: to ban it, revoke its token first, then disconnect.",
        epilog="ban a player:\n  ws-gateway token revoke PLAYER_TOKEN\n"
               "  ws-gateway disconnect --token SERVER_TOKEN 21     {\"disconnected\": 2}")
    _add_connection_options(disconnect)
    disconnect.add_argument("player", metavar="PLAYER", help="the player's id")
    disconnect.set_defaults(handler=_disconnect)
    return parser


def _add_connection_options(command: argparse.ArgumentParser) -> None:
    """How the HTTP commands reach the gateway (read by `_client`)."""
    command.add_argument("--url", help="the gateway's base URL (default: from the settings' -addr, "
                                       "https with -tls-cert)")
    command.add_argument("--token", help=f"a server token (default: ${TOKEN_ENV})")
    command.add_argument("--timeout", default="5s", metavar="DURATION", help="per attempt (default 5s)")
    command.add_argument("--retries", default="3", metavar="N", help="retries after the first attempt (default 3)")
    command.add_argument("--cacert", metavar="FILE", help="trust this CA (PEM) for an https gateway")
