#!/usr/bin/env python3
"""What each gateway operation costs Redis: the commands it runs there (those inside Lua
scripts included) and Redis's CPU time, from `INFO commandstats` and `INFO cpu` deltas on a
private redis-server (a free port, nothing on disk, stopped by its pid), so that no other
client of a shared Redis is counted.

Two gateways, A and B, share the private Redis (`-broker`, one prefix). `--operations`
players connect to A from one client process; then, each measured on its own:

* connect: those players open their connections (A);
* publish, same gateway: `/publish` sent to A for players on A, until every frame arrived;
* publish, other gateway: `/publish` sent to B for the players on A;
* publish, offline: `/publish` sent to A for players with no connection (queued in Redis);
* batch message: `/publish/batch` of `--batch-size` messages to the players on A, per message;
* broadcast: `/broadcast` sent to A, every player on A (and so 2 gateways' streams), per broadcast;
* under load: `--publishers` keep-alive publishers (bench.py's HTTP clients) send `/publish`
  to one player, then batches to all, as fast as A answers, for `--load-s` each: messages/s,
  and A's and Redis's CPU per message (what one gateway core and one Redis node sustain);
* close: the players' sockets close (A's roster takes their seats away);
* heartbeat: a third gateway with `-presence-ttl 3s` holds the players idle; the presence
  upkeep per connection and heartbeat (every third of `-presence-ttl`).

A and B run with `-presence-ttl 10m`, so no presence heartbeat falls inside a measured
window; what they do while idle (the stream reader's `XREAD BLOCK` every second, the
offline sweeps) is measured first over `--idle-s` and subtracted, pro rata, from each
window. Figures are printed, never asserted.

    .venv/bin/python bench/redis_ops.py                     # 500 operations of each kind
    .venv/bin/python bench/redis_ops.py --operations 50 --broadcasts 5 --batch-size 10 --idle-s 1
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import redis

import bench as core
import lifecycle

HEARTBEAT_TTL_S = 3  # the heartbeat phase's -presence-ttl: a heartbeat every second
QUIET_TTL = "10m"  # the other phases': no heartbeat inside a measured window
WAIT_S = 120.0  # every wait for frames, connections or Redis


class PrivateRedis:
    """A redis-server of this bench's own on a free port, nothing on disk; `stop` ends it by its pid."""

    def __init__(self, directory: Path) -> None:
        self.port = core._free_port()
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(directory), "--maxclients", "10000"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    return
            except redis.RedisError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Usage:
    """What Redis did between two snapshots: calls by command, CPU seconds, wall seconds."""

    calls: dict[str, int] = field(default_factory=dict)
    cpu_s: float = 0.0
    elapsed_s: float = 0.0

    def minus(self, background: Usage) -> Usage:
        """This window less `background`'s rates over this window's length (never below zero)."""
        share = self.elapsed_s / background.elapsed_s if background.elapsed_s else 0.0
        calls = {name: max(0, round(count - background.calls.get(name, 0) * share))
                 for name, count in self.calls.items()}
        return Usage({name: count for name, count in calls.items() if count},
                     max(0.0, self.cpu_s - background.cpu_s * share), self.elapsed_s)

    @property
    def commands(self) -> int:
        return sum(self.calls.values())

    @property
    def scripts(self) -> int:
        return sum(count for name, count in self.calls.items() if name in ("evalsha", "eval", "fcall"))


