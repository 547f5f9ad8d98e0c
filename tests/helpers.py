"""Clients and utilities the tests share: a gateway on a free port, its token table,
HTTP and WebSocket clients, and waiting on conditions with a deadline."""
from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import gevent
import gevent.event
import websocket
from sqlalchemy import create_engine, text

from wsgateway.config import Config, load
from wsgateway.server import Gateway
from wsgateway.tokens import utc_now

TIMEOUT_S = float(os.environ.get("WS_GATEWAY_TEST_TIMEOUT", "5"))  # the one timeout unit of the suite


def wait_for(condition: Callable[[], Any], timeout_s: float = TIMEOUT_S, what: str = "condition") -> Any:
    """Poll `condition` until it is truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        gevent.sleep(0.005)


def gateway_config(database_url: str, *flags: str) -> Config:
    db = "mysql" if database_url.startswith("mysql") else "sqlite"
    return load(["-addr", "127.0.0.1:0", "-db", db, "-dsn", database_url, "-log-level", "debug", *flags], env={})


class TokenTable:
    """Rows of `ws_token`, written the way an application backend would."""

    def __init__(self, database_url: str) -> None:
        self.engine = create_engine(database_url)
        self._sqlite = database_url.startswith("sqlite")

    def _expiry(self, ttl_s: float) -> Any:
        moment = utc_now() + timedelta(seconds=ttl_s)
        return moment.strftime("%Y-%m-%d %H:%M:%S.%f") if self._sqlite else moment

    def _insert(self, token: str, player_id: int | None, subject_id: str, is_server: bool, ttl_s: float) -> str:
        with self.engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO ws_token (token, player_id, subject_id, is_server, expires_at) "
                "VALUES (:token, :player_id, :subject_id, :is_server, :expires_at)"),
                {"token": token, "player_id": player_id, "subject_id": subject_id,
                 "is_server": is_server, "expires_at": self._expiry(ttl_s)})
        return token

    def player(self, player_id: int | None = 21, *, subject_id: str = "player-subject",
               token: str | None = None, ttl_s: float = 3600) -> str:
        return self._insert(token or secrets.token_hex(16), player_id, subject_id, False, ttl_s)

    def server(self, subject_id: str = "backend-1", *, token: str | None = None, ttl_s: float = 3600) -> str:
        return self._insert(token or secrets.token_hex(16), None, subject_id, True, ttl_s)

    def revoke(self, token: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(text("DELETE FROM ws_token WHERE token = :token"), {"token": token})

    def expire(self, token: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(text("UPDATE ws_token SET expires_at = :past WHERE token = :token"),
                               {"token": token, "past": self._expiry(-60)})


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class GatewayUnderTest:
    """A started in-process gateway and the clients to talk to it."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.host, self.port = gateway.address
        self.tokens = TokenTable(gateway.config.database_url)
        self.clients: list[websocket.WebSocket] = []

    @classmethod
    def start(cls, config: Config) -> GatewayUnderTest:
        gateway = Gateway(config)
        gateway.start()
        return cls(gateway)

    def stop(self) -> None:
        for client in self.clients:  # hang up first: shutdown need not wait for their answers
            client.shutdown()
        self.gateway.shutdown(timeout_s=TIMEOUT_S)
        self.tokens.engine.dispose()

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    # --- HTTP --------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT_S)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def post(self, path: str, body: Any = None, *, token: str | None = None, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> Reply:
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else json.dumps(body).encode()
        return self.request("POST", path, data, all_headers)

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def publish(self, token: str, player_id: Any, event: str = "e", payload: Any = None) -> Reply:
        return self.post("/publish", {"player_id": player_id, "event": event, "payload": payload}, token=token)

    def broadcast(self, token: str, event: str = "e", payload: Any = None, player_id: Any = None) -> Reply:
        body: dict[str, Any] = {"event": event, "payload": payload}
        if player_id is not None:
            body["player_id"] = player_id
        return self.post("/broadcast", body, token=token)

    # --- WebSocket -------------------------------------------------------------------------
    def connect(self, token: str, **options: Any) -> websocket.WebSocket:
        """A connected client; waits until the gateway has registered it and its seat is
        taken (with -broker, until every gateway routes the player's messages to it)."""
        before = self.metric("ws_active_connections")
        client = websocket.create_connection(f"{self.ws_url}?token={token}", timeout=TIMEOUT_S, **options)
        self.clients.append(client)
        wait_for(lambda: self.metric("ws_active_connections") > before, what="connection registered")
        return client

    def refused(self, query: str = "", **options: Any) -> tuple[int, Any]:
        """Status and JSON body of a WebSocket request the gateway refuses before upgrading."""
        try:
            client = websocket.create_connection(f"{self.ws_url}{query}", timeout=TIMEOUT_S, **options)
        except websocket.WebSocketBadStatusException as refusal:
            return refusal.status_code, json.loads(refusal.resp_body or b"null")
        client.close()
        raise AssertionError("the WebSocket connection was accepted")

    def metric(self, name: str, **labels: str) -> float:
        return self.gateway.metrics.registry.get_sample_value(name, labels) or 0.0


