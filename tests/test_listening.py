"""wsgateway.listening: a starting gateway binds its address before gevent is imported, and
only when the command line starts one gateway; what it bound is taken over once."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import TIMEOUT_S
from tests.support.processes import gateway_environment
from wsgateway import listening

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def nothing_bound_before_or_after():
    assert listening._early is None
    yield
    early = listening._early
    listening._early = None
    if isinstance(early, int):
        socket.socket(fileno=early).close()


def test_the_early_bind_imports_nothing_that_imports_gevent():
    """bind_before_imports listens on -addr with gevent, the web stack and the database layer not yet imported."""
    script = ("import sys; from wsgateway import listening; listening.bind_before_imports(['-addr', '127.0.0.1:0']);"
              "import socket; bound = socket.socket(fileno=listening._early);"
              "print(bound.getsockname()[1], sorted({'gevent', 'flask', 'sqlalchemy', 'prometheus_client'}"
              " & {name.split('.')[0] for name in sys.modules}))")
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, env=gateway_environment(),
                            capture_output=True, text=True, timeout=TIMEOUT_S, check=True)
    port, imported = result.stdout.split(" ", 1)
    assert int(port) > 0 and imported.strip() == "[]", result.stderr


def test_what_was_bound_is_taken_over_once_as_a_listening_socket():
    """take_early_listener hands over the bound socket, listening, then None."""
    listening.bind_before_imports(["-addr", "127.0.0.1:0", "-rate-limit", "0"])
    listener = listening.take_early_listener()
    assert listener is not None and listening.take_early_listener() is None
    with listener, socket.create_connection(listener.getsockname(), timeout=TIMEOUT_S):
        accepted, _ = listener.accept()
        accepted.close()


@pytest.mark.parametrize("argv", [
    ["-addr", "127.0.0.1:0", "token", "list"],
    ["-addr", "127.0.0.1:0", "-h"],
    ["-addr", "127.0.0.1:0", "-version"],
    ["-addr", "127.0.0.1:0", "-workers", "2", "-broker", "redis://127.0.0.1:1/0"],
    ["-addr", "127.0.0.1:0", "-max-conns", "-1"],
    ["-addr", "127.0.0.1:0", "stray"],
], ids=["command", "help", "version", "workers", "bad-setting", "stray-word"])
def test_nothing_is_bound_unless_the_command_line_starts_one_gateway(argv, capsys):
    """A command, help, version, a -workers supervisor or a refused setting binds nothing early (cli reports it)."""
    listening.bind_before_imports(argv)
    assert listening.take_early_listener() is None
    assert capsys.readouterr() == ("", "")


def test_an_address_that_cannot_be_bound_is_reported_when_taken_over():
    """The bind's error waits for cli, which words it as ever."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listening.PORT_WAIT_S, saved = 0.0, listening.PORT_WAIT_S
        try:
            listening.bind_before_imports(["-addr", f"127.0.0.1:{port}"])
        finally:
            listening.PORT_WAIT_S = saved
        with pytest.raises(OSError):
            listening.take_early_listener()