class RedisCounters:
    """Snapshots of one Redis server's command counts, CPU time and memory."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=WAIT_S)
        self.own_calls: dict[str, int] = {}  # commands this bench sent while measuring, left out

    def players_present(self, prefix: str) -> int:
        """The players Redis holds present under `prefix` (a command left out of the figures)."""
        self.own_calls["zcard"] = self.own_calls.get("zcard", 0) + 1
        return int(self.client.zcard(f"{prefix}:players"))

    def snapshot(self) -> tuple[dict[str, int], float, float]:
        stats = self.client.info("commandstats")
        cpu = self.client.info("cpu")
        calls = {name.removeprefix("cmdstat_"): int(values["calls"]) for name, values in stats.items()}
        return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), time.monotonic()

    def memory_bytes(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def measure(self, action: Callable[[], Any]) -> Usage:
        """Run `action` and return what Redis did meanwhile (this bench's own INFO calls left out)."""
        self.own_calls = {}
        calls_before, cpu_before, started = self.snapshot()
        action()
        calls_after, cpu_after, ended = self.snapshot()
        delta = {name: count - calls_before.get(name, 0) - self.own_calls.get(name, 0)
                 for name, count in calls_after.items() if name != "info"}
        delta = {name: count for name, count in delta.items() if count}
        return Usage(delta, cpu_after - cpu_before, ended - started)


class Publisher:
    """A keep-alive HTTP connection to one gateway with the server token; every answer must be 200."""

    def __init__(self, gateway: core.GatewayUnderBench) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=WAIT_S)
        self.headers = {"Authorization": f"Bearer {gateway.server_token}", "Content-Type": "application/json"}

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.connection.request("POST", path, json.dumps(body), self.headers)
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise SystemExit(f"{path} answered {response.status}: {data[:200]!r}")
        return json.loads(data)

    def close(self) -> None:
        self.connection.close()


def wait_until(label: str, done: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Poll `done` until it holds; give up (SystemExit) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"{label}: not done after {timeout_s:.0f} s")
        time.sleep(0.02)


def active_connections(gateway: core.GatewayUnderBench) -> int:
    """ws_active_connections from the gateway's /metrics (no Redis call)."""
    status, body = gateway.request("GET", "/metrics")
    for line in body.decode().splitlines() if isinstance(body, bytes) else []:
        if line.startswith("ws_active_connections "):
            return int(float(line.split()[1]))
    raise SystemExit(f"/metrics answered {status} without ws_active_connections")


def frames_arrived(players: lifecycle.Players, expected: int) -> Callable[[], bool]:
    return lambda: players.stats()["text_frames"] >= expected


def describe(usage: Usage, per: int) -> str:
    """One table row's figures: per operation, commands, scripts, Redis CPU, and by command."""
    by_command = ", ".join(f"{name} {count / per:.2f}" for name, count in
                           sorted(usage.calls.items(), key=lambda item: -item[1]))
    return (f"{usage.commands / per:8.2f} | {usage.scripts / per:7.2f} | {usage.cpu_s / per * 1e6:8.1f} | "
            f"{by_command or '-'}")