def receive_event(client: websocket.WebSocket) -> Any:
    """The next event a client receives, decoded."""
    return json.loads(client.recv())


def receive_close(client: websocket.WebSocket) -> tuple[int, str]:
    """Read until the server's close frame; return its code and reason."""
    while True:
        opcode, frame = client.recv_data_frame(True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            data = frame.data
            if len(data) < 2:
                return 1005, ""
            return struct.unpack("!H", data[:2])[0], data[2:].decode("utf-8")


CLIENT_MASK = b"\x37\xfa\x21\x3d"  # a fixed mask keeps hand-built frames reproducible


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, masked: bool = True,
                 announced_length: int | None = None) -> bytes:
    """A client frame as a browser sends it (masked, shortest length encoding), or bent
    the ways a hostile client would: unmasked, reserved bits, a length it does not send."""
    length = len(payload) if announced_length is None else announced_length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    if length < 126:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length < 0x10000:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    if not masked:
        return header + payload
    return header + CLIENT_MASK + bytes(byte ^ CLIENT_MASK[index % 4] for index, byte in enumerate(payload))


class RawClient:
    """A hand-driven WebSocket client for frames no well-behaved library would send."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT_S)
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError(f"connection closed during handshake: {response!r}")
            response += chunk
        head, self.pending = response.split(b"\r\n\r\n", 1)
        self.status = int(head.split(b" ", 2)[1])

    def send_frame(self, opcode: int, payload: bytes, **shape: Any) -> None:
        """Send one frame built by `client_frame` (same keyword arguments)."""
        self.sock.sendall(client_frame(opcode, payload, **shape))

    def read_frame_bits(self) -> tuple[bool, int, int, bool, bytes]:
        """The next server frame as (fin, rsv bits, opcode, masked, payload); raises on EOF."""
        def need(count: int) -> bytes:
            while len(self.pending) < count:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError("connection closed")
                self.pending += chunk
            data, self.pending = self.pending[:count], self.pending[count:]
            return data
        first, second = need(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", need(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", need(8))[0]
        mask = need(4) if second & 0x80 else b""
        return bool(first & 0x80), (first >> 4) & 0x7, first & 0x0F, bool(mask), need(length)

    def read_frame(self) -> tuple[int, bytes]:
        """The next server frame (opcode, payload); raises on EOF."""
        _, _, opcode, _, payload = self.read_frame_bits()
        return opcode, payload

    def read_close(self) -> int:
        """Skip frames until the server's close frame; return its code."""
        while True:
            opcode, payload = self.read_frame()
            if opcode == 0x8:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005

    def close(self) -> None:
        self.sock.close()


def answer_pings(client: RawClient, received: list[bytes]) -> None:
    """Greenlet: a live client that answers every ping and keeps the text it receives."""
    while True:
        opcode, payload = client.read_frame()
        if opcode == 0x9:  # ping
            client.send_frame(0xA, payload)  # pong
        elif opcode == 0x1:  # text
            received.append(payload)
        elif opcode == 0x8:  # close
            return


# --- fakes for the pure-module unit tests -----------------------------------------------------

class FakeClock:
    """A monotonic clock the test moves by hand (`clock.now += 5`)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeConnection:
    """A connection as the hub, delivery and keep-alive see it; records what it was given.

    `accepting = False` makes `send` refuse, like a connection that is closing.
    """

    def __init__(self, player_id: str, token: str = "token", *, accepting: bool = True,
                 last_heard: float = 0.0) -> None:
        self.player_id = player_id
        self.token = token
        self.accepting = accepting
        self.last_heard = last_heard
        self.frames: list[bytes] = []
        self.pings = 0
        self.aborted_with: int | None = None
        self.held: list[bytes] | None = None

    @property
    def is_open(self) -> bool:
        return self.accepting

    def send(self, frame: bytes) -> bool:
        if self.held is not None:
            self.held.append(frame)
            return True
        if self.accepting:
            self.frames.append(frame)
        return self.accepting

    def hold(self) -> None:
        self.held = []

    def release(self, first: list[bytes]) -> int:
        held, self.held = self.held or [], None
        taken = sum(self.send(frame) for frame in first)
        for frame in held:
            self.send(frame)
        return taken

    def send_later(self, frame: bytes) -> bool:
        return self.send(frame)  # in order with send(), as a Connection keeps them

    def ping(self) -> None:
        self.pings += 1

    def abort(self, code: int) -> None:
        self.aborted_with = code

    def __repr__(self) -> str:
        return f"FakeConnection({self.player_id!r}, {self.token!r})"


# --- processes, ports and a database link that can be cut ---------------------------------------

import signal  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

GATEWAY_BIN = str(Path(__file__).resolve().parent.parent / "bin" / "ws-gateway")
PROCESS_START_TIMEOUT_S = 3 * TIMEOUT_S  # a fresh interpreter importing gevent, Flask and SQLAlchemy


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def gateway_environment(**settings: str) -> dict[str, str]:
    """This process's environment without any WS_GATEWAY_* setting, plus `settings`."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("WS_GATEWAY_")}
    environment.update(settings)
    return environment


