#!/usr/bin/env python3
"""Connection life-cycle scenarios, the way echoCTF.RED's players and publisher behave.

Run from `bench.py --scenarios connect,storm,stop,publish_close` (or this file, same
options), each prints its figure and the gateway's CPU time:

* connect: `--storm-players` players open their connections, 200 every 20 ms across the
  client processes; the time from the first attempt until every one is open, failed
  attempts, and server CPU per admitted connection (all included: accept, HTTP, handshake,
  token lookup, hub);
* storm: those players connected, the gateway gets SIGTERM and a new process starts on
  the same port and database at once; each player reconnects as the browser client does
  (1 s after its close, doubling up to 30 s after each failed attempt, no jitter). The
  time from the first close until all are back, failed attempts by kind, the old
  process's exit, and the new process's CPU per reconnect (its start-up included);
* stop: the players connected to that new process, SIGTERM, no reconnecting: the time
  until the process exits and until the last player had its close frame, by close code;
* publish_close: `/publish` from `--publishers` publishers that open a new connection
  for each request and send `Connection: close` (as echoCTF's PHP publisher does),
  requests/s and server CPU per request.

The clients are plain non-blocking sockets and epoll, like bench.py's, `--connections-per-client`
players per process; each process connects from its own loopback address (127.0.0.2,
127.0.0.3, ...), so that ephemeral ports never run short. They count the text frames
they receive (bench/capacity.py's broadcasts use these clients too). Clients are this file run as
`lifecycle.py _worker player|close_publisher SPEC`.
"""
from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench as core

SCENARIOS = ("connect", "storm", "stop", "publish_close")
FIRST_RETRY_S = 1.0  # echoCTF.RED's client: reconnect 1 s after a close,
MAX_RETRY_S = 30.0  # doubling after each failed attempt, up to 30 s
OPEN_PER_TICK, TICK_S = 200, 0.020  # the connect scenario's pace: 200 players every 20 ms
SCENARIO_TIMEOUT_S = 180.0
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux: pick the port at connect


class ScenarioIncomplete(Exception):
    """A scenario did not finish in time (reported): those after it on the same players are skipped."""


class Client(core.Worker):
    SCRIPT = Path(__file__).resolve()


def source_address(index: int) -> str:
    """The loopback address client process `index` connects from."""
    return f"127.0.0.{2 + index % 250}"