def run(args: argparse.Namespace, directory: Path,
        redis_url: str) -> tuple[dict[str, tuple[Usage, int]], dict[str, Load]]:
    """Every measurement, as (what Redis did, how many operations it covers), and the runs under load."""
    prefix = f"wsgw-redis-ops-{os.getpid()}"
    count = args.operations
    flags = ["-broker", redis_url, "-broker-prefix", prefix, "-presence-ttl", QUIET_TTL, *args.gateway_flag]
    homes = [directory / name for name in ("a", "b", "heartbeat")]
    for home in homes:
        home.mkdir()
    counters = RedisCounters(redis_url)
    results: dict[str, tuple[Usage, int]] = {}
    loads: dict[str, Load] = {}
    gateway_a = core.GatewayUnderBench(homes[0], 2 * count, flags)
    gateway_b = core.GatewayUnderBench(homes[1], 2 * count, flags)
    to_a, to_b = Publisher(gateway_a), Publisher(gateway_b)
    players: lifecycle.Players | None = None
    try:
        players = lifecycle.Players(gateway_a, count, count)
        core.progress("idle")
        idle = counters.measure(lambda: time.sleep(args.idle_s))
        results["idle, 2 gateways, per second"] = (idle, max(1, round(idle.elapsed_s)))

        def measured(name: str, action: Callable[[], Any], per: int) -> None:
            core.progress(name)
            results[name] = (counters.measure(action).minus(idle), per)

        def connect() -> None:
            players.command({"cmd": "open", "start_at": time.monotonic()})
            wait_until("connect", lambda: players.stats()["open"] >= count)
        measured("connect", connect, count)

        connected = [gateway_a.player_id(token) for token in gateway_a.player_tokens[:count]]
        offline = [gateway_a.player_id(token) for token in gateway_a.player_tokens[count:]]

        def publish(publisher: Publisher, targets: list[int], arrive: bool) -> Callable[[], None]:
            def action() -> None:
                players.command({"cmd": "reset", "reconnect": False})
                for player in targets:
                    publisher.post("/publish", {"player_id": player, "event": "ops", "payload": {"text": "x" * 100}})
                if arrive:
                    wait_until("publish", frames_arrived(players, len(targets)))
            return action
        measured("publish, player on the same gateway", publish(to_a, connected, True), count)
        measured("publish, player on another gateway", publish(to_b, connected, True), count)
        measured("publish, player offline (queued)", publish(to_a, offline, False), count)

        def batch() -> None:
            players.command({"cmd": "reset", "reconnect": False})
            for start in range(0, count, args.batch_size):
                to_a.post("/publish/batch", {"messages": [
                    {"player_id": player, "event": "ops", "payload": {"text": "x" * 100}}
                    for player in connected[start:start + args.batch_size]]})
            wait_until("batch", frames_arrived(players, count))
        measured(f"batch message ({args.batch_size} per request)", batch, count)

        def broadcast() -> None:
            players.command({"cmd": "reset", "reconnect": False})
            for index in range(args.broadcasts):
                to_a.post("/broadcast", {"event": "ops", "payload": {"round": index}})
            wait_until("broadcast", frames_arrived(players, count * args.broadcasts))
        measured(f"broadcast ({count} players, 2 gateways)", broadcast, args.broadcasts)

        for mode, label in (("publish", "/publish under load"), ("batch", "batch message under load")):
            loads[label] = under_load(args, gateway_a, players, connected, counters, idle, mode)

        def close() -> None:
            players.close()
            wait_until("close", lambda: active_connections(gateway_a) == 0 and counters.players_present(prefix) == 0)
        measured("close", close, count)
    finally:
        if players is not None:
            players.close()
        to_a.close()
        to_b.close()
        gateway_a.stop()
        gateway_b.stop()
    results.update(heartbeat(args, homes[2], redis_url, prefix, counters))
    return results, loads


@dataclass
class Load:
    """Messages published as fast as one gateway process answers, and what they cost."""

    messages: int
    elapsed_s: float
    gateway_cpu_s: float
    redis: Usage


def under_load(args: argparse.Namespace, gateway: core.GatewayUnderBench, players: lifecycle.Players,
               connected: list[int], counters: RedisCounters, idle: Usage, mode: str) -> Load:
    """`--publishers` keep-alive publishers (bench.py's HTTP clients, two processes) for
    `--load-s`: `/publish` to one connected player, or batches to all of them."""
    core.progress(f"{mode} under load")
    processes = 2
    clients = [core.Worker("http", {"mode": mode, "port": gateway.port, "token": gateway.server_token,
                                    "players": connected, "batch_size": args.batch_size,
                                    "connections": args.publishers // processes, "seed": index,
                                    "processes": processes, "duration_s": args.load_s})
               for index in range(processes)]
    replies: list[dict[str, Any]] = []
    try:
        for client in clients:
            client.receive()  # connected
        players.command({"cmd": "reset", "reconnect": False})
        cpu_before = gateway.cpu_s

        def action() -> None:
            for client in clients:
                client.send({"cmd": "go"})
            replies.extend(client.receive() for client in clients)
            wait_until(f"{mode} under load", frames_arrived(players, sum(reply["messages"] for reply in replies)))
        usage = counters.measure(action).minus(idle)
        gateway_cpu_s = gateway.cpu_s - cpu_before
    finally:
        for client in clients:
            client.stop()
    if any(reply["errors"] for reply in replies):
        raise SystemExit(f"{mode} under load: answers other than 200: {[reply['first_error'] for reply in replies]}")
    return Load(sum(reply["messages"] for reply in replies), max(reply["elapsed_s"] for reply in replies),
                gateway_cpu_s, usage)


