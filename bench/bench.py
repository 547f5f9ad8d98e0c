#!/usr/bin/env python3
"""Benchmark one ws-gateway process the way the Go ws-server was measured.

Starts `bin/ws-gateway` (sqlite, rate limit off) in a fresh temporary directory, opens the
player connections from separate client processes (plain non-blocking sockets and epoll:
no gevent, no framework, so the load generator stays cheap; its own CPU time is printed
next to the server's), then runs these scenarios and prints one figure per line:

* memory: resident memory per idle connection (RSS growth / connections);
* fan-out: `--connections` players x `--broadcasts` broadcasts of ~150 B, deliveries/s
  from the first broadcast sent to the last frame received, and server CPU per delivery;
* publish: `POST /publish` to one connected player, keep-alive, `--publishers` concurrent
  connections, requests/s (the Go figure was taken with wrk; `--wrk` adds a wrk run);
* batch: `POST /publish/batch` of `--batch-size` messages to random players, messages/s;
* latency: `--latency-rate` publishes/s to random players, publish-to-receipt p50/p99;
* hold: `--hold` connections in total (the rest opened now), RSS per connection, and one
  broadcast to all of them;
* scaleout: the fan-out again over the Redis broker (`--redis`): one gateway process, then
  `-workers 2` on one port, then the publisher on one gateway and every player on another;
* history: run any of these with `--gateway-flag=-history-size=100` (messages kept for
  resuming) and `--ids` (players ask for ids), against the same run without;
* connect, storm, stop, publish_close: a connection's life, each on gateways of its own
  (bench/lifecycle.py): `--storm-players` players opening their connections, reconnecting
  after a restart, and a graceful stop; `/publish` with a new connection per request.

`--mysql URL` keeps the tokens in a fresh MariaDB database instead of sqlite (scale-out
stays on sqlite).

Figures are printed, never asserted. A progress line on stderr shows what runs.

    .venv/bin/python bench/bench.py                      # the issue's configuration
    .venv/bin/python bench/bench.py --connections 50 --broadcasts 5 --duration-s 1 --hold 0
    .venv/bin/python bench/bench.py --scenarios connect,storm,stop --mysql mysql+pymysql://root@127.0.0.1:3306

The clients are this file run again as `bench.py _worker ws|http SPEC`; they talk to the
coordinator in JSON lines on stdin/stdout. Publish-to-receipt latency uses
CLOCK_MONOTONIC, which every process on the machine shares.
"""
from __future__ import annotations

import argparse
import errno
import http.client
import json
import os
import random
import select
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

PROJECT = Path(__file__).resolve().parent.parent
GATEWAY_BIN = PROJECT / "bin" / "ws-gateway"
CLOCK_TICKS_S = 1.0 / os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")

# The Go ws-server's figures on a 2-core machine, and this goals (None: no goal).
GO_FIGURES = {
    "fanout_deliveries_per_s": 72_000, "fanout_cpu_us_per_delivery": 11.7,
    "kib_per_idle_connection": 35.8, "publish_requests_per_s": 11_300,
    # issue 12, same machine, sqlite: 10,000 players; the storm counts failed reconnects
    "connect_s": 2.9, "connect_cpu_us_per_connection": 250.0, "storm_s": 3.9, "storm_failed_attempts": 0,
    "stop_s": 0.2, "publish_close_requests_per_s": 5_800,
}
GOALS = {
    "fanout_deliveries_per_s": (">=", 94_000), "fanout_cpu_us_per_delivery": ("<=", 3.5),
    "kib_per_idle_connection": ("<=", 24.0), "publish_requests_per_s": (">=", 5_500),
    "batch_messages_per_s": (">=", 55_000), "latency_p99_ms": ("<", 20.0),
    "hold_connections": (">=", 10_000),
    "connect_s": ("<=", 2.9), "connect_cpu_us_per_connection": ("<=", 250.0), "storm_s": ("<=", 3.9),
    "storm_failed_attempts": ("<=", 0), "stop_s": ("<=", 1.0), "publish_close_requests_per_s": (">=", 5_800),
}
CLASSIC_SCENARIOS = ("memory", "fanout", "publish", "batch", "latency", "hold", "scaleout")
LIFECYCLE_SCENARIOS = ("connect", "storm", "stop", "publish_close")
DEFAULT_SCENARIOS = ",".join(CLASSIC_SCENARIOS + LIFECYCLE_SCENARIOS)


# --- the coordinator ---------------------------------------------------------------------------
_last_progress = [0.0]


