#!/usr/bin/env python3
"""Soak the gateway with numbered messages and check that none is lost, doubled or reordered.

    .venv/bin/python bench/soak.py                            # 1,000 players, 10 minutes
    .venv/bin/python bench/soak.py --duration 30 --players 200  # what CI runs (tests/test_soak.py)
    .venv/bin/python bench/soak.py --faults --duration 90 --rounds 2 --players 300  # with faults

A real gateway process (bin/ws-gateway's `main`, through bench/soak_gateway.py for
memory and greenlet figures) on a fresh sqlite file. Players connect over WebSocket,
some with several connections; each connection lives a random time, closes cleanly and
comes back after a short pause, now and then after a long one (past -offline-ttl). Eight
publishers send numbered messages to single players (a few "hot" players get many, to
overflow -max-queued while they are away) and one broadcaster sends numbered broadcasts.

Checked at the end, from the publishers' answers and what every connection received:
* a publish answered {"delivered": N} arrived exactly once on N connections of the player;
* a publish answered {"queued": true} arrived exactly once after reconnect, or was given
  up, and the number given up equals the offline drops in the gateway's metrics;
* a broadcast answered {"delivered": N} arrived on exactly N connections;
* on every connection, messages came in publish order.

With --faults: two gateways on `-broker`, a private redis-server on a free port (started
and stopped by the soak, never the shared one), and in every round, at a quarter, a half
and three quarters of it: Redis restarted (empty: it keeps nothing on disk), the token
file replaced (a new sqlite file renamed into place, in which a tenth of the players have
new tokens; clients use the new ones from then on), and FLUSHALL. Throughout, each client
that closes cleanly races a publish to the other gateway against its own close ("r"
messages, a stream of their own). Each loss is attributed: to the close race, to a fault
when published within FAULT_WINDOW_S after it, or to nothing known. Offline messages Redis
held when it restarted or was flushed are reported apart (`queued_lost_with_redis`): the
documented limit of a Redis without persistence, which no metric counts. Also reported:
publishes answered `queued` while the player had a connection open (parked), answers with
`scope: local`, and, for the token file, new tokens refused or removed ones still accepted
later than one -revalidate-period after the replacement.

Prints totals, losses, duplicates, reorderings, memory and greenlets, and with --json one
JSON line last. Exit status 1 if anything was lost, doubled or reordered.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import base64  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import secrets  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sqlite3  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import redis  # noqa: E402
from gevent.event import Event  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from wsgateway.tokens import SQLITE_SCHEMA  # noqa: E402

GATEWAY = PROJECT / "bench" / "soak_gateway.py"
OFFLINE_REASONS = ("offline_expired", "offline_queue_full", "offline_bytes_limit", "offline_players_limit")
OFFLINE_TTL_S = 5.0
MAX_QUEUED = 20
PUBLISHERS = 8
HOT_PLAYERS = 10  # they get HOT_SHARE of the single-player publishes
HOT_SHARE = 0.2
STEP_TIMEOUT_S = 60.0  # for each phase that waits on the gateway
HANDSHAKE_TIMEOUT_S = 10.0  # a connection not upgraded by then is a connect failure, tried again
REVALIDATE_PERIOD_S = 5.0
FAULT_WINDOW_S = 10.0  # a loss this soon after a fault is put down to it
NOT_SEATED = 1013  # the close code of a connection the broker failed while it was seated
WIPE_SLACK_S = 1.5  # past -offline-ttl, how late a queued frame may still be held (the sweep runs every second)
SEAT_SLACK_S = 0.5  # how long after its 101 a connection may take its seat, and its backlog
REDIS_DOWN_S = 1.0  # how long a restarted Redis stays down
ROTATED_SHARE = 0.1  # players whose token changes when the token file is replaced


# --- a minimal WebSocket client ----------------------------------------------------------------------
def masked_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + body


@dataclass
class Connection:
    """One WebSocket connection's life and what it received."""

    player: int
    opened_at: float = 0.0
    closed_at: float = 0.0
    close_code: int | None = None
    published: list[int] = field(default_factory=list)  # seq numbers of the player's messages, in arrival order
    raced: list[int] = field(default_factory=list)  # seq numbers of the messages raced against a close
    broadcasts: list[int] = field(default_factory=list)
    close_started_at: float = 0.0
    sock: socket.socket | None = None
    closed: Event = field(default_factory=Event)

    def open(self, port: int, token: str) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_TIMEOUT_S)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(f"GET /ws?token={token} HTTP/1.1\r\nHost: soak\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            try:
                chunk = sock.recv(4096)
            except socket.timeout:
                sock.close()
                raise ConnectionError("handshake not answered in time") from None
            if not chunk:
                raise ConnectionError("closed during handshake")
            head += chunk
        status = head.split(b" ", 2)[1]
        if status != b"101":
            sock.close()
            raise ConnectionError(f"handshake answered {status.decode()}")
        sock.settimeout(None)
        self.sock = sock
        self.opened_at = time.monotonic()
        gevent.spawn(self._read, head.split(b"\r\n\r\n", 1)[1])

    def _read(self, pending: bytes) -> None:
        sock = self.sock
        buffer = bytearray(pending)
        try:
            while True:
                while True:
                    if len(buffer) < 2:
                        break
                    length = buffer[1] & 0x7F
                    start = 2
                    if length == 126:
                        if len(buffer) < 4:
                            break
                        length, start = struct.unpack_from("!H", buffer, 2)[0], 4
                    elif length == 127:
                        if len(buffer) < 10:
                            break
                        length, start = struct.unpack_from("!Q", buffer, 2)[0], 10
                    if len(buffer) < start + length:
                        break
                    opcode, payload = buffer[0] & 0x0F, bytes(buffer[start:start + length])
                    del buffer[:start + length]
                    if opcode == 0x1:
                        message = json.loads(payload)
                        streams = {"p": self.published, "r": self.raced, "b": self.broadcasts}
                        streams[message["event"]].append(message["payload"])
                    elif opcode == 0x9:
                        sock.sendall(masked_frame(0xA, payload))
                    elif opcode == 0x8:
                        self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                        return
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
        except OSError:
            return
        finally:
            self.closed_at = time.monotonic()
            sock.close()
            self.closed.set()

    def close(self) -> None:
        """Clean close: send ours, read on until the gateway's close frame."""
        self.close_started_at = time.monotonic()
        try:
            self.sock.sendall(masked_frame(0x8, struct.pack("!H", 1000)))
        except OSError:
            pass
        self.closed.wait(STEP_TIMEOUT_S)


# --- the soak -----------------------------------------------------------------------------------------
@dataclass
class Publish:
    player: int
    seq: int
    delivered: int
    queued: bool
    stream: str = "p"
    sent_at: float = 0.0
    answered_at: float = 0.0
    local: bool = False  # answered with "scope": "local"


class Soak:
    def __init__(self, options: argparse.Namespace, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.ports: list[int] = []
        self.processes: list[subprocess.Popen] = []
        self.redis: subprocess.Popen | None = None
        self.redis_port = 0
        self.database = workdir / "tokens.db"
        self.tokens: dict[int, str] = {}
        self.old_tokens: dict[int, list[str]] = {}  # players' earlier tokens, oldest first
        self.faults: list[tuple[float, str]] = []  # (time.monotonic(), kind)
        self.token_checks: Counter = Counter()
        self.next_race_seq: dict[int, int] = {}
        self.unsettled: list[str] = []  # with --faults: end checks that timed out
        self.server_token = secrets.token_hex(16)
        rng = random.Random(options.seed)
        self.rng = rng
        # slots: (player, index) for every connection a client keeps up
        self.slots = [(player, 0) for player in range(1, options.players + 1)]
        for player in range(1, options.players + 1):
            if rng.random() < options.multi:
                self.slots += [(player, extra) for extra in range(1, rng.choice((2, 3)))]
        self.connections: list[Connection] = []
        self.live: dict[tuple[int, int], Connection] = {}
        self.publishes: list[Publish] = []
        self.broadcasts: dict[int, int] = {}  # seq -> delivered
        self.broadcast_times: dict[int, float] = {}  # seq -> when answered (time.monotonic())
        self.next_seq: dict[int, int] = {}
        self.go = Event()
        self.stopping = Event()
        self.final = Event()
        self.connect_failures: Counter = Counter()
        self.publish_failures: Counter = Counter()

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def process(self) -> subprocess.Popen | None:
        """The first gateway: the one whose memory and greenlets are reported."""
        return self.processes[0] if self.processes else None

    # --- the gateway --------------------------------------------------------------------
    def write_token_file(self, path: Path) -> None:
        """A sqlite token file with every player's current token and the server token."""
        with sqlite3.connect(path) as connection:
            for statement in SQLITE_SCHEMA:
                connection.execute(statement)
            rows = [(token, player, "soak", 0, "2099-01-01 00:00:00") for player, token in self.tokens.items()]
            rows.append((self.server_token, None, "soak-backend", 1, "2099-01-01 00:00:00"))
            connection.executemany("INSERT INTO ws_token VALUES (?, ?, ?, ?, ?)", rows)

    def start_gateway(self) -> None:
        """One gateway, or with --faults two on a private Redis."""
        self.tokens = {player: secrets.token_hex(16) for player in range(1, self.options.players + 1)}
        self.write_token_file(self.database)
        broker: list[str] = []
        if self.options.faults:
            self.redis_port = free_port()
            self.start_redis()
            broker = ["-broker", f"redis://127.0.0.1:{self.redis_port}/0", "-broker-prefix", "soak"]
        environment = {name: value for name, value in os.environ.items() if not name.startswith("WS_GATEWAY_")}
        environment["WS_SOAK_STATS"] = str(self.workdir / "stats.json")
        for number in range(2 if self.options.faults else 1):
            port = free_port()
            suffix = f"-{number}" if number else ""
            self.ports.append(port)
            self.processes.append(subprocess.Popen(
                [sys.executable, str(GATEWAY), "-addr", f"127.0.0.1:{port}", "-dsn", f"file:{self.database}",
                 "-rate-limit", "0", "-max-conns", "5", "-max-queued", str(MAX_QUEUED),
                 "-offline-ttl", f"{OFFLINE_TTL_S:g}s", "-ping-period", "10s", "-pong-wait", "30s",
                 # revalidation runs often, over a changing set of live tokens
                 "-revalidate-period", f"{REVALIDATE_PERIOD_S:g}s", *broker,
                 "-log-level", "warning", "-log-file", str(self.workdir / f"gateway{suffix}.log"),
                 "-shutdown-timeout", "10s"],
                env=environment if number == 0 else {k: v for k, v in environment.items() if k != "WS_SOAK_STATS"},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=open(self.workdir / f"gateway{suffix}.stderr", "w")))
        for port in self.ports:
            self.wait_for(lambda: self.request("GET", "/healthz", port=port)[0] == 200, "the gateway to start")

    # --- faults -------------------------------------------------------------------------
    def start_redis(self) -> None:
        """redis-server of the soak's own (nothing on disk), stopped only by its pid."""
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_for(lambda: self.redis_answers(), "redis-server to start")

    def redis_answers(self) -> bool:
        try:
            return redis.Redis(port=self.redis_port, socket_timeout=1).ping()
        except redis.RedisError:
            return False

    def stop_redis(self) -> None:
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait(STEP_TIMEOUT_S)
        self.redis = None

    # A wipe's time is taken once it is done: a publish sent before then may have been
    # taken by Redis before the wipe (see `wiped_by_redis`), however late it was answered.
    def restart_redis(self) -> None:
        self.stop_redis()
        self.faults.append((time.monotonic(), "redis_restart"))
        gevent.sleep(REDIS_DOWN_S)
        self.start_redis()

    def flush_redis(self) -> None:
        redis.Redis(port=self.redis_port, socket_timeout=5).flushall()
        self.faults.append((time.monotonic(), "redis_flushall"))

    def replace_token_file(self) -> None:
        """A new file renamed into place (a restored backup, a deploy): a share of the
        players have new tokens in it, and their old ones are gone."""
        rotated = self.rng.sample(sorted(self.tokens), max(1, int(len(self.tokens) * ROTATED_SHARE)))
        for player in rotated:
            self.old_tokens.setdefault(player, []).append(self.tokens[player])
            self.tokens[player] = secrets.token_hex(16)
        fresh = self.database.with_name("tokens.db.new")
        self.write_token_file(fresh)
        os.replace(fresh, self.database)
        self.faults.append((time.monotonic(), "token_file_replaced"))

    def inject_faults(self, duration_s: float) -> None:
        """One of each fault, spread over the round."""
        started = time.monotonic()
        for share, fault in ((0.25, self.restart_redis), (0.5, self.replace_token_file), (0.75, self.flush_redis)):
            gevent.sleep(max(0.0, started + share * duration_s - time.monotonic()))
            if self.stopping.is_set():
                return
            fault()

    def past_revalidation(self) -> bool:
        """Whether the last token-file replacement is more than a revalidation period old."""
        replaced = [at for at, kind in self.faults if kind == "token_file_replaced"]
        return bool(replaced) and time.monotonic() > replaced[-1] + REVALIDATE_PERIOD_S + 1.0

    def stats(self) -> dict:
        path = self.workdir / "stats.json"
        before = json.loads(path.read_text())["sample"] if path.exists() else 0
        self.process.send_signal(signal.SIGUSR1)
        self.wait_for(lambda: path.exists() and json.loads(path.read_text())["sample"] > before, "gateway stats")
        return json.loads(path.read_text())

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every gateway's samples, added up."""
        samples: Counter = Counter()
        for port in self.ports:
            status, body = self.request("GET", "/metrics", port=port)
            for family in text_string_to_metric_families(body.decode()):
                for sample in family.samples:
                    samples[(sample.name, tuple(sorted(sample.labels.items())))] += sample.value
        return dict(samples)

    def request(self, method: str, path: str, body: dict | None = None,
                connection: http.client.HTTPConnection | None = None, port: int | None = None) -> tuple[int, bytes]:
        own = connection is None
        connection = connection or http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=STEP_TIMEOUT_S)
        try:
            headers = {"Authorization": f"Bearer {self.server_token}", "Content-Type": "application/json"}
            connection.request(method, path, json.dumps(body) if body is not None else None, headers)
            response = connection.getresponse()
            return response.status, response.read()
        except OSError:
            connection.close()
            return 0, b""
        finally:
            if own:
                connection.close()

    @staticmethod
    def wait_for(condition, what, timeout_s: float = STEP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise SystemExit(f"soak: timed out waiting for {what() if callable(what) else what}")
            gevent.sleep(0.05)

    # --- clients ------------------------------------------------------------------------
    def client(self, slot: tuple[int, int]) -> None:
        """Keep one connection slot up: connect, live a while, close cleanly, pause, again."""
        player = slot[0]
        rng = random.Random(hash((self.options.seed, slot)))
        port = self.ports[hash(slot) % len(self.ports)]
        while True:
            connection = Connection(player)
            try:
                self.open(connection, port)
            except (OSError, ConnectionError) as error:
                self.connect_failures[str(error)[:60]] += 1
                gevent.sleep(0.5)
                continue
            self.connections.append(connection)
            self.live[slot] = connection
            if self.final.is_set():
                return
            self.go.wait()  # lives start counting once everyone is in and the start figures taken
            life_s = rng.expovariate(1 / self.options.mean_life)
            gevent.wait([self.final, connection.closed], timeout=life_s, count=1)
            if self.final.is_set() and not connection.closed.is_set():
                return  # stays connected for the end checks
            del self.live[slot]
            if self.options.faults and not connection.closed.is_set():
                other = self.ports[(self.ports.index(port) + 1) % len(self.ports)]
                gevent.spawn(self.publish, player, port=other, stream="r")
            connection.close()
            if not self.final.is_set():
                gevent.sleep(rng.uniform(6.0, 8.0) if rng.random() < 0.1 else rng.uniform(0.05, 1.0))

    def open(self, connection: Connection, port: int) -> None:
        """Connect with the player's current token. A refused new token (the token file was
        replaced) is counted, and so is a removed token that still connects, once more than
        one revalidation period has passed."""
        player = connection.player
        try:
            connection.open(port, self.tokens[player])
            return
        except ConnectionError as error:
            if player not in self.old_tokens or "401" not in str(error):
                raise
            refused = error
        late = self.past_revalidation()
        self.token_checks["new_token_refused" if late else "new_token_refused_within_revalidation"] += 1
        for token in reversed(self.old_tokens[player]):  # what the gateway may still know
            try:
                connection.open(port, token)
            except ConnectionError:
                continue
            self.token_checks["removed_token_accepted" if late else "removed_token_accepted_within_revalidation"] += 1
            return
        raise refused

    # --- traffic ------------------------------------------------------------------------
    def publisher(self, index: int) -> None:
        players = [player for player in range(1, self.options.players + 1) if player % PUBLISHERS == index]
        hot = [player for player in players if player <= HOT_PLAYERS]
        port = self.ports[index % len(self.ports)]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=STEP_TIMEOUT_S)
        rng = random.Random(self.options.seed * 1000 + index)
        interval_s = PUBLISHERS / self.options.publish_rate
        next_at = time.monotonic()
        while not self.stopping.is_set():
            player = rng.choice(hot) if hot and rng.random() < HOT_SHARE else rng.choice(players)
            self.publish(player, connection, port=port)
            next_at += interval_s
            gevent.sleep(max(0.0, next_at - time.monotonic()))
        connection.close()

    def publish(self, player: int, connection: http.client.HTTPConnection | None = None, *,
                port: int | None = None, stream: str = "p") -> None:
        """A numbered message in the player's stream: "p" (one publisher per player, so
        in order) or "r" (raced against a close)."""
        sequences = self.next_seq if stream == "p" else self.next_race_seq
        seq = sequences.get(player, 0) + 1
        sequences[player] = seq
        sent_at = time.monotonic()
        status, body = self.request("POST", "/publish", {"player_id": player, "event": stream, "payload": seq},
                                    connection, port)
        if status != 200:
            self.publish_failures[status] += 1  # not published: cannot be owed to anyone
            return
        answer = json.loads(body)
        self.publishes.append(Publish(player, seq, answer["delivered"], answer["queued"], stream, sent_at,
                                      time.monotonic(), answer.get("scope") == "local"))

    def broadcaster(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=STEP_TIMEOUT_S)
        seq = max(self.broadcasts, default=0)
        while not self.stopping.is_set():
            seq += 1
            self.broadcast(seq, connection)
            gevent.sleep(1 / self.options.broadcast_rate)
        connection.close()

    def broadcast(self, seq: int, connection: http.client.HTTPConnection | None = None) -> None:
        status, body = self.request("POST", "/broadcast", {"event": "b", "payload": seq}, connection)
        if status == 200:
            self.broadcasts[seq] = json.loads(body)["delivered"]
            self.broadcast_times[seq] = time.monotonic()
        else:
            self.publish_failures[status] += 1

    # --- the run ------------------------------------------------------------------------
    def run(self) -> dict:
        """`--rounds` rounds on one gateway process; memory after the clients of each round
        have left shows whether anything stays behind (a leak grows round after round, a
        warmed-up allocator does not)."""
        self.start_gateway()
        cold = self.stats()
        rounds = [self.round(self.options.duration / self.options.rounds) for _ in range(self.options.rounds)]
        metrics = self.metrics()
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        exit_status = max(process.wait(STEP_TIMEOUT_S) for process in self.processes)
        self.stop_redis()
        return self.report(cold, rounds, metrics, exit_status)

    def round(self, duration_s: float) -> dict:
        """All clients in, traffic with reconnects for `duration_s`, the final check, all out."""
        for event in (self.go, self.stopping, self.final):
            event.clear()
        self.live.clear()
        clients = [gevent.spawn(self.client, slot) for slot in self.slots]
        self.wait_for(lambda: len(self.live) == len(self.slots),
                      lambda: f"every client connected ({len(self.live)} of {len(self.slots)}; connect failures: "
                              f"{dict(self.connect_failures)})")
        self.settle(lambda: self.active() == len(self.slots),
                    lambda: f"the gateways to count every client ({self.active()} of {len(self.slots)})")
        start = self.stats()
        started = time.monotonic()
        self.go.set()
        traffic = [gevent.spawn(self.publisher, index) for index in range(PUBLISHERS)]
        traffic.append(gevent.spawn(self.broadcaster))
        if self.options.faults:
            traffic.append(gevent.spawn(self.inject_faults, duration_s))
        peak_rss_kib = start["rss_kib"]
        while time.monotonic() - started < duration_s:
            gevent.sleep(min(5.0, max(0.0, duration_s - (time.monotonic() - started))))
            peak_rss_kib = max(peak_rss_kib, self.rss_kib())
        self.stopping.set()
        gevent.joinall(traffic, timeout=STEP_TIMEOUT_S, raise_error=True)
        traffic_s = time.monotonic() - started

        # Everyone back, then a last numbered message to every player and a last broadcast:
        # once a connection has them, it has everything published before them.
        self.final.set()
        gevent.joinall(clients, timeout=STEP_TIMEOUT_S, raise_error=True)
        self.wait_for(lambda: len(self.live) == len(self.slots),
                      lambda: f"every client back for the final check ({len(self.live)} of {len(self.slots)}; "
                              f"connect failures: {dict(self.connect_failures)})")
        self.settle(lambda: self.active() == len(self.slots),
                    lambda: f"the gateways to count every client back ({self.active()} of {len(self.slots)})")
        for player in range(1, self.options.players + 1):
            self.publish(player)
        final_broadcast = max(self.broadcasts, default=0) + 1
        self.broadcast(final_broadcast)
        self.settle(lambda: all(
            connection.published and connection.published[-1] == self.next_seq[connection.player]
            and connection.broadcasts and connection.broadcasts[-1] == final_broadcast
            for connection in self.live.values()), "the final messages on every connection")
        end_connected = self.stats()
        for connection in list(self.live.values()):
            gevent.spawn(connection.close)
        self.wait_for(lambda: all(c.closed.is_set() for c in self.connections), "every client gone")
        self.settle(lambda: self.active() == 0, lambda: f"the gateways to count no client ({self.active()} left)")
        end = self.stats()
        return {"traffic_s": traffic_s, "start": start, "peak_rss_kib": peak_rss_kib,
                "end_connected": end_connected, "end": end}

    def settle(self, condition, what) -> None:
        """`wait_for`, except that with --faults a condition still false after the step
        timeout is reported (`unsettled`) and the run goes on to its figures."""
        try:
            self.wait_for(condition, what)
        except SystemExit as timed_out:
            if not self.options.faults:
                raise
            self.unsettled.append(str(timed_out))

    def active(self) -> int:
        return int(self.metrics().get(("ws_active_connections", ()), -1))

    def rss_kib(self) -> int:
        with open(f"/proc/{self.process.pid}/status", encoding="ascii") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

    # --- the verdict --------------------------------------------------------------------
    def report(self, cold: dict, rounds: list[dict], metrics: dict, exit_status: int) -> dict:
        def mib(kib: float) -> float:
            return round(kib / 1024, 1)

        reorder_examples: list[str] = []
        duplicate_examples: list[str] = []
        receipts: Counter = Counter()  # (player, seq) -> connections that received it
        broadcast_receipts: Counter = Counter()
        reordered = duplicates = 0
        for connection in self.connections:
            for sequence, counter, key in ((connection.published, receipts, (connection.player, "p")),
                                           (connection.raced, receipts, (connection.player, "r")),
                                           (connection.broadcasts, broadcast_receipts, None)):
                seen = set()
                for previous, current in zip(sequence, sequence[1:]):
                    if current <= previous:
                        reordered += current < previous
                        if current < previous and len(reorder_examples) < 10:
                            reorder_examples.append(self.describe_reorder(connection, key, previous, current))
                for seq in sequence:
                    if seq in seen:
                        duplicates += 1
                        if len(duplicate_examples) < 10:
                            duplicate_examples.append(self.describe_duplicate(connection, key, seq))
                    seen.add(seq)
                    counter[(*key, seq) if key is not None else seq] += 1
        lost_live = lost_queued = extra = 0
        live_lost_with_redis = 0  # live copies unreceived, in Redis (a stream or, routed again, a queue) at a wipe
        queued = 0
        queued_loss_examples: list[str] = []
        causes: Counter = Counter()  # lost live messages by what they are put down to
        beyond_causes: Counter = Counter()  # received on more connections than answered, likewise
        queued_lost_with_redis = 0
        for publish in self.publishes:
            got = receipts[(publish.player, publish.stream, publish.seq)]
            if publish.queued:
                queued += 1
                if got == 0 and self.wiped_by_redis(publish):
                    queued_lost_with_redis += 1
                else:
                    lost_queued += got == 0
                    if got == 0 and len(queued_loss_examples) < 10:
                        suspect = self.describe_unexpected_queued_loss(publish)
                        if suspect:
                            queued_loss_examples.append(suspect)
                extra += max(0, got - 1)
                if got > 1:
                    beyond_causes[self.cause(publish)] += got - 1
            elif publish.delivered > got and self.wiped_by_redis(publish):
                live_lost_with_redis += publish.delivered - got
            else:
                lost_live += max(0, publish.delivered - got)
                if publish.delivered > got:
                    causes[self.cause(publish)] += publish.delivered - got
                extra += max(0, got - publish.delivered)
                if got > publish.delivered:
                    beyond_causes[self.cause(publish)] += got - publish.delivered
        broadcast_beyond = 0
        for seq, delivered in self.broadcasts.items():
            got = broadcast_receipts[seq]
            if delivered > got and self.wiped_by_redis(Publish(0, seq, delivered, False, "b", 0.0,
                                                               self.broadcast_times.get(seq, 0.0)), any_player=True):
                live_lost_with_redis += delivered - got
            elif delivered > got:
                lost_live += delivered - got
                causes["broadcast"] += delivered - got  # not told apart further by player
            extra += max(0, got - delivered)
            broadcast_beyond += max(0, got - delivered)

        def metric(name: str, **labels: str) -> float:
            return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

        dropped_offline = sum(metric("ws_messages_dropped_total", reason=reason) for reason in OFFLINE_REASONS)
        # Of the offline drops, the copies answered `delivered` that found their connection
        # gone, were routed again to the queue and given up there (counted apart by the
        # gateway): those are what the live copies not received are reconciled with, and the
        # rest with the messages answered `queued` not received. Each side must match exactly.
        # The others were given up, counted, because the newer connection they were routed
        # to had been sent a later message first (`out_of_order`): live copies too.
        given_up_in_queue = int(metric("ws_messages_rerouted_given_up_total", reason="in_queue"))
        given_up_out_of_order = int(metric("ws_messages_rerouted_given_up_total", reason="out_of_order"))
        rerouted_given_up = given_up_in_queue + given_up_out_of_order
        live_unaccounted = lost_live - rerouted_given_up
        unaccounted = lost_queued - (int(dropped_offline) - given_up_in_queue)
        losses = max(0, live_unaccounted) + max(0, unaccounted)
        # More drops counted than messages seen missing: only as many as those put down to a
        # wipe may be (one sent as Redis was wiped may have reached the new data set after
        # all, and then expired, counted); more would mean a drop counted twice.
        overcounted = max(0, -live_unaccounted - live_lost_with_redis) \
            + max(0, -unaccounted - queued_lost_with_redis)
        result = {
            "duration_s": round(sum(round_["traffic_s"] for round_ in rounds), 1),
            "rounds": len(rounds),
            "players": self.options.players,
            "connection_slots": len(self.slots),
            "connections_opened": len(self.connections),
            "publishes": len(self.publishes),
            "publishes_live": len(self.publishes) - queued,
            "publishes_queued": queued,
            "broadcasts": len(self.broadcasts),
            "frames_received": sum(receipts.values()) + sum(broadcast_receipts.values()),
            "queued_dropped_seen": lost_queued,
            "queued_dropped_metrics": {reason: metric("ws_messages_dropped_total", reason=reason)
                                       for reason in (*OFFLINE_REASONS, "slow_consumer")},
            "offline_queue_left": metric("ws_offline_queue_messages"),
            "losses": losses,
            "unaccounted_drops": unaccounted,
            "overcounted_drops": overcounted,
            "live_copies_not_received": lost_live,
            "rerouted_given_up_metrics": rerouted_given_up,
            "rerouted_given_up_out_of_order": given_up_out_of_order,
            "live_unaccounted": live_unaccounted,
            "live_lost_with_redis": live_lost_with_redis,
            "reorder_examples": reorder_examples,
            "duplicate_examples": duplicate_examples,
            "queued_loss_examples": queued_loss_examples,
            "duplicates": duplicates + extra,
            "reordered": reordered,
            "refused_publishes": dict(self.publish_failures),
            "faults": dict(Counter(kind for _, kind in self.faults)),
            "losses_by_cause": dict(causes),
            "doubled_on_one_connection": duplicates,
            "received_beyond_the_answer": extra,  # on more connections than `delivered` said
            "beyond_the_answer_by_cause": dict(beyond_causes),
            "broadcasts_beyond_the_answer": broadcast_beyond,  # a broadcast's `delivered` undercounting
            "queued_lost_with_redis": queued_lost_with_redis,
            "queued_while_connected": dict(self.parked()),
            "answers_scope_local": sum(publish.local for publish in self.publishes),
            "raced_publishes": sum(publish.stream == "r" for publish in self.publishes),
            "token_file": dict(self.token_checks),
            "unsettled": self.unsettled,
            "connect_failures": dict(self.connect_failures),
            "close_codes": dict(Counter(c.close_code for c in self.connections)),
            "rss_mib": {"cold": mib(cold["rss_kib"]), "start": mib(rounds[0]["start"]["rss_kib"]),
                        "peak": mib(max(round_["peak_rss_kib"] for round_ in rounds)),
                        "end_connected": [mib(round_["end_connected"]["rss_kib"]) for round_ in rounds],
                        "after_clients_left": [mib(round_["end"]["rss_kib"]) for round_ in rounds],
                        "after_clients_left_trimmed": [mib(round_["end"]["rss_trimmed_kib"]) for round_ in rounds]},
            "greenlets": {"cold": cold["greenlets"], "start": rounds[0]["start"]["greenlets"],
                          "end_connected": [round_["end_connected"]["greenlets"] for round_ in rounds],
                          "after_clients_left": [round_["end"]["greenlets"] for round_ in rounds],
                          "parked_for_the_next_connection": [round_["end"].get("parked_greenlets") for round_ in rounds]},
            "open_fds": {"cold": cold["open_fds"], "after_clients_left": [round_["end"]["open_fds"] for round_ in rounds]},
            "gc_objects": {"cold": cold["objects"], "after_clients_left": [round_["end"]["objects"] for round_ in rounds]},
            "allocated_blocks": {"cold": cold["allocated_blocks"],
                                 "after_clients_left": [round_["end"]["allocated_blocks"] for round_ in rounds]},
            "pymalloc_arenas": {"cold": cold["pymalloc_arenas"],
                                "after_clients_left": [round_["end"]["pymalloc_arenas"] for round_ in rounds]},
            "traced_kib": {"cold": cold["traced_kib"], "after_clients_left": [round_["end"]["traced_kib"] for round_ in rounds]},
            "gateway_exit_status": exit_status,
            "load_average": [round(value, 2) for value in os.getloadavg()],
        }
        return result


    def describe_reorder(self, connection: Connection, key: tuple | None, previous: int, current: int) -> str:
        """One message that arrived after a later one, with what the soak knows of both."""
        return (f"player {connection.player} stream {key[1] if key else 'b'}: "
                f"{self.describe_answer(connection, key, previous)} before {self.describe_answer(connection, key, current)}")

    def describe_duplicate(self, connection: Connection, key: tuple | None, seq: int) -> str:
        """One message a connection received twice, with what the soak knows of it."""
        return (f"player {connection.player} stream {key[1] if key else 'b'}: "
                f"{self.describe_answer(connection, key, seq)}, received twice")

    def describe_answer(self, connection: Connection, key: tuple | None, seq: int) -> str:
        """A message's answer, when it came relative to `connection`'s open, and the fault before it."""
        if key is None:
            return f"broadcast {seq}: delivered {self.broadcasts.get(seq)}"
        found = [p for p in self.publishes if (p.player, p.stream, p.seq) == (key[0], key[1], seq)]
        if not found:
            return f"{seq}: no answer"
        publish = found[0]
        fault = self.fault_before(publish.answered_at)
        return (f"{seq}: delivered {publish.delivered} queued {publish.queued} local {publish.local} at "
                f"{publish.answered_at - connection.opened_at:+.3f}s from the connection's open"
                f"{f', {publish.answered_at - fault[0]:.1f}s after {fault[1]}' if fault else ''}")

    def describe_unexpected_queued_loss(self, publish: Publish) -> str | None:
        """A message answered `queued` that no connection received although neither its
        expiry nor a full queue explains it: the player's next connection opened well within
        -offline-ttl of the answer (it takes its seat just after its 101), and fewer than
        -max-queued of its messages were queued after it before then. None when one of those
        explains it (its drop is counted)."""
        later = sorted((c for c in self.by_player.get(publish.player, ()) if c.opened_at > publish.answered_at),
                       key=lambda c: c.opened_at)
        if not later or later[0].opened_at - publish.answered_at > OFFLINE_TTL_S - SEAT_SLACK_S:
            return None
        taker = later[0]
        queued_after = sum(1 for other in self.publishes
                           if other.player == publish.player and other.queued
                           and publish.answered_at < other.answered_at < taker.opened_at)
        if queued_after >= MAX_QUEUED:
            return None
        received = taker.published if publish.stream == "p" else taker.raced
        fault = self.fault_before(publish.answered_at)
        return (f"player {publish.player} stream {publish.stream} {publish.seq}: answered "
                f"{publish.answered_at - taker.opened_at:+.3f}s from the next connection's open "
                f"({queued_after} queued after it before then), which received {received[:3]} first, "
                f"lived {(taker.close_started_at or taker.closed_at) - taker.opened_at:.1f}s, closed {taker.close_code}"
                f"{f', {publish.answered_at - fault[0]:.1f}s after {fault[1]}' if fault else ''}")

    def fault_before(self, at: float) -> tuple[float, str] | None:
        """The last fault injected before `at`, if any."""
        earlier = [fault for fault in self.faults if fault[0] <= at]
        return earlier[-1] if earlier else None

    def cause(self, publish: Publish) -> str:
        """What a lost live message is put down to."""
        if publish.stream == "r":
            return "close_race"
        fault = self.fault_before(publish.answered_at)
        if fault is not None and publish.sent_at - fault[0] < FAULT_WINDOW_S:
            return fault[1]
        return "unexplained"

    def wiped_by_redis(self, publish: Publish, any_player: bool = False) -> bool:
        """Whether a message not received may have been in Redis when Redis restarted or
        was flushed: a fault of that kind came after it was sent, while it could still
        be held (a queue holds it at most -offline-ttl, plus a sweep), before the player's
        next connection (`any_player`: a broadcast, whose missing player is not known)."""
        # From when it was sent: Redis may have taken it any time before the answer came
        # back, also just before a wipe whose time was taken while the answer was on its way.
        wipes = [at for at, kind in self.faults if kind in ("redis_restart", "redis_flushall")
                 and publish.sent_at <= at <= publish.answered_at + OFFLINE_TTL_S + WIPE_SLACK_S]
        if not wipes:
            return False
        if any_player:
            return True
        # A connection closed with 1013 was never seated: Redis failed while it took its
        # seat (and perhaps its backlog, with the reply lost as Redis went down).
        reconnected = [connection.opened_at for connection in self.by_player.get(publish.player, ())
                       if connection.opened_at > publish.answered_at and connection.close_code != NOT_SEATED]
        return not reconnected or min(reconnected) > wipes[0]

    def parked(self) -> Counter:
        """Publishes answered `queued` while the player had a connection open since well
        before the publish until after its answer, by the fault last before it."""
        found: Counter = Counter()
        for publish in self.publishes:
            if not publish.queued:
                continue
            for connection in self.by_player.get(publish.player, ()):
                ended = connection.close_started_at or connection.closed_at or float("inf")
                if connection.opened_at + 0.5 < publish.sent_at and ended > publish.answered_at + 0.5:
                    fault = self.fault_before(publish.answered_at)
                    found[fault[1] if fault else "no_fault"] += 1
                    break
        return found

    @property
    def by_player(self) -> dict[int, list[Connection]]:
        if not hasattr(self, "_by_player"):
            self._by_player: dict[int, list[Connection]] = {}
            for connection in self.connections:
                self._by_player.setdefault(connection.player, []).append(connection)
        return self._by_player


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--players", type=int, default=1000)
    parser.add_argument("--multi", type=float, default=0.1, help="share of players with 2 or 3 connections")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic, all rounds together")
    parser.add_argument("--rounds", type=int, default=4, help="times all clients come, trade and leave")
    parser.add_argument("--publish-rate", type=float, default=200.0, help="single-player publishes per second")
    parser.add_argument("--broadcast-rate", type=float, default=2.0, help="broadcasts per second")
    parser.add_argument("--mean-life", type=float, default=20.0, help="mean seconds a connection lives")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults", action="store_true",
                        help="two gateways on a private Redis; restart and flush it, replace the token file, "
                             "race publishes against closes")
    parser.add_argument("--json", action="store_true", help="end with the figures as one JSON line")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ws-soak-") as workdir:
        soak = Soak(options, Path(workdir))
        try:
            result = soak.run()
        finally:
            for process in soak.processes:
                if process.poll() is None:
                    process.kill()
            soak.stop_redis()
            for stderr in sorted(Path(workdir).glob("gateway*.stderr")):
                if stderr.read_text():
                    print(f"{stderr.name}:\n{stderr.read_text()[-3000:]}", file=sys.stderr)
    print(f"soak: {result['players']} players on {result['connection_slots']} connection slots, "
          f"{result['connections_opened']} connections opened over {result['duration_s']} s "
          f"in {result['rounds']} rounds")
    print(f"  publishes: {result['publishes']} ({result['publishes_live']} live, {result['publishes_queued']} queued "
          f"offline), broadcasts: {result['broadcasts']}, frames received: {result['frames_received']}")
    print(f"  offline messages given up: {result['queued_dropped_seen']} seen, metrics "
          f"{result['queued_dropped_metrics']}")
    print(f"  losses: {result['losses']}, duplicates: {result['duplicates']}, reordered: {result['reordered']}")
    print(f"  live copies not received: {result['live_copies_not_received']}, of which given up after being routed "
          f"again (metrics): {result['rerouted_given_up_metrics']} ({result['rerouted_given_up_out_of_order']} of them "
          f"out of order), unaccounted: {result['live_unaccounted']}; "
          f"queued not received minus their counted drops: {result['unaccounted_drops']}; drops counted beyond "
          f"those missing and those possibly wiped: {result['overcounted_drops']}")
    for example in result["reorder_examples"]:
        print(f"  reordered: {example}")
    for example in result["duplicate_examples"]:
        print(f"  doubled: {example}")
    for example in result["queued_loss_examples"]:
        print(f"  queued, not received, neither expired nor pushed out: {example}")
    if options.faults:
        print(f"  faults injected: {result['faults']}; losses by cause: {result['losses_by_cause']}; "
              f"raced publishes: {result['raced_publishes']}")
        print(f"  duplicates: {result['doubled_on_one_connection']} doubled on one connection, "
              f"{result['received_beyond_the_answer']} received on more connections than answered, by cause: "
              f"{result['beyond_the_answer_by_cause']}, of broadcasts: {result['broadcasts_beyond_the_answer']}")
        print(f"  queued while the player was connected (parked), by last fault: {result['queued_while_connected']}; "
              f"offline messages lost with Redis's data: {result['queued_lost_with_redis']}, live copies: "
              f"{result['live_lost_with_redis']}; "
              f"answers with scope local: {result['answers_scope_local']}; token file: {result['token_file']}")
        print(f"  end checks that timed out: {result['unsettled']}")
    print(f"  gateway memory (MiB, lists are per round): {result['rss_mib']}")
    print(f"  gateway greenlets: {result['greenlets']}, open fds: {result['open_fds']}, "
          f"objects tracked by gc: {result['gc_objects']}, allocated blocks: {result['allocated_blocks']}, "
          f"pymalloc arenas (1 MiB): {result['pymalloc_arenas']}, "
          f"traced by tracemalloc (KiB): {result['traced_kib']}")
    print(f"  close codes: {result['close_codes']}, refused publishes: {result['refused_publishes']}, "
          f"connect failures: {result['connect_failures']}, gateway exit: {result['gateway_exit_status']}, "
          f"load: {result['load_average']}")
    if options.json:
        print(json.dumps(result))
    bad = result["losses"] or result["duplicates"] or result["reordered"] or result["overcounted_drops"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
