#!/usr/bin/env python3
"""A connect storm against one gateway process: N players open their connections within
about a second (`--burst` every `--interval-ms`, as the issue's client does), on sqlite or
MariaDB. Prints how many were admitted and refused (by status), the time until the last
answer, the server's CPU per connect, and how many token queries the gateway sent.

The gateway is `wsgateway.cli.main` of `--project` (default: this checkout; give another
checkout to measure the code before a change) run by this file as `_gateway`, which counts
the statements its SQLAlchemy engines send about `ws_token` and writes the count to a file
on SIGUSR1: a query count cannot be read from outside the process (MariaDB's
performance_schema is off here, and the server's global counters are shared).
Figures are printed, never asserted.

    .venv/bin/python bench/connect_storm.py --players 10000 --db mysql
    .venv/bin/python bench/connect_storm.py --players 10000 --db sqlite --project /path/to/old/checkout
"""
from __future__ import annotations

import os
import sys

if len(sys.argv) > 1 and sys.argv[1] == "_gateway":  # the gateway process: patch before anything else
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from datetime import datetime, timedelta, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
CLOCK_TICKS_S = 1.0 / os.sysconf("SC_CLK_TCK")
MYSQL_SERVER_URL = os.environ.get("WS_GATEWAY_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306")


def gateway_main(project: str, count_file: str, gateway_args: list[str]) -> int:
    sys.path.insert(0, project)
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from wsgateway.cli import main

    statements = {"ws_token": 0}

    def count(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        if "ws_token" in statement:
            statements["ws_token"] += 1

    def report(*args: object) -> None:
        Path(count_file).write_text(json.dumps(statements))

    event.listen(Engine, "before_cursor_execute", count)
    signal.signal(signal.SIGUSR1, report)
    return main(gateway_args)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * CLOCK_TICKS_S


def create_tokens(url: str, count: int) -> list[str]:
    from sqlalchemy import create_engine, text

    sys.path.insert(0, str(PROJECT))
    from wsgateway.tokens import MYSQL_SCHEMA, SQLITE_SCHEMA

    engine = create_engine(url)
    moment = datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(hours=1)
    sqlite = url.startswith("sqlite")
    rows = [{"token": f"storm-{index:07d}", "player_id": index + 1, "subject_id": "s", "is_server": False,
             "expires_at": moment.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else moment} for index in range(count)]
    with engine.begin() as connection:
        for statement in SQLITE_SCHEMA if sqlite else MYSQL_SCHEMA:
            connection.execute(text(statement))
        connection.execute(text("INSERT INTO ws_token (token, player_id, subject_id, is_server, expires_at) "
                                "VALUES (:token, :player_id, :subject_id, :is_server, :expires_at)"), rows)
    engine.dispose()
    return [row["token"] for row in rows]


def storm(port: int, tokens: list[str], burst: int, interval_s: float, timeout_s: float) -> tuple[dict[int, int], float]:
    """Open every connection (raw upgrades, from this process's greenlets); statuses and seconds to the last answer."""
    import gevent
    from gevent import monkey

    monkey.patch_socket()
    statuses: dict[int, int] = {}
    held: list[socket.socket] = []

    def connect(token: str) -> None:
        status = 0
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
            sock.sendall(f"GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
            status = int(head.split(b" ", 2)[1]) if head else 0
            held.append(sock)
        except OSError:
            status = -1
        statuses[status] = statuses.get(status, 0) + 1

    started = time.monotonic()
    greenlets = []
    for start in range(0, len(tokens), burst):
        greenlets += [gevent.spawn(connect, token) for token in tokens[start:start + burst]]
        gevent.sleep(max(0.0, started + (start // burst + 1) * interval_s - time.monotonic()))
    gevent.joinall(greenlets)
    elapsed_s = time.monotonic() - started
    for sock in held:
        sock.close()
    return statuses, elapsed_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--players", type=int, default=10_000)
    parser.add_argument("--db", choices=("sqlite", "mysql"), default="mysql")
    parser.add_argument("--burst", type=int, default=200, help="connections opened at once")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="between two bursts")
    parser.add_argument("--project", default=str(PROJECT), help="the checkout whose gateway is measured")
    parser.add_argument("--gateway-flag", action="append", default=[], metavar="FLAG",
                        help="extra ws-gateway flag, e.g. --gateway-flag=-db-timeout=1s (repeatable)")
    args = parser.parse_args()
    from sqlalchemy import create_engine, text

    directory = Path(tempfile.mkdtemp(prefix="ws-storm-"))
    database = ""
    if args.db == "sqlite":
        url = f"sqlite:///{directory / 'tokens.db'}"
    else:
        database = f"wsgw_storm_{uuid.uuid4().hex[:8]}"
        with create_engine(MYSQL_SERVER_URL, isolation_level="AUTOCOMMIT").connect() as connection:
            connection.execute(text(f"CREATE DATABASE {database}"))
        url = f"{MYSQL_SERVER_URL}/{database}"
    try:
        tokens = create_tokens(url, args.players)
        port = free_port()
        count_file = directory / "queries.json"
        gateway = subprocess.Popen(
            [sys.executable, __file__, "_gateway", args.project, str(count_file),
             "-addr", f"127.0.0.1:{port}", "-db", args.db, "-dsn", url, "-max-conns", "0", "-log-level", "warning",
             "-log-file", str(directory / "gateway.log"), *args.gateway_flag], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the gateway did not start")
                time.sleep(0.05)
        cpu_before = process_cpu_s(gateway.pid)
        statuses, elapsed_s = storm(port, tokens, args.burst, args.interval_ms / 1000, timeout_s=30)
        cpu_s = process_cpu_s(gateway.pid) - cpu_before
        gateway.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not count_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        queries = json.loads(count_file.read_text())["ws_token"] if count_file.exists() else -1
        gateway.terminate()
        gateway.wait(timeout=30)
        admitted = statuses.pop(101, 0)
        print(f"project            {args.project}")
        print(f"database           {args.db}")
        print(f"players            {args.players} ({args.burst} every {args.interval_ms:g} ms)")
        print(f"admitted           {admitted}")
        print(f"refused            {sum(statuses.values())} {json.dumps(statuses) if statuses else ''}")
        print(f"last answer after  {elapsed_s:.2f} s")
        print(f"server CPU         {cpu_s:.2f} s ({cpu_s / args.players * 1e6:.0f} us per connect)")
        print(f"token queries      {queries} (schema check and readiness included)")
    finally:
        if database:
            with create_engine(MYSQL_SERVER_URL, isolation_level="AUTOCOMMIT").connect() as connection:
                connection.execute(text(f"DROP DATABASE IF EXISTS {database}"))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_gateway":
        sys.exit(gateway_main(sys.argv[2], sys.argv[3], sys.argv[4:]))
    sys.exit(main())
