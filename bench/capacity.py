#!/usr/bin/env python3
"""How many players one host holds: `--players` connections to one `bin/ws-gateway
-workers N` (default 50,000 on 4 workers), then broadcasts that must reach every one.

`-workers` needs `-broker`, so the gateway runs on a private redis-server (a free port,
nothing on disk, stopped by its pid; `--redis URL` uses another server under a fresh
`-broker-prefix`, whose keys are deleted at the end). The tokens are in the gateway's
embedded sqlite (bench.py's `GatewayUnderBench`). The players are bench/lifecycle.py's
epoll client processes, `--connections-per-client` each, each from its own loopback
address (127.0.0.2, ...), so that no (source, destination) pair runs out of ephemeral
ports; they open `--open-per-s` connections per second between them. Each gateway
process must stay below its descriptor limit (`ulimit -n`; the workers share the
connections, as the kernel hands them out). Printed, never asserted:

* connect: the time from the first attempt until every player is open, connections/s,
  failed attempts by kind, and the gateway's CPU per connection (every worker);
* memory: the RSS of every gateway process (supervisor and workers) before and after,
  per connection; each worker's connections and descriptors; Redis's memory per
  connection (private Redis only);
* idle: what `--idle-s` with every player connected costs (the presence heartbeats):
  gateway CPU, and Redis commands and CPU per second (private Redis only);
* broadcast: `--broadcasts` times one `/broadcast`, the time until its answer and until the
  last player received the frame, how many received it, the gateway's CPU for it;
* errors: failed connection attempts, connections the gateway closed, frames that never
  arrived, and the gateway log's warning and error lines, by event.

    .venv/bin/python bench/capacity.py                                   # 50,000 players, 4 workers, 1,000/s
    .venv/bin/python bench/capacity.py --players 200 --workers 2 --connections-per-client 50 --idle-s 1
    .venv/bin/python bench/capacity.py --redis redis://127.0.0.1:6379/0  # a shared Redis, own prefix
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import redis

import bench as core
import lifecycle
from redis_ops import PrivateRedis, RedisCounters, wait_until

SETTLE_S = 2.0  # after the last connection opened, before memory is read: the workers' late bookkeeping
WAIT_S = 600.0  # the bound of the waits for the workers and the connections
BROADCAST_WAIT_S = 60.0  # after it, the frames a broadcast did not bring count as missing


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (a `-workers` supervisor's workers), from /proc."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            children = [int(child) for child in handle.read().split()]
    except OSError:
        children = []
    return [pid] + [descendant for child in children for descendant in process_tree(child)]


def descriptors(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def tree_rss_bytes(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        try:
            total += core.process_rss_bytes(member)
        except OSError:
            pass  # ended meanwhile
    return total


def error_lines(log_path: Path) -> dict[str, int]:
    """The gateway log's lines at warning level or above, by level and event."""
    counts: dict[str, int] = {}
    if not log_path.exists():
        return counts
    with open(log_path, encoding="utf-8", errors="replace") as log:
        for line in log:
            try:
                entry = json.loads(line)
            except ValueError:
                counts["not_json"] = counts.get("not_json", 0) + 1
                continue
            if entry.get("level") in ("warning", "error", "critical"):
                kind = f"{entry['level']} {entry.get('event', '?')}"
                counts[kind] = counts.get(kind, 0) + 1
    return counts


def report(label: str, text: str) -> None:
    core.progress("")
    print(f"{label:>10}: {text}   [load {core.load_average()}]", flush=True)


