"""bin/ws-gateway as a child process, free ports, its environment, and a TCP relay that can be cut."""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
from pathlib import Path

import gevent
import gevent.event

from tests.support import TIMEOUT_S, wait_for


GATEWAY_BIN = str(Path(__file__).resolve().parents[2] / "bin" / "ws-gateway")


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
    nothing is passed on until `resume()` (a network partition: no error, just silence).
    `reply_delay_s` (may be changed at any time): the server's answer to what the client
    sent waits this long first, once per turn however many reads it takes (a distant or
    busy server: each round trip takes at least that). `turns`: how many times the server
    answered something the client had sent (round trips, counted across connections).
    `lose_answer_to(marker)`: the next request carrying `marker` is passed on, and its
    client is hung up on before the answer can come back (a step that ran, its answer lost);
    `then_cut`: and the relay is cut at once (the server out of reach from then on)."""

    def __init__(self, target: tuple[str, int], reply_delay_s: float = 0.0) -> None:
        self.target = target
        self.reply_delay_s = reply_delay_s
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port: int = self.listener.getsockname()[1]
        self.is_cut = False
        self.turns = 0
        self._answer_lost_to: bytes | None = None
        self._cut_after_lost_answer = False
        self.answers_lost = 0
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
        turn = {"asked": False}  # the client sent something the server has not answered yet
        gevent.spawn(self._relay, client, upstream, turn, False)
        gevent.spawn(self._relay, upstream, client, turn, True)

    def _relay(self, source: socket.socket, destination: socket.socket, turn: dict[str, bool],
               is_reply: bool) -> None:
        ends = (source, destination)
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if not is_reply:
                    turn["asked"] = True
                elif turn["asked"]:
                    turn["asked"] = False
                    self.turns += 1
                    if self.reply_delay_s:
                        gevent.sleep(self.reply_delay_s)
                self._flowing.wait()
                destination.sendall(data)
                if not is_reply and self._answer_lost_to is not None and self._answer_lost_to in data:
                    self._answer_lost_to = None
                    self.answers_lost += 1
                    # the server's end stays open: its answer reaches the other relay, which
                    # finds the client gone and hangs up
                    ends = (source,)
                    if self._cut_after_lost_answer:
                        self.cut()
                    break
        except OSError:
            pass
        finally:
            for end in ends:
                self._hang_up(end)

    def _hang_up(self, end: socket.socket) -> None:
        self._sockets.discard(end)
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        end.close()

    def lose_answer_to(self, marker: bytes, then_cut: bool = False) -> None:
        self._answer_lost_to = marker
        self._cut_after_lost_answer = then_cut

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