def progress(text: str) -> None:
    """One progress line on a terminal, rewritten in place; elsewhere a line every 2 s."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K[bench] {text}" if text else "\r\033[K")
    elif text and time.monotonic() - _last_progress[0] >= 2.0:
        _last_progress[0] = time.monotonic()
        sys.stderr.write(f"[bench] {text}\n")
    sys.stderr.flush()


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live children (a `-workers`
    supervisor's workers), from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    own_s = (int(fields[11]) + int(fields[12])) * CLOCK_TICKS_S
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            children = [int(child) for child in handle.read().split()]
    except OSError:
        children = []
    return own_s + sum(process_cpu_s(child) for child in children)


def process_cpu_split_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process, from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) * CLOCK_TICKS_S, int(fields[12]) * CLOCK_TICKS_S


def process_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * PAGE_BYTES


class GatewayUnderBench:
    """bin/ws-gateway in a temporary directory, with `players` player tokens and a server token.

    `mysql_url` (a server's SQLAlchemy URL): the tokens go into a fresh database there,
    dropped by `drop_database`; else into a sqlite file in `directory`. `port` and
    `tokens_from`: a second process on another's port and database (a restart), which is
    not waited for (`ready_s` then stays None)."""

    def __init__(self, directory: Path, players: int, extra_flags: list[str], *, mysql_url: str | None = None,
                 port: int | None = None, tokens_from: GatewayUnderBench | None = None,
                 listener: socket.socket | None = None) -> None:
        """`listener`: a listening socket handed to the gateway as systemd's socket
        activation does (descriptor 3, LISTEN_PID, LISTEN_FDS); the bench keeps it open."""
        self.directory = directory
        self.listener = listener
        self.db_path = directory / "tokens.db"
        self.port = listener.getsockname()[1] if listener is not None else port or _free_port()
        self.server_token = "bench-server-token"
        self.player_tokens = [f"bench-player-{index:07d}" for index in range(1, players + 1)]
        self.mysql_url = tokens_from.mysql_url if tokens_from is not None else mysql_url
        self.database = tokens_from.database if tokens_from is not None else f"wsgw_bench_{os.getpid()}_{self.port}"
        if tokens_from is not None:
            self.db_path = tokens_from.db_path
        elif self.mysql_url:
            self._write_mysql_tokens()
        else:
            self._write_tokens()
        database_flags = (["-db", "mysql", "-dsn", f"{self.mysql_url}/{self.database}"] if self.mysql_url
                          else ["-dsn", f"file:{self.db_path}?cache=shared"])
        self.log_path = directory / "gateway.log"
        self.ready_s: float | None = None  # from the process's start to its first /healthz answer
        started = time.monotonic()
        with open(directory / "stderr.txt", "a") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(GATEWAY_BIN), "-addr", f"127.0.0.1:{self.port}", *database_flags,
                 "-rate-limit", "0", "-max-conns", "0",
                 "-log-level", "warning", "-log-file", str(self.log_path), *extra_flags],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, cwd=directory,
                **_socket_activation(listener))
        if tokens_from is None:
            self._wait_ready()
            self.ready_s = time.monotonic() - started

    def _token_rows(self) -> tuple[str, list[tuple[str, int, str]]]:
        expires_at = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%d %H:%M:%S")
        return expires_at, [(token, index, expires_at) for index, token in enumerate(self.player_tokens, 1)]

    def _write_tokens(self) -> None:
        sys.path.insert(0, str(PROJECT))
        from wsgateway.tokens import SQLITE_SCHEMA  # the gateway's own schema, no copy of it
        expires_at, rows = self._token_rows()
        with sqlite3.connect(self.db_path) as database:
            for statement in SQLITE_SCHEMA:
                database.execute(statement)
            database.execute("INSERT INTO ws_token VALUES (?, NULL, 'bench-server', 1, ?)",
                             (self.server_token, expires_at))
            database.executemany("INSERT INTO ws_token VALUES (?, ?, 'bench-player', 0, ?)", rows)

    def _write_mysql_tokens(self) -> None:
        sys.path.insert(0, str(PROJECT))
        from sqlalchemy import create_engine, text

        from wsgateway.tokens import MYSQL_SCHEMA
        expires_at, rows = self._token_rows()
        server = create_engine(self.mysql_url, isolation_level="AUTOCOMMIT")
        with server.connect() as connection:
            connection.execute(text(f"CREATE DATABASE `{self.database}`"))
        server.dispose()
        engine = create_engine(f"{self.mysql_url}/{self.database}")
        with engine.begin() as connection:
            for statement in MYSQL_SCHEMA:
                connection.execute(text(statement))
            connection.execute(text("INSERT INTO ws_token VALUES (:token, NULL, 'bench-server', 1, :expires_at)"),
                               {"token": self.server_token, "expires_at": expires_at})
            connection.execute(text("INSERT INTO ws_token VALUES (:token, :player, 'bench-player', 0, :expires_at)"),
                               [{"token": token, "player": player, "expires_at": expires}
                                for token, player, expires in rows])
        engine.dispose()

    def drop_database(self) -> None:
        """Drop the MariaDB database this gateway's tokens were written to (if any)."""
        if not self.mysql_url:
            return
        from sqlalchemy import create_engine, text

        server = create_engine(self.mysql_url, isolation_level="AUTOCOMMIT")
        with server.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS `{self.database}`"))
        server.dispose()

    def player_id(self, token: str) -> int:
        return int(token.rsplit("-", 1)[1])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"ws-gateway exited: {(self.directory / 'stderr.txt').read_text()}")
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.01)
        raise SystemExit("ws-gateway did not answer /healthz within 30 s")

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            headers = {"Authorization": f"Bearer {self.server_token}"}
            connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            response = connection.getresponse()
            data = response.read()
            return response.status, json.loads(data) if data[:1] in (b"{", b"[") else data
        finally:
            connection.close()

    @property
    def cpu_s(self) -> float:
        return process_cpu_s(self.process.pid)

    @property
    def rss_bytes(self) -> int:
        return process_rss_bytes(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _socket_activation(listener: socket.socket | None) -> dict[str, Any]:
    """Popen's arguments that pass `listener` as systemd does: descriptor 3, and in the
    child's environment LISTEN_FDS=1 and LISTEN_PID, its own pid (known only after fork)."""
    if listener is None:
        return {}
    descriptor = listener.fileno()

    def in_child() -> None:
        os.dup2(descriptor, 3)
        os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
    return {"pass_fds": (3,), "preexec_fn": in_child}


def listening_socket() -> socket.socket:
    """A listening socket on a free loopback port, as a systemd socket unit holds one."""
    sys.path.insert(0, str(PROJECT))
    from wsgateway.listening import bind_listener  # the gateway's own backlog and options

    return bind_listener("127.0.0.1", 0)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Worker:
    """A client process: `SCRIPT` (this file) run as `_worker KIND SPEC`, JSON lines both ways."""

    SCRIPT = Path(__file__).resolve()

    def __init__(self, kind: str, spec: dict[str, Any]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(self.SCRIPT), "_worker", kind, json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"a bench client exited with {self.process.wait()}")
        return json.loads(line)

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        self.send(command)
        return self.receive()

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


class Bench:
    def __init__(self, args: argparse.Namespace, gateway: GatewayUnderBench,
                 publisher: GatewayUnderBench | None = None) -> None:
        """`publisher`: the gateway the broadcasts are sent to, when not `gateway` (which
        holds the connections)."""
        self.args = args
        self.gateway = gateway
        self.publisher = publisher or gateway
        self.results: dict[str, float] = {}
        self.notes: dict[str, str] = {}
        self.ws_workers: list[Worker] = []
        self.connected_tokens: list[str] = []

    # --- connections -------------------------------------------------------------------------
    def open_connections(self, tokens: list[str], per_worker: int) -> None:
        """Open one connection per token, spread over client processes of `per_worker` each."""
        new_workers = []
        for start in range(0, len(tokens), per_worker):
            worker = Worker("ws", {"port": self.gateway.port, "tokens": tokens[start:start + per_worker],
                                   "transport": self.args.transport,
                                   "query": "&last_event_id=" if self.args.ids else ""})
            new_workers.append(worker)
        opened = 0
        for worker in new_workers:
            reply = worker.receive()
            if reply.get("error"):
                raise SystemExit(f"bench client could not connect: {reply['error']}")
            opened += reply["connected"]
            progress(f"connections: {len(self.connected_tokens) + opened} open")
        self.ws_workers += new_workers
        self.connected_tokens += tokens

    def ws_stats(self) -> list[dict[str, Any]]:
        for worker in self.ws_workers:
            worker.send({"cmd": "stats"})
        return [worker.receive() for worker in self.ws_workers]

    def wait_frames(self, expected: int, label: str, timeout_s: float = 120) -> tuple[float, float]:
        """Wait until the clients received `expected` text frames in total (counted from the
        last reset); return (monotonic time of the last frame, clients' CPU seconds)."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.ws_stats()
            received = sum(stat["frames"] for stat in stats)
            progress(f"{label}: {received:,}/{expected:,} frames received")
            if received >= expected:
                return max(stat["last_rx"] for stat in stats), sum(stat["cpu_s"] for stat in stats)
            if time.monotonic() > deadline:
                raise SystemExit(f"{label}: only {received} of {expected} frames arrived")
            time.sleep(0.02)

    def reset_counters(self, latency: bool = False) -> None:
        for worker in self.ws_workers:
            worker.send({"cmd": "reset", "latency": latency})
        for worker in self.ws_workers:
            worker.receive()

    # --- scenarios ----------------------------------------------------------------------------
    def memory(self) -> None:
        """RSS per idle connection: the RSS growth from opening `--connections` sockets."""
        # Warm every code path first, so that imports and caches are not billed to sockets.
        self.gateway.request("POST", "/publish", {"player_id": "nobody", "event": "warm"})
        self.gateway.request("POST", "/broadcast", {"event": "warm"})
        self.gateway.request("GET", "/metrics")
        warm = self.gateway.player_tokens[-1:]
        self.open_connections(warm, 1)  # one connection's code paths warmed too
        time.sleep(0.5)
        before = self.gateway.rss_bytes
        count = self.args.connections
        self.open_connections(self.gateway.player_tokens[:count], self.args.connections_per_client)
        time.sleep(1.0)
        after = self.gateway.rss_bytes
        per_connection_kib = (after - before) / count / 1024
        self.results["kib_per_idle_connection"] = per_connection_kib
        self.notes["kib_per_idle_connection"] = (
            f"{count:,} connections, RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
        self.report("memory", f"{per_connection_kib:.1f} KiB per idle connection ({self.notes['kib_per_idle_connection']})")

    def fanout(self, key: str = "fanout", label: str = "fan-out") -> None:
        """`--broadcasts` broadcasts to every connection, sent back to back on one keep-alive
        connection; the best of `--rounds` rounds. Results are stored under `key`."""
        connections = len(self.connected_tokens)
        expected = connections * self.args.broadcasts
        payload = {"round": 0, "text": "x" * 100}  # a frame of ~150 bytes
        rates, cpus, client_cpus = [], [], []
        for round_index in range(self.args.rounds):
            self.reset_counters()
            connection = http.client.HTTPConnection("127.0.0.1", self.publisher.port, timeout=60)
            headers = {"Authorization": f"Bearer {self.gateway.server_token}", "Content-Type": "application/json"}
            cpu_before = self.gateway.cpu_s + (self.publisher.cpu_s if self.publisher is not self.gateway else 0.0)
            started = time.monotonic()
            for index in range(self.args.broadcasts):
                payload["round"] = index
                connection.request("POST", "/broadcast", json.dumps({"event": "fanout", "payload": payload}),
                                   headers)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    raise SystemExit(f"/broadcast answered {response.status}")
            connection.close()
            last_rx, client_cpu = self.wait_frames(expected, f"{label} round {round_index + 1}/{self.args.rounds}")
            cpu = self.gateway.cpu_s + (self.publisher.cpu_s if self.publisher is not self.gateway else 0.0) - cpu_before
            rates.append(expected / (last_rx - started))
            cpus.append(cpu / expected * 1e6)
            client_cpus.append(client_cpu / expected * 1e6)
        best = max(range(len(rates)), key=rates.__getitem__)
        self.results[f"{key}_deliveries_per_s"] = rates[best]
        self.results[f"{key}_cpu_us_per_delivery"] = min(cpus)
        self.notes[f"{key}_deliveries_per_s"] = (
            f"{connections:,} connections x {self.args.broadcasts} broadcasts; rounds: "
            + ", ".join(f"{rate:,.0f}" for rate in rates))
        self.notes[f"{key}_cpu_us_per_delivery"] = (
            "rounds: " + ", ".join(f"{cpu:.2f}" for cpu in cpus)
            + f"; clients' CPU {statistics.median(client_cpus):.2f} µs/delivery")
        self.report(label, f"{rates[best]:,.0f} deliveries/s, server CPU {min(cpus):.2f} µs/delivery "
                           f"({self.notes[f'{key}_deliveries_per_s']}; {self.notes[f'{key}_cpu_us_per_delivery']})")

    def http_load(self, label: str, spec: dict[str, Any], publishers: int = 0) -> dict[str, float]:
        """Run `--http-clients` HTTP client processes sharing `publishers` connections
        (by default `--publishers`)."""
        publishers = publishers or self.args.publishers
        processes = max(1, min(self.args.http_clients, publishers))
        workers = []
        for index in range(processes):
            share = publishers // processes + (index < publishers % processes)
            workers.append(Worker("http", {**spec, "port": self.gateway.port, "token": self.gateway.server_token,
                                           "connections": share, "seed": index,
                                           "processes": processes}))
        for worker in workers:
            worker.receive()  # connected
        cpu_before = self.gateway.cpu_s
        for worker in workers:
            worker.send({"cmd": "go"})
        duration_s = spec["duration_s"]
        started = time.monotonic()
        while time.monotonic() - started < duration_s:
            progress(f"{label}: {time.monotonic() - started:.1f}/{duration_s:.0f} s")
            time.sleep(0.25)
        results = [worker.receive() for worker in workers]
        server_cpu = self.gateway.cpu_s - cpu_before
        for worker in workers:
            worker.stop()
        total = {key: sum(result[key] for result in results) for key in ("requests", "messages", "errors", "cpu_s")}
        total["elapsed_s"] = max(result["elapsed_s"] for result in results)
        total["server_cpu_s"] = server_cpu
        if total["errors"]:
            raise SystemExit(f"{label}: {total['errors']} requests were not answered 200: "
                             f"{[result.get('first_error') for result in results]}")
        return total

    def publish_rate(self) -> None:
        target = self.gateway.player_id(self.connected_tokens[0])
        total = self.http_load("publish", {"mode": "publish", "players": [target],
                                           "duration_s": self.args.duration_s})
        rate = total["requests"] / total["elapsed_s"]
        self.results["publish_requests_per_s"] = rate
        self.notes["publish_requests_per_s"] = (
            f"{self.args.publishers} keep-alive connections, server CPU "
            f"{total['server_cpu_s'] / total['requests'] * 1e6:.0f} µs/request, clients' CPU "
            f"{total['cpu_s'] / total['requests'] * 1e6:.0f} µs/request")
        self.report("publish", f"{rate:,.0f} requests/s ({self.notes['publish_requests_per_s']})")
        self.drain_publish_frames(total["messages"])
        if self.args.wrk:
            self.publish_rate_wrk(target)

    def publish_rate_wrk(self, target: int) -> None:
        wrk = shutil.which("wrk")
        if wrk is None:
            self.report("publish (wrk)", "skipped: wrk is not installed (apt-get install -y wrk)")
            return
        script = self.gateway.directory / "publish.lua"
        body = json.dumps({"player_id": target, "event": "wrk", "payload": {"text": "x" * 100}})
        script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                          f'wrk.headers["Authorization"] = "Bearer {self.gateway.server_token}"\n'
                          'wrk.headers["Content-Type"] = "application/json"\n')
        self.reset_counters()
        progress("publish (wrk): running")
        output = subprocess.run(
            [wrk, "-t2", f"-c{self.args.publishers}", f"-d{int(self.args.duration_s)}s", "-s", str(script),
             f"http://127.0.0.1:{self.gateway.port}/publish"], capture_output=True, text=True, check=True).stdout
        line = next((line for line in output.splitlines() if line.startswith("Requests/sec")), "Requests/sec: ?")
        non_2xx = next((line.strip() for line in output.splitlines() if "Non-2xx" in line), "")
        self.results["publish_requests_per_s_wrk"] = float(line.split(":")[1]) if "?" not in line else 0.0
        self.report("publish (wrk)", f"{line.split(':')[1].strip()} requests/s {non_2xx}".strip())

    def drain_publish_frames(self, published: int) -> None:
        """Let the player's socket catch up, so the next scenario starts from quiet."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sum(stat["frames"] for stat in self.ws_stats()) >= published:
                return
            time.sleep(0.05)

    def batch_rate(self) -> None:
        players = [self.gateway.player_id(token) for token in self.connected_tokens]
        self.reset_counters()
        total = self.http_load("batch", {"mode": "batch", "players": players, "batch_size": self.args.batch_size,
                                         "duration_s": self.args.duration_s})
        rate = total["messages"] / total["elapsed_s"]
        self.results["batch_messages_per_s"] = rate
        self.notes["batch_messages_per_s"] = (
            f"{self.args.batch_size} messages per request to random players among {len(players):,}, "
            f"{self.args.publishers} connections, server CPU "
            f"{total['server_cpu_s'] / total['messages'] * 1e6:.1f} µs/message")
        self.report("batch", f"{rate:,.0f} messages/s ({self.notes['batch_messages_per_s']})")
        self.drain_publish_frames(total["messages"])

    def latency(self) -> None:
        players = [self.gateway.player_id(token) for token in self.connected_tokens]
        self.reset_counters(latency=True)
        total = self.http_load("latency", {"mode": "latency", "players": players, "rate": self.args.latency_rate,
                                           "duration_s": self.args.duration_s}, self.args.latency_publishers)
        self.drain_publish_frames(total["messages"])
        latencies: list[float] = []
        for worker in self.ws_workers:
            latencies += worker.ask({"cmd": "latencies"})["latencies"]
        self.reset_counters()
        if not latencies:
            raise SystemExit("latency: no message arrived")
        latencies.sort()
        p50 = latencies[len(latencies) // 2] * 1e3
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3
        achieved = total["messages"] / total["elapsed_s"]
        self.results["latency_p99_ms"] = p99
        self.notes["latency_p99_ms"] = (
            f"{achieved:,.0f} publishes/s sent (asked {self.args.latency_rate:,}, {self.args.latency_publishers} "
            f"connections) to random players among "
            f"{len(players):,}; p50 {p50:.2f} ms, max {latencies[-1] * 1e3:.1f} ms, {len(latencies):,} received; "
            f"server CPU {total['server_cpu_s'] / max(1, total['requests']) * 1e6:.0f} µs/publish")
        self.report("latency", f"p99 {p99:.2f} ms ({self.notes['latency_p99_ms']})")

    def hold(self) -> None:
        """Top up to `--hold` connections, measure RSS per connection, broadcast to all."""
        target = self.args.hold
        missing = target - len(self.connected_tokens)
        if missing > 0:
            self.open_connections(self.gateway.player_tokens[len(self.connected_tokens):target],
                                  self.args.connections_per_client)
        time.sleep(1.0)
        rss = self.gateway.rss_bytes
        self.reset_counters()
        status, body = self.gateway.request("POST", "/broadcast", {"event": "hold", "payload": None})
        delivered = body.get("delivered", 0) if status == 200 else 0
        self.wait_frames(len(self.connected_tokens), "hold: broadcast")
        self.results["hold_connections"] = float(delivered)
        self.notes["hold_connections"] = (
            f"one broadcast delivered to {delivered:,}; RSS {rss / 2**20:.0f} MiB "
            f"(baseline included), {rss / len(self.connected_tokens) / 1024:.1f} KiB per connection")
        self.report("hold", f"{len(self.connected_tokens):,} connections held ({self.notes['hold_connections']})")

    def report(self, scenario: str, text: str) -> None:
        progress("")
        print(f"{scenario:>14}: {text}   [load {load_average()}]", flush=True)

    def close(self) -> None:
        for worker in self.ws_workers:
            worker.stop()


def scale_out(args: argparse.Namespace, directory: Path) -> dict[str, float]:
    """The fan-out over the Redis broker, three ways: one gateway process; `-workers 2`
    on one port; and broadcasts sent to gateway A while every player is on gateway B."""
    results: dict[str, float] = {}
    players = args.connections + 1
    cluster = f"wsgw-bench-{os.getpid()}-{int(time.time())}"

    def gateway(name: str, prefix: str, *flags: str) -> GatewayUnderBench:
        home = directory / name
        home.mkdir()
        return GatewayUnderBench(home, players, ["-broker", args.redis, "-broker-prefix", prefix,
                                                 *flags, *args.gateway_flag])

    for key, label, flags in (("scaleout_1_worker", "1 worker", ()),
                              ("scaleout_2_workers", "2 workers", ("-workers", "2"))):
        single = gateway(key, f"{cluster}-{key}", *flags)
        bench = Bench(args, single)
        try:
            bench.open_connections(single.player_tokens[:args.connections], args.connections_per_client)
            bench.fanout(key, f"redis, {label}")
            results.update(bench.results)
        finally:
            bench.close()
            single.stop()
    publisher = gateway("scaleout_a", f"{cluster}-cross")
    holder = gateway("scaleout_b", f"{cluster}-cross")
    bench = Bench(args, holder, publisher=publisher)
    try:
        bench.open_connections(holder.player_tokens[:args.connections], args.connections_per_client)
        bench.fanout("scaleout_cross", "redis, A -> B")
        results.update(bench.results)
    finally:
        bench.close()
        holder.stop()
        publisher.stop()
        _forget_cluster(args.redis, cluster)
    return results


def _forget_cluster(url: str, prefix: str) -> None:
    """Delete what the bench's gateways left in Redis."""
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def print_summary(results: dict[str, float], cores: int) -> None:
    labels = {
        "fanout_deliveries_per_s": ("fan-out deliveries/s", "{:,.0f}"),
        "fanout_cpu_us_per_delivery": ("server CPU µs/delivery", "{:.2f}"),
        "kib_per_idle_connection": ("KiB per idle connection", "{:.1f}"),
        "hold_connections": ("connections held", "{:,.0f}"),
        "publish_requests_per_s": ("/publish requests/s", "{:,.0f}"),
        "publish_requests_per_s_wrk": ("/publish requests/s (wrk)", "{:,.0f}"),
        "batch_messages_per_s": ("batch messages/s", "{:,.0f}"),
        "latency_p99_ms": ("latency p99 ms", "{:.2f}"),
        "connect_s": ("connect: all open, s", "{:.2f}"),
        "connect_cpu_us_per_connection": ("connect: server CPU µs/conn", "{:.0f}"),
        "connect_failed_attempts": ("connect: failed attempts", "{:,.0f}"),
        "storm_s": ("storm: all back, s", "{:.2f}"),
        "storm_failed_attempts": ("storm: failed attempts", "{:,.0f}"),
        "storm_cpu_us_per_reconnect": ("storm: new process µs/conn", "{:.0f}"),
        "stop_s": ("stop: process exited, s", "{:.2f}"),
        "publish_close_requests_per_s": ("/publish, no keep-alive, req/s", "{:,.0f}"),
        "scaleout_1_worker_deliveries_per_s": ("redis 1 worker deliveries/s", "{:,.0f}"),
        "scaleout_1_worker_cpu_us_per_delivery": ("redis 1 worker µs/delivery", "{:.2f}"),
        "scaleout_2_workers_deliveries_per_s": ("redis 2 workers deliveries/s", "{:,.0f}"),
        "scaleout_2_workers_cpu_us_per_delivery": ("redis 2 workers µs/delivery", "{:.2f}"),
        "scaleout_cross_deliveries_per_s": ("redis A->B deliveries/s", "{:,.0f}"),
        "scaleout_cross_cpu_us_per_delivery": ("redis A->B µs/delivery", "{:.2f}"),
    }
    width = max(len(label) for label, _ in labels.values())
    print(f"\nsummary ({cores} cores, load {load_average()}):")
    print(f"| {'figure':<{width}} | {'measured':>10} | {'Go ws-server':>12} | {'goal':>10} | met |")
    print(f"|{'-' * (width + 2)}|{'-' * 12}|{'-' * 14}|{'-' * 12}|-----|")
    for key, (label, form) in labels.items():
        if key not in results:
            continue
        go = GO_FIGURES.get(key)
        goal = GOALS.get(key)
        met = ""
        if goal is not None:
            sign, bound = goal
            met = "yes" if {">=": results[key] >= bound, "<=": results[key] <= bound,
                            "<": results[key] < bound}[sign] else "no"
        print(f"| {label:<{width}} | {form.format(results[key]):>10} | "
              f"{form.format(go) if go is not None else '':>12} | "
              f"{f'{goal[0]} {form.format(goal[1])}' if goal else '':>10} | {met:>3} |")


def add_options(parser: argparse.ArgumentParser, default_scenarios: str) -> None:
    """The options of bench.py, which lifecycle.py shares."""
    parser.add_argument("--connections", type=int, default=2000, help="players connected for fan-out and memory")
    parser.add_argument("--broadcasts", type=int, default=50, help="broadcasts per fan-out round")
    parser.add_argument("--rounds", type=int, default=3, help="fan-out rounds (the best is reported)")
    parser.add_argument("--publishers", type=int, default=16, help="concurrent keep-alive publishing connections")
    parser.add_argument("--http-clients", type=int, default=2, help="processes the publishers are spread over")
    parser.add_argument("--batch-size", type=int, default=100, help="messages per /publish/batch request")
    parser.add_argument("--latency-rate", type=int, default=5000, help="publishes per second in the latency run")
    parser.add_argument("--latency-publishers", type=int, default=64,
                        help="keep-alive connections of the latency run: enough that the rate is kept "
                             "while some answers are slow (each carries one request at a time)")
    parser.add_argument("--duration-s", type=float, default=5.0, help="length of each HTTP scenario")
    parser.add_argument("--hold", type=int, default=10_000, help="connections to hold at the end (0: skip)")
    parser.add_argument("--connections-per-client", type=int, default=2500, help="connections per client process")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis for the scaleout scenario")
    parser.add_argument("--scenarios", default=default_scenarios,
                        help="comma-separated subset to run (memory always opens the connections for the "
                             "first seven; " + ", ".join(LIFECYCLE_SCENARIOS) + ": see bench/lifecycle.py)")
    parser.add_argument("--storm-players", type=int, default=10_000,
                        help="players of the connect, storm and stop scenarios")
    parser.add_argument("--mysql", metavar="SERVER_URL", default="",
                        help="tokens in a fresh database on this MariaDB server (dropped at the end) instead of "
                             "sqlite, e.g. mysql+pymysql://root@127.0.0.1:3306")
    parser.add_argument("--wrk", action="store_true", help="also measure /publish with wrk, if installed")
    parser.add_argument("--gateway-flag", action="append", default=[], metavar="FLAG",
                        help="extra ws-gateway flag, e.g. --gateway-flag=-max-outbox=8192 (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (gateway log)")
    parser.add_argument("--transport", choices=("websocket", "sse"), default="websocket",
                        help="how the players connect: /ws, or /events (Server-Sent Events)")
    parser.add_argument("--ids", action="store_true",
                        help="players connect with last_event_id= (frames with ids; give the gateway "
                             "--gateway-flag=-history-size=N to keep a history)")
    parser.add_argument("--socket-activation", action="store_true",
                        help="connect, storm, stop: the bench holds the listening socket and hands it to each "
                             "gateway process as systemd's socket activation does (etc/ws-gateway.socket)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, DEFAULT_SCENARIOS)
    args = parser.parse_args(argv)
    scenarios = set(args.scenarios.split(","))

    cores = os.cpu_count() or 0
    print(f"ws-gateway bench: {cores} cores, load {load_average()}, python {sys.version.split()[0]}, "
          f"db {'mysql' if args.mysql else 'sqlite'}", flush=True)
    directory = Path(tempfile.mkdtemp(prefix="ws-gateway-bench-"))
    results: dict[str, float] = {}
    try:
        if scenarios & set(CLASSIC_SCENARIOS[:-1]):
            results.update(classic(args, directory, scenarios))
        if "scaleout" in scenarios:
            results.update(scale_out(args, directory))
        if scenarios & set(LIFECYCLE_SCENARIOS):
            import lifecycle  # bench/lifecycle.py, beside this file

            results.update(lifecycle.run(args, directory, scenarios))
    finally:
        progress("")
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    print_summary(results, cores)
    return 0


def classic(args: argparse.Namespace, directory: Path, scenarios: set[str]) -> dict[str, float]:
    """The scenarios on one gateway that holds `--connections` players (opened by memory)."""
    players = max(args.connections, args.hold) + 1
    gateway = GatewayUnderBench(directory, players, args.gateway_flag, mysql_url=args.mysql)
    bench = Bench(args, gateway)
    try:
        bench.memory()
        if "fanout" in scenarios:
            bench.fanout()
        if "publish" in scenarios:
            bench.publish_rate()
        if "batch" in scenarios:
            bench.batch_rate()
        if "latency" in scenarios:
            bench.latency()
        if "hold" in scenarios and args.hold:
            bench.hold()
    finally:
        bench.close()
        gateway.stop()
        gateway.drop_database()
    return bench.results


# --- the client processes ----------------------------------------------------------------------
class _Commands:
    """Non-blocking JSON-line commands from the coordinator on stdin."""

    def __init__(self) -> None:
        os.set_blocking(0, False)
        self._pending = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            return []
        if not data:
            return [{"cmd": "quit"}]
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


def _reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame with an all-zero mask (valid, and nothing to XOR)."""
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


class _PlayerSocket:
    __slots__ = ("sock", "buffer")

    def __init__(self, sock: socket.socket, buffer: bytes) -> None:
        self.sock = sock
        self.buffer = buffer


UPGRADE_REQUEST = ("GET /ws?token={token}{query} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
STREAM_REQUEST = "GET /events?token={token}{query} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n"


def ws_worker(spec: dict[str, Any]) -> None:
    """Hold one WebSocket (or event stream, with `"transport": "sse"`) per token; count the
    messages received; answer pings; on request, take the publish time out of latency
    messages."""
    port, tokens, query = spec["port"], spec["tokens"], spec.get("query", "")
    sse = spec.get("transport") == "sse"
    request, accepted = (STREAM_REQUEST, b"HTTP/1.1 200") if sse else (UPGRADE_REQUEST, b"HTTP/1.1 101")
    messages = stream_events if sse else websocket_messages
    players: dict[int, _PlayerSocket] = {}
    poller = select.epoll()
    try:
        for start in range(0, len(tokens), 200):  # 200 handshakes in flight at a time
            pending = []
            for token in tokens[start:start + 200]:
                sock = socket.create_connection(("127.0.0.1", port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(request.format(token=token, query=query).encode())
                pending.append(sock)
            for sock in pending:
                response = b""
                while b"\r\n\r\n" not in response:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise OSError(f"closed during the handshake: {response[:80]!r}")
                    response += chunk
                head, rest = response.split(b"\r\n\r\n", 1)
                if not head.startswith(accepted):
                    raise OSError(f"handshake refused: {head[:80]!r}")
                sock.setblocking(False)
                players[sock.fileno()] = _PlayerSocket(sock, rest)
                poller.register(sock.fileno(), select.EPOLLIN)
    except OSError as exc:
        _reply({"error": str(exc)})
        return
    _reply({"connected": len(players)})

    commands = _Commands()
    poller.register(0, select.EPOLLIN)
    frames = 0
    last_rx = 0.0
    cpu_at_reset = _cpu_s()
    record_latency = False
    latencies: list[float] = []
    pong = _masked_frame(0xA, b"")
    while True:
        for fd, _ in poller.poll():
            if fd == 0:
                for command in commands.read():
                    name = command["cmd"]
                    if name == "quit":
                        return
                    if name == "stats":
                        _reply({"frames": frames, "last_rx": last_rx, "cpu_s": _cpu_s() - cpu_at_reset})
                    elif name == "reset":
                        frames, record_latency = 0, command.get("latency", False)
                        cpu_at_reset = _cpu_s()
                        _reply({"ok": True})
                    elif name == "latencies":
                        _reply({"latencies": latencies})
                        latencies = []
                continue
            player = players.get(fd)
            if player is None:
                continue
            try:
                data = player.sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                poller.unregister(fd)
                del players[fd]
                continue
            now = time.monotonic()
            buffer = player.buffer + data if player.buffer else data
            position = 0
            for message, end in messages(buffer, player.sock, pong):
                position = end
                if message is None:
                    continue
                frames += 1
                if record_latency:
                    mark = message.find(b'"t":')
                    if mark >= 0:
                        latencies.append(now - float(message[mark + 4:message.index(b"}", mark)]))
            player.buffer = buffer[position:]
            last_rx = now


def websocket_messages(buffer: bytes, sock: socket.socket, pong: bytes) -> Iterator[tuple[bytes | None, int]]:
    """Each whole frame at the start of `buffer`: its payload if it is a text frame (else
    None), and where it ends; pings are answered on the way."""
    for opcode, start, end in server_frames(buffer):
        if opcode == 0x9:
            sock.send(pong)
        yield (buffer[start:end] if opcode == 0x1 else None), end


def stream_events(buffer: bytes, sock: socket.socket, pong: bytes) -> Iterator[tuple[bytes | None, int]]:
    """Each whole block at the start of `buffer`: the event if it carries one (None for
    the retry hint and keepalive comments), and where it ends."""
    position = 0
    while (end := buffer.find(b"\n\n", position)) >= 0:
        block = buffer[position:end]
        position = end + 2
        yield (block if block.startswith((b"event:", b"data:")) else None), position


def server_frames(buffer: bytes) -> Iterator[tuple[int, int, int]]:
    """The whole unmasked frames at the start of `buffer`, as (opcode, payload start, end);
    a frame cut short ends the run (its bytes wait for the next read)."""
    position, size = 0, len(buffer)
    while size - position >= 2:
        length, header = buffer[position + 1] & 0x7F, 2
        if length == 126:
            if size - position < 4:
                return
            length, header = int.from_bytes(buffer[position + 2:position + 4], "big"), 4
        elif length == 127:
            if size - position < 10:
                return
            length, header = int.from_bytes(buffer[position + 2:position + 10], "big"), 10
        end = position + header + length
        if end > size:
            return
        yield buffer[position] & 0x0F, position + header, end
        position = end


class _HttpConnection:
    __slots__ = ("sock", "buffer", "busy", "sent_at")

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buffer = b""
        self.busy = False


def _request(path: str, token: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def http_worker(spec: dict[str, Any]) -> None:
    """Publishers on keep-alive connections: as fast as answers come back (`publish`,
    `batch`), or paced at `rate` per second across all client processes (`latency`)."""
    rng = random.Random(spec["seed"])
    mode, token, players = spec["mode"], spec["token"], spec["players"]
    connections = [_HttpConnection(spec["port"]) for _ in range(spec["connections"])]
    by_fd = {connection.sock.fileno(): connection for connection in connections}
    poller = select.epoll()
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    text = "x" * 100
    if mode == "publish":
        fixed = _request("/publish", token, json.dumps(
            {"player_id": players[0], "event": "publish", "payload": {"text": text}}).encode())
        requests = [fixed]
    elif mode == "batch":
        size = spec["batch_size"]
        requests = [_request("/publish/batch", token, json.dumps({"messages": [
            {"player_id": rng.choice(players), "event": "batch", "payload": {"text": text}}
            for _ in range(size)]}).encode()) for _ in range(64)]
    else:
        requests = []
    per_request = spec.get("batch_size", 1) if mode == "batch" else 1
    rate_share = spec.get("rate", 0) / max(1, spec.get("processes", 1))
    _reply({"connected": len(connections)})
    commands = _Commands()
    while not commands.read():
        time.sleep(0.001)

    cpu_before = _cpu_s()
    started = time.monotonic()
    until = started + spec["duration_s"]
    completed = errors = sent = 0
    first_error = None
    next_request = 0

    def send(connection: _HttpConnection) -> None:
        nonlocal next_request, sent
        if mode == "latency":
            body = ('{"player_id":%d,"event":"lat","payload":{"t":%.6f}}'
                    % (rng.choice(players), time.monotonic())).encode()
            data = _request("/publish", token, body)
        else:
            data = requests[next_request % len(requests)]
            next_request += 1
        connection.sock.sendall(data)  # small: fits the socket buffer at once
        connection.busy = True
        sent += 1

    if mode != "latency":
        for connection in connections:
            send(connection)
    idle = [] if mode != "latency" else list(connections)
    while True:
        now = time.monotonic()
        if now >= until and sent == completed:
            break
        if mode == "latency" and now < until:
            due = int((now - started) * rate_share) - sent
            while due > 0 and idle:
                send(idle.pop())
                due -= 1
        timeout = 0.001 if mode == "latency" else 1.0
        for fd, _ in poller.poll(timeout):
            connection = by_fd[fd]
            try:
                data = connection.sock.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                raise SystemExit("the gateway closed a publishing connection")
            buffer = connection.buffer + data
            while True:
                head_end = buffer.find(b"\r\n\r\n")
                if head_end < 0:
                    break
                head = buffer[:head_end]
                marker = head.lower().find(b"content-length:")
                length = int(head[marker + 15:].split(b"\r\n", 1)[0]) if marker >= 0 else 0
                if len(buffer) < head_end + 4 + length:
                    break
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
                    first_error = first_error or (head + buffer[head_end:head_end + 4 + length]).decode("latin-1")
                buffer = buffer[head_end + 4 + length:]
                completed += 1
                connection.busy = False
                if time.monotonic() < until and mode != "latency":
                    send(connection)
                else:
                    idle.append(connection)
            connection.buffer = buffer
    elapsed = time.monotonic() - started
    _reply({"requests": completed, "messages": completed * per_request, "errors": errors,
            "first_error": first_error, "elapsed_s": elapsed, "cpu_s": _cpu_s() - cpu_before})
    while True:
        if any(command["cmd"] == "quit" for command in commands.read()):
            return
        time.sleep(0.01)


def worker_main(kind: str, spec_text: str) -> int:
    spec = json.loads(spec_text)
    try:
        (ws_worker if kind == "ws" else http_worker)(spec)
    except BrokenPipeError:
        pass
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "_worker":
        sys.exit(worker_main(sys.argv[2], sys.argv[3]))
    sys.exit(main())