class Players:
    """`count` players spread over client processes, all with the same reconnect policy."""

    def __init__(self, gateway: core.GatewayUnderBench, count: int, per_client: int) -> None:
        tokens = gateway.player_tokens[:count]
        processes = max(1, -(-count // per_client))
        self.count = count
        # Interleaved, so that every process opens its share of each tick's 200.
        self.clients = [Client("player", {"port": gateway.port, "source": source_address(index),
                                          "tokens": tokens[index::processes],
                                          "order": list(range(index, count, processes))})
                        for index in range(processes)]
        for client in self.clients:
            client.receive()  # ready

    def command(self, command: dict[str, Any]) -> list[dict[str, Any]]:
        for client in self.clients:
            client.send(command)
        return [client.receive() for client in self.clients]

    def stats(self) -> dict[str, Any]:
        """The clients' counters, summed (times: earliest first, latest last)."""
        replies = self.command({"cmd": "stats"})
        total: dict[str, Any] = {"open": 0, "failed": 0, "reopened": 0, "closed": 0, "attempts": 0,
                                 "text_frames": 0, "failed_by": {}, "close_codes": {}, "cpu_s": 0.0}
        for reply in replies:
            for key in ("open", "failed", "reopened", "closed", "attempts", "text_frames", "cpu_s"):
                total[key] += reply[key]
            for key in ("failed_by", "close_codes"):
                for name, value in reply[key].items():
                    total[key][name] = total[key].get(name, 0) + value
        for key, pick in (("first_attempt", min), ("first_close", min), ("last_open", max), ("last_close", max),
                          ("first_refused", min), ("last_refused", max), ("last_text", max)):
            values = [reply[key] for reply in replies if reply[key] is not None]
            total[key] = pick(values) if values else None
        return total

    def wait(self, label: str, done: Any, timeout_s: float = SCENARIO_TIMEOUT_S,
             also: Any = None) -> dict[str, Any]:
        """Poll the clients until `done(stats)` or `timeout_s` (then `stats["timed_out"]`);
        `also()` runs at each poll."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.stats()
            if also is not None:
                also()
            core.progress(f"{label}: {stats['open']:,} open, {stats['reopened']:,} reopened, "
                          f"{stats['failed']:,} failed attempts")
            stats["timed_out"] = time.monotonic() > deadline
            if done(stats) or stats["timed_out"]:
                return stats
            time.sleep(0.05)

    def close(self) -> None:
        for client in self.clients:
            client.stop()


def _failures(stats: dict[str, Any]) -> str:
    kinds = ", ".join(f"{name} {count:,}" for name, count in sorted(stats["failed_by"].items()))
    return f"{stats['failed']:,} failed attempts" + (f" ({kinds})" if kinds else "")


def _refusals(stats: dict[str, Any], since: float) -> str:
    """When connecting was refused (nothing listened), as the clients saw it."""
    if stats["first_refused"] is None:
        return "no attempt found the port closed"
    return (f"attempts refused from {stats['first_refused'] - since:.2f} to {stats['last_refused'] - since:.2f} s "
            "after SIGTERM")


def _codes(stats: dict[str, Any]) -> str:
    return ", ".join(f"{code}: {count:,}" for code, count in sorted(stats["close_codes"].items()))


def _report(scenario: str, text: str) -> None:
    core.progress("")
    print(f"{scenario:>14}: {text}   [load {core.load_average()}]", flush=True)


def connect_rate(gateway: core.GatewayUnderBench, players: Players, results: dict[str, float]) -> None:
    cpu_before = gateway.cpu_s
    user_before, system_before = core.process_cpu_split_s(gateway.process.pid)
    start_at = time.monotonic() + 0.2
    players.command({"cmd": "open", "start_at": start_at})
    stats = players.wait("connect", lambda stats: stats["open"] >= players.count)
    cpu_s = gateway.cpu_s - cpu_before
    user_s, system_s = core.process_cpu_split_s(gateway.process.pid)
    split = (f"user {(user_s - user_before) / players.count * 1e6:.0f} + system "
             f"{(system_s - system_before) / players.count * 1e6:.0f}")
    if stats["timed_out"]:
        _report("connect", f"only {stats['open']:,} of {players.count:,} players open after "
                           f"{SCENARIO_TIMEOUT_S:.0f} s, {_failures(stats)}")
        raise ScenarioIncomplete
    elapsed_s = stats["last_open"] - start_at
    results["connect_s"] = elapsed_s
    results["connect_cpu_us_per_connection"] = cpu_s / players.count * 1e6
    results["connect_failed_attempts"] = stats["failed"]
    _report("connect", f"{players.count:,} players open in {elapsed_s:.2f} s (the schedule takes "
                       f"{(players.count - 1) // OPEN_PER_TICK * TICK_S:.2f} s), {_failures(stats)}, "
                       f"server CPU {cpu_s / players.count * 1e6:.0f} µs/connection ({split}), clients' CPU "
                       f"{stats['cpu_s'] / players.count * 1e6:.0f} µs/connection")


def storm(old: core.GatewayUnderBench, players: Players, flags: list[str],
          results: dict[str, float]) -> core.GatewayUnderBench:
    """SIGTERM `old`, start its successor at once; return the successor, all players on it."""
    players.command({"cmd": "reset", "reconnect": True})
    home = old.directory / "restarted"
    home.mkdir()
    signalled = time.monotonic()
    old.process.send_signal(signal.SIGTERM)
    new = core.GatewayUnderBench(home, 0, flags, port=old.port, tokens_from=old, listener=old.listener)
    exited: list[float] = []

    def watch_old() -> None:
        if not exited and exited_cpu_s(old.process.pid) is not None:
            exited.append(time.monotonic())
    stats = players.wait("storm", lambda stats: stats["reopened"] >= players.count, also=watch_old)
    cpu_s = new.cpu_s
    user_s, system_s = core.process_cpu_split_s(new.process.pid)
    if stats["timed_out"]:
        _report("storm", f"only {stats['reopened']:,} of {players.count:,} players back after "
                         f"{SCENARIO_TIMEOUT_S:.0f} s, {_failures(stats)}")
        new.stop()
        raise ScenarioIncomplete
    while not exited:
        watch_old()
        time.sleep(0.01)
    elapsed_s = stats["last_open"] - stats["first_close"]
    results["storm_s"] = elapsed_s
    results["storm_failed_attempts"] = stats["failed"]
    results["storm_cpu_us_per_reconnect"] = cpu_s / players.count * 1e6
    _report("storm", f"{players.count:,} players back {elapsed_s:.2f} s after the first close, {_failures(stats)}; "
                     f"old process exited {exited[0] - signalled:.2f} s after SIGTERM (close codes {_codes(stats)}, "
                     f"last close {stats['last_close'] - signalled:.2f} s after SIGTERM); {_refusals(stats, signalled)}; "
                     f"new process's CPU "
                     f"{cpu_s * 1e6 / players.count:.0f} µs/reconnect, its start-up included ({cpu_s:.2f} s: user "
                     f"{user_s:.2f} + system {system_s:.2f})")
    return new


def stop(gateway: core.GatewayUnderBench, players: Players, results: dict[str, float]) -> None:
    players.command({"cmd": "reset", "reconnect": False})
    cpu_before = gateway.cpu_s
    signalled = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    deadline = signalled + SCENARIO_TIMEOUT_S
    while (cpu_at_exit := exited_cpu_s(gateway.process.pid)) is None and time.monotonic() < deadline:
        time.sleep(0.005)
    exited_s = time.monotonic() - signalled
    stats = players.wait("stop", lambda stats: stats["closed"] >= players.count, timeout_s=30)
    results["stop_s"] = exited_s
    cpu_text = f"{(cpu_at_exit - cpu_before) * 1e3:.0f} ms" if cpu_at_exit is not None else "?"
    _report("stop", f"{players.count:,} players: process exited {exited_s:.2f} s after SIGTERM, last close "
                    f"received {stats['last_close'] - signalled:.2f} s after it (close codes {_codes(stats)}); "
                    f"server CPU from SIGTERM to exit {cpu_text}")


def exited_cpu_s(pid: int) -> float | None:
    """The CPU seconds of a process that has exited but is not reaped yet (a zombie keeps
    its times in /proc), else None. Popen.poll() must not be called meanwhile: it reaps."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] not in ("Z", "X"):
        return None
    return (int(fields[11]) + int(fields[12])) * core.CLOCK_TICKS_S


def publish_close(args: argparse.Namespace, gateway: core.GatewayUnderBench, results: dict[str, float]) -> None:
    """`/publish` to one connected player, a new connection (and `Connection: close`) per request."""
    player = Players(gateway, 1, 1)
    try:
        player.command({"cmd": "open", "start_at": time.monotonic()})
        player.wait("publish_close: player", lambda stats: stats["open"] >= 1)
        processes = max(1, min(args.http_clients, args.publishers))
        clients = [Client("close_publisher", {
            "port": gateway.port, "source": source_address(100 + index), "token": gateway.server_token,
            "player_id": gateway.player_id(gateway.player_tokens[0]), "duration_s": args.duration_s,
            "connections": args.publishers // processes + (index < args.publishers % processes)})
            for index in range(processes)]
        for client in clients:
            client.receive()
        cpu_before = gateway.cpu_s
        for client in clients:
            client.send({"cmd": "go"})
        replies = [client.receive() for client in clients]
        server_cpu_s = gateway.cpu_s - cpu_before
        for client in clients:
            client.stop()
    finally:
        player.close()
    requests = sum(reply["requests"] for reply in replies)
    errors = sum(reply["errors"] for reply in replies)
    if errors:
        raise SystemExit(f"publish_close: {errors} requests failed: {[reply['first_error'] for reply in replies]}")
    rate = requests / max(reply["elapsed_s"] for reply in replies)
    results["publish_close_requests_per_s"] = rate
    _report("publish_close", f"{rate:,.0f} requests/s ({args.publishers} publishers, a new connection per request, "
                             f"server CPU {server_cpu_s / requests * 1e6:.0f} µs/request, clients' CPU "
                             f"{sum(reply['cpu_s'] for reply in replies) / requests * 1e6:.0f} µs/request)")


def run(args: argparse.Namespace, directory: Path, scenarios: set[str]) -> dict[str, float]:
    """Run the selected life-cycle scenarios, each on gateways of its own; their figures."""
    results: dict[str, float] = {}
    flags = list(args.gateway_flag)
    if scenarios & {"connect", "storm", "stop"}:
        home = directory / "lifecycle"
        home.mkdir()
        listener = core.listening_socket() if args.socket_activation else None
        gateway = core.GatewayUnderBench(home, args.storm_players, flags, mysql_url=args.mysql, listener=listener)
        _report("start", f"a gateway with {args.storm_players:,} tokens answers /healthz {gateway.ready_s:.2f} s "
                         "after its process starts")
        players = Players(gateway, args.storm_players, args.connections_per_client)
        current = gateway
        try:
            connect_rate(gateway, players, results)
            if "storm" in scenarios:
                current = storm(gateway, players, flags, results)
            if "stop" in scenarios:
                stop(current, players, results)
        except ScenarioIncomplete:
            pass  # reported; what follows needs every player connected
        finally:
            players.close()
            gateway.stop()
            current.stop()
            gateway.drop_database()
            if listener is not None:
                listener.close()
    if "publish_close" in scenarios:
        home = directory / "publish_close"
        home.mkdir()
        gateway = core.GatewayUnderBench(home, 1, flags, mysql_url=args.mysql)
        try:
            publish_close(args, gateway, results)
        finally:
            gateway.stop()
            gateway.drop_database()
    return results


# --- the client processes ----------------------------------------------------------------------
_CONNECTING, _HANDSHAKING, _OPEN, _WAITING = range(4)
_CLOSE_REPLY = b"\x88\x82\0\0\0\0"  # a masked close frame; its 2-byte code follows


class _Player:
    __slots__ = ("token", "index", "sock", "state", "buffer", "delay_s", "opened_once", "closed_once")

    def __init__(self, token: str, index: int) -> None:
        self.token = token
        self.index = index
        self.sock: socket.socket | None = None
        self.state = _WAITING
        self.buffer = b""
        self.delay_s = FIRST_RETRY_S
        self.opened_once = False
        self.closed_once = False  # since the last reset: its close was counted


class _PlayerClient:
    """One process's players: connect, handshake, answer pings and closes, reconnect."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.address = ("127.0.0.1", spec["port"])
        self.source = spec["source"]
        self.players = [_Player(token, index) for token, index in zip(spec["tokens"], spec["order"])]
        self.by_fd: dict[int, _Player] = {}
        self.poller = select.epoll()
        self.timers: list[tuple[float, int, _Player]] = []
        self.reconnect = True
        self.reset()

    def reset(self) -> None:
        self.attempts = self.failed = self.reopened = self.closed = self.text_frames = 0
        self.last_text: float | None = None  # when the latest text frame arrived
        self.failed_by: dict[str, int] = {}
        self.close_codes: dict[str, int] = {}
        self.first_attempt = self.first_close = self.last_open = self.last_close = None
        self.first_refused = self.last_refused = None
        self.cpu_at_reset = core._cpu_s()
        for player in self.players:
            player.closed_once = False

    def stats(self) -> dict[str, Any]:
        return {"open": sum(player.state == _OPEN for player in self.players), "attempts": self.attempts,
                "failed": self.failed, "reopened": self.reopened, "closed": self.closed,
                "failed_by": self.failed_by, "close_codes": self.close_codes,
                "first_attempt": self.first_attempt, "first_close": self.first_close,
                "last_open": self.last_open, "last_close": self.last_close,
                "first_refused": self.first_refused, "last_refused": self.last_refused,
                "text_frames": self.text_frames, "last_text": self.last_text,
                "cpu_s": core._cpu_s() - self.cpu_at_reset}

    def schedule(self, player: _Player, due: float) -> None:
        player.state = _WAITING
        heapq.heappush(self.timers, (due, player.index, player))

    def attempt(self, player: _Player, now: float) -> None:
        self.attempts += 1
        if self.first_attempt is None:
            self.first_attempt = now
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((self.source, 0))
        player.sock, player.buffer = sock, b""
        error = sock.connect_ex(self.address)
        if error not in (0, errno.EINPROGRESS):
            self.fail(player, errno.errorcode.get(error, str(error)), now)
            return
        player.state = _CONNECTING
        self.by_fd[sock.fileno()] = player
        self.poller.register(sock.fileno(), select.EPOLLOUT)

    def drop_socket(self, player: _Player) -> None:
        sock, player.sock = player.sock, None
        if sock is not None:
            self.by_fd.pop(sock.fileno(), None)
            try:
                self.poller.unregister(sock.fileno())
            except (OSError, ValueError):
                pass
            sock.close()

    def fail(self, player: _Player, kind: str, now: float) -> None:
        if kind == "ECONNREFUSED":  # nothing listened
            self.first_refused = self.first_refused if self.first_refused is not None else now
            self.last_refused = now
        self.failed += 1
        self.failed_by[kind] = self.failed_by.get(kind, 0) + 1
        self.drop_socket(player)
        player.delay_s = min(player.delay_s * 2, MAX_RETRY_S)
        if self.reconnect:
            self.schedule(player, now + player.delay_s)
        else:
            player.state = _WAITING

    def closed_by_server(self, player: _Player, code: str, now: float) -> None:
        self.drop_socket(player)
        if not player.closed_once:
            player.closed_once = True
            self.closed += 1
            self.close_codes[code] = self.close_codes.get(code, 0) + 1
            self.first_close = self.first_close if self.first_close is not None else now
            self.last_close = now
        player.delay_s = FIRST_RETRY_S
        if self.reconnect:
            self.schedule(player, now + player.delay_s)
        else:
            player.state = _WAITING

    def writable(self, player: _Player, now: float) -> None:
        assert player.sock is not None
        error = player.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self.fail(player, errno.errorcode.get(error, str(error)), now)
            return
        try:
            player.sock.send(f"GET /ws?token={player.token} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
                             "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                             "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        except OSError as exc:
            self.fail(player, errno.errorcode.get(exc.errno or 0, "send"), now)
            return
        player.state = _HANDSHAKING
        self.poller.modify(player.sock.fileno(), select.EPOLLIN)

    def readable(self, player: _Player, now: float) -> None:
        assert player.sock is not None
        try:
            data = player.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            data, kind = b"", errno.errorcode.get(exc.errno or 0, "recv")
        else:
            kind = "closed_in_handshake"
        if player.state == _HANDSHAKING:
            if not data:
                self.fail(player, kind, now)
                return
            buffer = player.buffer + data
            if b"\r\n\r\n" not in buffer:
                player.buffer = buffer
                return
            head, rest = buffer.split(b"\r\n\r\n", 1)
            if not head.startswith(b"HTTP/1.1 101"):
                self.fail(player, "http_" + head[9:12].decode("latin-1"), now)
                return
            player.state, player.buffer = _OPEN, b""
            self.last_open = now
            if player.opened_once:
                self.reopened += 1
            player.opened_once = True
            data = rest
            if not data:
                return
        if not data:
            self.closed_by_server(player, "1006", now)
            return
        self.frames(player, player.buffer + data if player.buffer else data, now)

    def frames(self, player: _Player, buffer: bytes, now: float) -> None:
        position = 0
        for opcode, start, end in core.server_frames(buffer):
            assert player.sock is not None
            if opcode == 0x8:
                code = buffer[start:start + 2]
                try:
                    player.sock.send(_CLOSE_REPLY + code)
                except OSError:
                    pass
                self.closed_by_server(player, str(int.from_bytes(code, "big")) if code else "1005", now)
                return
            if opcode == 0x1:
                self.text_frames += 1
                self.last_text = now
            elif opcode == 0x9:
                try:
                    player.sock.send(b"\x8a\x80\0\0\0\0")
                except OSError:
                    pass
            position = end
        player.buffer = buffer[position:]

    def run(self) -> None:
        commands = core._Commands()
        self.poller.register(0, select.EPOLLIN)
        core._reply({"ready": len(self.players)})
        while True:
            timeout_s = max(0.0, self.timers[0][0] - time.monotonic()) if self.timers else 1.0
            for fd, events in self.poller.poll(min(timeout_s, 1.0)):
                if fd == 0:
                    for command in commands.read():
                        if not self.command(command):
                            return
                    continue
                player = self.by_fd.get(fd)
                if player is None:
                    continue
                now = time.monotonic()
                if player.state == _CONNECTING:
                    self.writable(player, now)
                else:
                    self.readable(player, now)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, player = heapq.heappop(self.timers)
                if player.state == _WAITING and player.sock is None:
                    self.attempt(player, now)

    def command(self, command: dict[str, Any]) -> bool:
        name = command["cmd"]
        if name == "quit":
            return False
        if name == "open":
            per_tick = command.get("per_tick", OPEN_PER_TICK)
            for player in self.players:
                self.schedule(player, command["start_at"] + player.index // per_tick * TICK_S)
            core._reply({"ok": True})
        elif name == "reset":
            self.reset()
            self.reconnect = command["reconnect"]
            core._reply({"ok": True})
        elif name == "stats":
            core._reply(self.stats())
        return True


class _Request:
    __slots__ = ("sock", "buffer")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""


def close_publisher_worker(spec: dict[str, Any]) -> None:
    """`connections` publishers, each sending one `/publish` per new connection."""
    address, source = ("127.0.0.1", spec["port"]), spec["source"]
    body = json.dumps({"player_id": spec["player_id"], "event": "publish", "payload": {"text": "x" * 100}}).encode()
    request = (f"POST /publish HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {spec['token']}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
               ).encode() + body
    poller = select.epoll()
    pending: dict[int, _Request] = {}
    core._reply({"connected": 0})
    commands = core._Commands()
    while not commands.read():
        time.sleep(0.001)
    cpu_before = core._cpu_s()
    started = time.monotonic()
    until = started + spec["duration_s"]
    completed = errors = 0
    first_error = None

    def start() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.connect_ex(address)
        pending[sock.fileno()] = _Request(sock)
        poller.register(sock.fileno(), select.EPOLLOUT)

    def finish(fd: int, ok: bool, text: str) -> None:
        nonlocal completed, errors, first_error
        connection = pending.pop(fd)
        poller.unregister(fd)
        connection.sock.close()
        completed += 1
        if not ok:
            errors += 1
            first_error = first_error or text
        if time.monotonic() < until:
            start()

    for _ in range(spec["connections"]):
        start()
    while pending:
        for fd, events in poller.poll(1.0):
            connection = pending.get(fd)
            if connection is None:
                continue
            if events & select.EPOLLOUT:
                error = connection.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    finish(fd, False, f"connect: {errno.errorcode.get(error, error)}")
                    continue
                connection.sock.send(request)
                poller.modify(fd, select.EPOLLIN)
                continue
            try:
                data = connection.sock.recv(65536)
            except OSError as exc:
                finish(fd, False, f"recv: {exc}")
                continue
            buffer = connection.buffer = connection.buffer + data
            head_end = buffer.find(b"\r\n\r\n")
            if head_end >= 0:
                head = buffer[:head_end]
                marker = head.lower().find(b"content-length:")
                length = int(head[marker + 15:].split(b"\r\n", 1)[0]) if marker >= 0 else 0
                if len(buffer) >= head_end + 4 + length:
                    finish(fd, head.startswith(b"HTTP/1.1 200"), buffer.decode("latin-1"))
                    continue
            if not data:
                finish(fd, False, f"closed early: {buffer[:200]!r}")
    core._reply({"requests": completed, "errors": errors, "first_error": first_error,
                 "elapsed_s": time.monotonic() - started, "cpu_s": core._cpu_s() - cpu_before})
    while True:
        if any(command["cmd"] == "quit" for command in commands.read()):
            return
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    """The life-cycle scenarios alone (bench.py runs them too, with the same options)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    core.add_options(parser, default_scenarios=",".join(SCENARIOS))
    args = parser.parse_args(argv)
    print(f"ws-gateway life-cycle bench: {os.cpu_count()} cores, load {core.load_average()}, "
          f"db {'mysql' if args.mysql else 'sqlite'}", flush=True)
    directory = Path(tempfile.mkdtemp(prefix="ws-gateway-bench-"))
    try:
        results = run(args, directory, set(args.scenarios.split(",")))
    finally:
        core.progress("")
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    core.print_summary(results, os.cpu_count() or 0)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "_worker":
        spec = json.loads(sys.argv[3])
        try:
            if sys.argv[2] == "player":
                _PlayerClient(spec).run()
            else:
                close_publisher_worker(spec)
        except BrokenPipeError:
            pass
        sys.exit(0)
    sys.exit(main())
