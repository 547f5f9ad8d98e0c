"""Redis: the shared server's URL, a relay to it a test can cut, and a private server a
test may restart."""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from pathlib import Path

from tests.support import TIMEOUT_S, wait_for
from tests.support.processes import TcpForwarder, free_port


REDIS_URL = os.environ.get("WS_GATEWAY_TEST_REDIS", "redis://127.0.0.1:6379/0")


def relay_to_shared_redis() -> tuple[TcpForwarder, str]:
    """A relay to the shared Redis (`TcpForwarder`), and the URL that goes through it."""
    host, port = REDIS_URL.split("//")[1].split("/")[0].split(":")
    relay = TcpForwarder((host, int(port)))
    return relay, f"redis://127.0.0.1:{relay.port}/0"


def script_sha(script: str) -> bytes:
    """What every EVALSHA of `script` carries (a marker for `TcpForwarder.lose_answer_to`)."""
    return hashlib.sha1(script.encode()).hexdigest().encode()


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
