#!/usr/bin/env python3
"""Soak the gateway with numbered messages and check that none is lost, doubled or reordered.

    .venv/bin/python bench/soak.py                            # 1,000 players, 10 minutes
    .venv/bin/python bench/soak.py --duration 30 --players 200  # what CI runs (tests/test_soak.py)

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
from gevent.event import Event  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from wsgateway.tokens import SQLITE_SCHEMA  # noqa: E402

GATEWAY = PROJECT / "bench" / "soak_gateway.py"
OFFLINE_TTL_S = 5.0
MAX_QUEUED = 20
PUBLISHERS = 8
HOT_PLAYERS = 10  # they get HOT_SHARE of the single-player publishes
HOT_SHARE = 0.2
STEP_TIMEOUT_S = 60.0  # for each phase that waits on the gateway


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
    broadcasts: list[int] = field(default_factory=list)
    sock: socket.socket | None = None
    closed: Event = field(default_factory=Event)

    def open(self, port: int, token: str) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT_S)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(f"GET /ws?token={token} HTTP/1.1\r\nHost: soak\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
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
                        (self.published if message["event"] == "p" else self.broadcasts).append(message["payload"])
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


class Soak:
    def __init__(self, options: argparse.Namespace, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.tokens: dict[int, str] = {}
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
        self.next_seq: dict[int, int] = {}
        self.go = Event()
        self.stopping = Event()
        self.final = Event()
        self.connect_failures: Counter = Counter()
        self.publish_failures: Counter = Counter()

    # --- the gateway --------------------------------------------------------------------
    def start_gateway(self) -> None:
        database = self.workdir / "tokens.db"
        with sqlite3.connect(database) as connection:
            for statement in SQLITE_SCHEMA:
                connection.execute(statement)
            rows = [(secrets.token_hex(16), player, "soak", 0, "2099-01-01 00:00:00")
                    for player in range(1, self.options.players + 1)]
            rows.append((self.server_token, None, "soak-backend", 1, "2099-01-01 00:00:00"))
            connection.executemany("INSERT INTO ws_token VALUES (?, ?, ?, ?, ?)", rows)
            self.tokens = {player: token for token, player, *_ in rows if player is not None}
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        environment = {name: value for name, value in os.environ.items() if not name.startswith("WS_GATEWAY_")}
        environment["WS_SOAK_STATS"] = str(self.workdir / "stats.json")
        self.process = subprocess.Popen(
            [sys.executable, str(GATEWAY), "-addr", f"127.0.0.1:{self.port}", "-dsn", f"file:{database}",
             "-rate-limit", "0", "-max-conns", "5", "-max-queued", str(MAX_QUEUED),
             "-offline-ttl", f"{OFFLINE_TTL_S:g}s", "-ping-period", "10s", "-pong-wait", "30s",
             "-revalidate-period", "5s",  # revalidation runs often, over a changing set of live tokens
             "-log-level", "warning", "-log-file", str(self.workdir / "gateway.log"), "-shutdown-timeout", "10s"],
            env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "gateway.stderr", "w"))
        self.wait_for(lambda: self.request("GET", "/healthz")[0] == 200, "the gateway to start")

    def stats(self) -> dict:
        path = self.workdir / "stats.json"
        before = json.loads(path.read_text())["sample"] if path.exists() else 0
        self.process.send_signal(signal.SIGUSR1)
        self.wait_for(lambda: path.exists() and json.loads(path.read_text())["sample"] > before, "gateway stats")
        return json.loads(path.read_text())

    def metrics(self) -> dict[tuple[str, tuple], float]:
        status, body = self.request("GET", "/metrics")
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def request(self, method: str, path: str, body: dict | None = None,
             connection: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
        own = connection is None
        connection = connection or http.client.HTTPConnection("127.0.0.1", self.port, timeout=STEP_TIMEOUT_S)
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
        while True:
            connection = Connection(player)
            try:
                connection.open(self.port, self.tokens[player])
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
            connection.close()
            if not self.final.is_set():
                gevent.sleep(rng.uniform(6.0, 8.0) if rng.random() < 0.1 else rng.uniform(0.05, 1.0))

    # --- traffic ------------------------------------------------------------------------
    def publisher(self, index: int) -> None:
        players = [player for player in range(1, self.options.players + 1) if player % PUBLISHERS == index]
        hot = [player for player in players if player <= HOT_PLAYERS]
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=STEP_TIMEOUT_S)
        rng = random.Random(self.options.seed * 1000 + index)
        interval_s = PUBLISHERS / self.options.publish_rate
        next_at = time.monotonic()
        while not self.stopping.is_set():
            player = rng.choice(hot) if hot and rng.random() < HOT_SHARE else rng.choice(players)
            self.publish(player, connection)
            next_at += interval_s
            gevent.sleep(max(0.0, next_at - time.monotonic()))
        connection.close()

    def publish(self, player: int, connection: http.client.HTTPConnection | None = None) -> None:
        seq = self.next_seq.get(player, 0) + 1
        self.next_seq[player] = seq
        status, body = self.request("POST", "/publish", {"player_id": player, "event": "p", "payload": seq}, connection)
        if status != 200:
            self.publish_failures[status] += 1  # not published: cannot be owed to anyone
            return
        answer = json.loads(body)
        self.publishes.append(Publish(player, seq, answer["delivered"], answer["queued"]))

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
        self.process.send_signal(signal.SIGTERM)
        exit_status = self.process.wait(STEP_TIMEOUT_S)
        return self.report(cold, rounds, metrics, exit_status)

    def round(self, duration_s: float) -> dict:
        """All clients in, traffic with reconnects for `duration_s`, the final check, all out."""
        for event in (self.go, self.stopping, self.final):
            event.clear()
        self.live.clear()
        clients = [gevent.spawn(self.client, slot) for slot in self.slots]
        self.wait_for(lambda: self.active() == len(self.slots),
                      lambda: f"every client connected ({self.active()} of {len(self.slots)}; connect failures: "
                              f"{dict(self.connect_failures)})")
        start = self.stats()
        started = time.monotonic()
        self.go.set()
        traffic = [gevent.spawn(self.publisher, index) for index in range(PUBLISHERS)]
        traffic.append(gevent.spawn(self.broadcaster))
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
        self.wait_for(lambda: self.active() == len(self.slots), "every client back for the final check")
        for player in range(1, self.options.players + 1):
            self.publish(player)
        final_broadcast = max(self.broadcasts, default=0) + 1
        self.broadcast(final_broadcast)
        self.wait_for(lambda: all(
            connection.published and connection.published[-1] == self.next_seq[connection.player]
            and connection.broadcasts and connection.broadcasts[-1] == final_broadcast
            for connection in self.live.values()), "the final messages on every connection")
        end_connected = self.stats()
        for connection in list(self.live.values()):
            gevent.spawn(connection.close)
        self.wait_for(lambda: self.active() == 0 and all(c.closed.is_set() for c in self.connections),
                      "every client gone")
        end = self.stats()
        return {"traffic_s": traffic_s, "start": start, "peak_rss_kib": peak_rss_kib,
                "end_connected": end_connected, "end": end}

    def active(self) -> int:
        return int(self.metrics().get(("ws_active_connections", ()), -1))

    def rss_kib(self) -> int:
        with open(f"/proc/{self.process.pid}/status", encoding="ascii") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

    # --- the verdict --------------------------------------------------------------------
    def report(self, cold: dict, rounds: list[dict], metrics: dict, exit_status: int) -> dict:
        def mib(kib: float) -> float:
            return round(kib / 1024, 1)

        receipts: Counter = Counter()  # (player, seq) -> connections that received it
        broadcast_receipts: Counter = Counter()
        reordered = duplicates = 0
        for connection in self.connections:
            for sequence, counter, key in ((connection.published, receipts, connection.player),
                                           (connection.broadcasts, broadcast_receipts, None)):
                seen = set()
                for previous, current in zip(sequence, sequence[1:]):
                    if current <= previous:
                        reordered += current < previous
                for seq in sequence:
                    if seq in seen:
                        duplicates += 1
                    seen.add(seq)
                    counter[(key, seq) if key is not None else seq] += 1
        lost_live = lost_queued = extra = 0
        queued = 0
        for publish in self.publishes:
            got = receipts[(publish.player, publish.seq)]
            if publish.queued:
                queued += 1
                lost_queued += got == 0
                extra += max(0, got - 1)
            else:
                lost_live += max(0, publish.delivered - got)
                extra += max(0, got - publish.delivered)
        for seq, delivered in self.broadcasts.items():
            got = broadcast_receipts[seq]
            lost_live += max(0, delivered - got)
            extra += max(0, got - delivered)

        def metric(name: str, **labels: str) -> float:
            return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

        dropped_offline = metric("ws_messages_dropped_total", reason="offline_expired") + metric(
            "ws_messages_dropped_total", reason="offline_queue_full")
        unaccounted = lost_queued - int(dropped_offline)
        losses = lost_live + max(0, unaccounted)
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
            "queued_dropped_metrics": {"offline_expired": metric("ws_messages_dropped_total", reason="offline_expired"),
                                       "offline_queue_full": metric("ws_messages_dropped_total",
                                                                    reason="offline_queue_full"),
                                       "slow_consumer": metric("ws_messages_dropped_total", reason="slow_consumer")},
            "offline_queue_left": metric("ws_offline_queue_messages"),
            "losses": losses,
            "unaccounted_drops": unaccounted,
            "duplicates": duplicates + extra,
            "reordered": reordered,
            "refused_publishes": dict(self.publish_failures),
            "connect_failures": dict(self.connect_failures),
            "close_codes": dict(Counter(c.close_code for c in self.connections)),
            "rss_mib": {"cold": mib(cold["rss_kib"]), "start": mib(rounds[0]["start"]["rss_kib"]),
                        "peak": mib(max(round_["peak_rss_kib"] for round_ in rounds)),
                        "end_connected": [mib(round_["end_connected"]["rss_kib"]) for round_ in rounds],
                        "after_clients_left": [mib(round_["end"]["rss_kib"]) for round_ in rounds],
                        "after_clients_left_trimmed": [mib(round_["end"]["rss_trimmed_kib"]) for round_ in rounds]},
            "greenlets": {"cold": cold["greenlets"], "start": rounds[0]["start"]["greenlets"],
                          "end_connected": [round_["end_connected"]["greenlets"] for round_ in rounds],
                          "after_clients_left": [round_["end"]["greenlets"] for round_ in rounds]},
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
    parser.add_argument("--json", action="store_true", help="end with the figures as one JSON line")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ws-soak-") as workdir:
        soak = Soak(options, Path(workdir))
        try:
            result = soak.run()
        finally:
            if soak.process is not None and soak.process.poll() is None:
                soak.process.kill()
            stderr = Path(workdir, "gateway.stderr")
            if stderr.exists() and stderr.read_text():
                print(f"gateway stderr:\n{stderr.read_text()[-3000:]}", file=sys.stderr)
    print(f"soak: {result['players']} players on {result['connection_slots']} connection slots, "
          f"{result['connections_opened']} connections opened over {result['duration_s']} s "
          f"in {result['rounds']} rounds")
    print(f"  publishes: {result['publishes']} ({result['publishes_live']} live, {result['publishes_queued']} queued "
          f"offline), broadcasts: {result['broadcasts']}, frames received: {result['frames_received']}")
    print(f"  offline messages given up: {result['queued_dropped_seen']} seen, metrics "
          f"{result['queued_dropped_metrics']}")
    print(f"  losses: {result['losses']}, duplicates: {result['duplicates']}, reordered: {result['reordered']}")
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
    bad = result["losses"] or result["duplicates"] or result["reordered"] or result["unaccounted_drops"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