def run_gateway_cli(*args: str, cwd: str | Path, env: dict[str, str] | None = None,
                    timeout_s: float = PROCESS_START_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run bin/ws-gateway to completion (for invocations that must exit by themselves)."""
    return subprocess.run([GATEWAY_BIN, *args], cwd=cwd, env=env or gateway_environment(),
                          capture_output=True, text=True, timeout=timeout_s)


def _limit_open_files(count: int) -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


class GatewayProcess:
    """bin/ws-gateway as a child process, started from `directory` on a free port, with
    its sqlite file, pid file, log file and stderr in that directory."""

    def __init__(self, directory: Path, *flags: str, env: dict[str, str] | None = None,
                 max_open_files: int | None = None) -> None:
        """`max_open_files`: the process's RLIMIT_NOFILE (default: this process's)."""
        self.directory = directory
        self.port = free_port()
        self.db_path = directory / "tokens.db"
        self.pid_file = directory / "ws-gateway.pid"
        self.log_file = directory / "ws-gateway.log"
        self.stderr_file = directory / "stderr.txt"
        with open(self.stderr_file, "w") as stderr:
            self.process = subprocess.Popen(
                [GATEWAY_BIN, "-addr", f"127.0.0.1:{self.port}", "-dsn", f"file:{self.db_path}?cache=shared",
                 "-pid-file", str(self.pid_file), "-log-file", str(self.log_file), "-log-level", "debug",
                 *flags],
                cwd=directory, env=env or gateway_environment(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr,
                preexec_fn=None if max_open_files is None else lambda: _limit_open_files(max_open_files))

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.db_path}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def wait_ready(self) -> None:
        """Wait until /healthz answers; fail with the process's stderr if it exits first."""
        def healthy() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"ws-gateway exited with {self.process.returncode}: "
                                     f"{self.stderr_file.read_text()}")
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT_S)
            try:
                connection.request("GET", "/healthz")
                return connection.getresponse().status == 200
            except OSError:
                return False
            finally:
                connection.close()
        wait_for(healthy, PROCESS_START_TIMEOUT_S, what="ws-gateway answering /healthz")

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout_s: float = TIMEOUT_S) -> int:
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        """Make sure the process is gone (test teardown)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=TIMEOUT_S)


class TcpForwarder:
    """A TCP relay to `target` that a test can cut or pause, to make a real server
    unreachable and reachable again. Cut: it hangs up on every connection, old and new
    (a server that is down). Paused: connections are accepted and bytes are taken but
    nothing is passed on until `resume()` (a network partition: no error, just silence)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port: int = self.listener.getsockname()[1]
        self.is_cut = False
        self._flowing = gevent.event.Event()
        self._flowing.set()
        self._sockets: set[socket.socket] = set()
        self._acceptor = gevent.spawn(self._accept)

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            if self.is_cut:
                client.close()
                continue
            gevent.spawn(self._connect, client)

    def _connect(self, client: socket.socket) -> None:
        self._sockets.add(client)
        self._flowing.wait()
        if client not in self._sockets:  # cut while it waited
            return
        try:
            upstream = socket.create_connection(self.target, timeout=TIMEOUT_S)
        except OSError:
            self._hang_up(client)
            return
        upstream.settimeout(None)
        self._sockets.add(upstream)
        gevent.spawn(self._relay, client, upstream)
        gevent.spawn(self._relay, upstream, client)

    def _relay(self, source: socket.socket, destination: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                destination.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, destination):
                self._hang_up(end)

    def _hang_up(self, end: socket.socket) -> None:
        self._sockets.discard(end)
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        end.close()

    def cut(self) -> None:
        """Drop every relayed connection and refuse new ones until `restore()`."""
        self.is_cut = True
        for end in list(self._sockets):
            self._hang_up(end)

    def restore(self) -> None:
        self.is_cut = False

    def pause(self) -> None:
        """Stop passing bytes on, in both directions, without closing anything."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._acceptor.kill()
        self.listener.close()
        self.cut()
        self.resume()


# --- Redis: a unique key prefix per test, and a private server that can be restarted -------------

REDIS_URL = os.environ.get("WS_GATEWAY_TEST_REDIS", "redis://127.0.0.1:6379/0")


class RedisServer:
    """A redis-server of the test's own on a free port, so it can be stopped and restarted
    without disturbing the shared one. Keeps nothing on disk, like the CI's."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def answers() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT_S) as probe:
                    probe.sendall(b"PING\r\n")
                    return probe.recv(16).startswith(b"+PONG")
            except OSError:
                return False
        wait_for(answers, what=f"redis-server on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=TIMEOUT_S)
        self.process = None