def heartbeat(args: argparse.Namespace, home: Path, redis_url: str, prefix: str,
              counters: RedisCounters) -> dict[str, tuple[Usage, int]]:
    """The presence upkeep of `--operations` idle connections, per connection and heartbeat."""
    count = args.operations
    gateway = core.GatewayUnderBench(home, count, ["-broker", redis_url, "-broker-prefix", f"{prefix}-heartbeat",
                                                   "-presence-ttl", f"{HEARTBEAT_TTL_S}s", *args.gateway_flag])
    players: lifecycle.Players | None = None
    try:
        players = lifecycle.Players(gateway, count, count)
        players.command({"cmd": "open", "start_at": time.monotonic()})
        wait_until("heartbeat: connect", lambda: players.stats()["open"] >= count)
        core.progress("heartbeat")
        bare = counters.measure(lambda: time.sleep(args.idle_s))  # one gateway's idle work, heartbeats too
    finally:
        if players is not None:
            players.close()
        gateway.stop()
    heartbeats = max(1, round(bare.elapsed_s * 3 / HEARTBEAT_TTL_S))
    return {f"heartbeat ({count} connections, every third of -presence-ttl)": (bare, heartbeats * count)}


def report(results: dict[str, tuple[Usage, int]], loads: dict[str, Load], args: argparse.Namespace,
           redis_url: str) -> None:
    print(f"\nRedis work per operation ({redis_url}, private; load {core.load_average()}):")
    print("| operation | commands | scripts | Redis CPU µs | commands by name (per operation) |")
    print("|---|---|---|---|---|")
    for name, (usage, per) in results.items():
        print(f"| {name} | {describe(usage, per)} |")
    print(f"\nOne gateway process with -broker, {args.publishers} keep-alive publishers for {args.load_s:g} s "
          f"(batches of {args.batch_size}):")
    print("| load | messages/s | gateway CPU µs/message | Redis CPU µs/message | Redis CPU, % of a core "
          "| commands/message |")
    print("|---|---|---|---|---|---|")
    for name, load in loads.items():
        print(f"| {name} | {load.messages / load.elapsed_s:,.0f} | {load.gateway_cpu_s / load.messages * 1e6:.1f} | "
              f"{load.redis.cpu_s / load.messages * 1e6:.1f} | {load.redis.cpu_s / load.redis.elapsed_s * 100:.0f} | "
              f"{load.redis.commands / load.messages:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--operations", type=int, default=500, help="players, and operations of each kind")
    parser.add_argument("--batch-size", type=int, default=100, help="messages per /publish/batch request")
    parser.add_argument("--broadcasts", type=int, default=50, help="broadcasts measured")
    parser.add_argument("--idle-s", type=float, default=5.0, help="each idle window (background, heartbeats)")
    parser.add_argument("--publishers", type=int, default=16, help="keep-alive publishers of the runs under load")
    parser.add_argument("--load-s", type=float, default=5.0, help="length of each run under load")
    parser.add_argument("--gateway-flag", action="append", default=[], metavar="FLAG",
                        help="extra ws-gateway flag (repeatable)")
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed")
    print(f"ws-gateway Redis operations: {os.cpu_count()} cores, load {core.load_average()}", flush=True)
    directory = Path(tempfile.mkdtemp(prefix="ws-gateway-redis-ops-"))
    server = PrivateRedis(directory)
    try:
        results, loads = run(args, directory, server.url)
    finally:
        core.progress("")
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    report(results, loads, args, server.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