class Host:
    """One `-workers N` gateway holding `--players` connections, and what they cost."""

    def __init__(self, args: argparse.Namespace, directory: Path, redis_url: str, private_redis: bool) -> None:
        self.args = args
        self.prefix = f"wsgw-capacity-{os.getpid()}-{int(time.time())}"
        self.redis_url = redis_url
        self.counters = RedisCounters(redis_url) if private_redis else None
        self.errors: dict[str, int] = {}
        self.gateway = core.GatewayUnderBench(directory, args.players, [
            "-workers", str(args.workers), "-broker", redis_url, "-broker-prefix", self.prefix, *args.gateway_flag])
        registry = redis.Redis.from_url(redis_url, socket_timeout=30)
        try:  # every worker has registered with Redis (its presence heartbeat at start)
            wait_until("the workers' start", lambda: registry.zcard(f"{self.prefix}:gateways") >= args.workers,
                       WAIT_S)
        except BaseException:
            self.gateway.stop()
            raise
        finally:
            registry.close()
        self.players: lifecycle.Players | None = None
        self.idle_cpu_share = 0.0  # of a core, every gateway process: holding the players, nothing sent

    def workers(self) -> list[int]:
        return process_tree(self.gateway.process.pid)[1:]

    def connect(self) -> None:
        args = self.args
        rss_before = tree_rss_bytes(self.gateway.process.pid)
        redis_before = self.counters.memory_bytes() if self.counters else 0
        cpu_before = self.gateway.cpu_s
        core.progress("starting the client processes")
        self.players = players = lifecycle.Players(self.gateway, args.players, args.connections_per_client)
        per_tick = max(1, round(args.open_per_s * lifecycle.TICK_S))
        players.command({"cmd": "open", "start_at": time.monotonic() + 0.2, "per_tick": per_tick})
        stats = players.wait("connect", lambda stats: stats["open"] >= args.players, timeout_s=WAIT_S)
        cpu_s = self.gateway.cpu_s - cpu_before
        if stats["timed_out"]:
            raise SystemExit(f"only {stats['open']:,} of {args.players:,} players open after {WAIT_S:.0f} s, "
                             f"{stats['failed']:,} failed attempts {stats['failed_by']}")
        elapsed_s = stats["last_open"] - stats["first_attempt"]
        self.errors.update({f"connect {kind}": count for kind, count in stats["failed_by"].items()})
        report("connect", f"{args.players:,} players open in {elapsed_s:.2f} s: {args.players / elapsed_s:,.0f} "
                          f"connections/s (offered {args.open_per_s:,}/s from {len(players.clients)} client "
                          f"processes), {lifecycle._failures(stats)}, gateway CPU "
                          f"{cpu_s / args.players * 1e6:.0f} µs/connection (all {args.workers} workers), clients' "
                          f"CPU {stats['cpu_s'] / args.players * 1e6:.0f} µs/connection")
        time.sleep(SETTLE_S)
        rss_after = tree_rss_bytes(self.gateway.process.pid)
        per_worker = ", ".join(f"{descriptors(pid):,}" for pid in self.workers())
        report("memory", f"gateway RSS (supervisor + {args.workers} workers) {rss_before / 2**20:.0f} -> "
                         f"{rss_after / 2**20:.0f} MiB: {(rss_after - rss_before) / args.players / 1024:.1f} KiB per "
                         f"connection ({rss_after / args.players / 1024:.1f} KiB with the baseline); descriptors per "
                         f"worker {per_worker} (limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]:,})")
        if self.counters:
            redis_after = self.counters.memory_bytes()
            report("redis", f"used_memory {redis_before / 2**20:.1f} -> {redis_after / 2**20:.1f} MiB: "
                            f"{(redis_after - redis_before) / args.players:.0f} bytes per connection")

    def idle(self) -> None:
        """The cost of holding every player for `--idle-s`: presence heartbeats, pings."""
        cpu_before = self.gateway.cpu_s
        started = time.monotonic()
        usage = self.counters.measure(lambda: time.sleep(self.args.idle_s)) if self.counters else None
        if usage is None:
            time.sleep(self.args.idle_s)
        elapsed_s = time.monotonic() - started
        self.idle_cpu_share = (self.gateway.cpu_s - cpu_before) / elapsed_s
        redis_text = ""
        if usage is not None:
            redis_text = (f"; Redis {usage.commands / elapsed_s:,.0f} commands/s ({usage.scripts / elapsed_s:,.0f} "
                          f"scripts/s), Redis CPU {usage.cpu_s / elapsed_s * 100:.1f} % of a core")
        report("idle", f"{self.args.players:,} players held {elapsed_s:.1f} s: gateway CPU "
                       f"{self.idle_cpu_share * 100:.1f} % of a core{redis_text}")

    def count_closes(self) -> None:
        """Add the connections the gateway closed since the clients' last reset to the errors."""
        assert self.players is not None
        for code, count in self.players.stats()["close_codes"].items():
            kind = f"closed by the gateway ({code})"
            self.errors[kind] = self.errors.get(kind, 0) + count

    def broadcast(self, number: int) -> None:
        assert self.players is not None
        players = self.players
        self.count_closes()
        players.command({"cmd": "reset", "reconnect": False})
        cpu_before = self.gateway.cpu_s
        started = time.monotonic()
        status, body = self.gateway.request("POST", "/broadcast", {"event": "capacity", "payload": {
            "broadcast": number, "text": "x" * 100}})
        answered_s = time.monotonic() - started
        if status != 200:
            raise SystemExit(f"/broadcast answered {status}: {body!r}")
        deadline = time.monotonic() + BROADCAST_WAIT_S
        while (stats := players.stats())["text_frames"] < self.args.players and time.monotonic() < deadline:
            core.progress(f"broadcast {number}: {stats['text_frames']:,} of {self.args.players:,} received")
            time.sleep(0.05)
        # beyond what holding the players costs anyway (heartbeats, pings), as measured idle
        cpu_s = max(0.0, self.gateway.cpu_s - cpu_before - self.idle_cpu_share * (time.monotonic() - started))
        missing = self.args.players - stats["text_frames"]
        if missing:
            self.errors["frames missing"] = self.errors.get("frames missing", 0) + missing
        last_s = (stats["last_text"] or started) - started
        report(f"broadcast {number}", f"answered in {answered_s * 1e3:.0f} ms ({body}), last of "
                                      f"{stats['text_frames']:,} players received it "
                                      f"{last_s * 1e3:.0f} ms after it was sent; "
                                      f"gateway CPU beyond idle {cpu_s * 1e3:.0f} ms "
                                      f"({cpu_s / self.args.players * 1e6:.1f} µs/delivery)")

    def close(self) -> None:
        if self.players is not None:
            self.count_closes()
            self.players.close()
        self.gateway.stop()
        self.errors.update({f"log {event}": count for event, count in error_lines(self.gateway.log_path).items()})
        if not self.counters:
            core._forget_cluster(self.redis_url, self.prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--players", type=int, default=50_000, help="connections, one per player")
    parser.add_argument("--workers", type=int, default=4, help="the gateway's -workers")
    parser.add_argument("--connections-per-client", type=int, default=2500, help="connections per client process")
    parser.add_argument("--open-per-s", type=int, default=1000,
                        help="connection attempts per second, all clients (1,000: what this project's loaded 2-core "
                             "machine took without a refusal; 2,500 collapsed into 503s)")
    parser.add_argument("--broadcasts", type=int, default=3, help="broadcasts to every player, one after another")
    parser.add_argument("--idle-s", type=float, default=10.0, help="how long every player is held idle")
    parser.add_argument("--redis", default="", help="a Redis to use instead of a private redis-server")
    parser.add_argument("--gateway-flag", action="append", default=[], metavar="FLAG",
                        help="extra ws-gateway flag, e.g. --gateway-flag=-presence-ttl=60s (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (gateway log)")
    args = parser.parse_args(argv)
    print(f"ws-gateway capacity: {args.players:,} players, -workers {args.workers}, {os.cpu_count()} cores, "
          f"load {core.load_average()}, descriptor limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]:,}",
          flush=True)
    directory = Path(tempfile.mkdtemp(prefix="ws-gateway-capacity-"))
    server = None if args.redis else PrivateRedis(directory)
    host = None
    failure = ""
    try:
        host = Host(args, directory, args.redis or server.url, private_redis=server is not None)
        host.connect()
        host.idle()
        for number in range(1, args.broadcasts + 1):
            host.broadcast(number)
    except (SystemExit, KeyboardInterrupt) as exc:  # given up, or stopped: still say what went wrong on the way
        failure = str(exc) or "interrupted"
    finally:
        core.progress("")
        if host is not None:
            host.close()
        if server is not None:
            server.stop()
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    errors = ", ".join(f"{kind} {count:,}" for kind, count in sorted(host.errors.items())) if host else "?"
    report("errors", errors or "none")
    if failure:
        report("failed", failure)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
