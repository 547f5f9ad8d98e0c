"""wsgateway.listening: a starting gateway binds its address before gevent is imported, and
only when the command line starts one gateway; what it bound is taken over once."""
from __future__ import annotations

import os
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


def test_a_socket_passed_by_systemd_is_the_listener():
    """Under socket activation (LISTEN_PID, LISTEN_FDS, descriptor 3) the gateway listens on systemd's socket, not -addr."""
    with listening.bind_listener("127.0.0.1", 0) as held:
        descriptor = held.fileno()

        def as_systemd_does() -> None:
            os.dup2(descriptor, listening.SD_LISTEN_FDS_START)
            os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
        script = ("import os, socket; from wsgateway import listening;"
                  "listening.bind_before_imports(['-addr', '127.0.0.1:1']); listener = listening.take_early_listener();"
                  "print(listener.getsockname()[1], listener.fileno(), os.get_inheritable(listener.fileno()),"
                  " sorted(set(os.environ) & {'LISTEN_PID', 'LISTEN_FDS'}))")
        # No env=: the variables set after fork reach the program only through the inherited environment.
        result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT,
                                pass_fds=(listening.SD_LISTEN_FDS_START,), preexec_fn=as_systemd_does,
                                capture_output=True, text=True, timeout=TIMEOUT_S, check=True)
        assert result.stdout.split(" ", 3) == [str(held.getsockname()[1]), "3", "False", "[]\n"], result.stderr


def test_variables_meant_for_another_process_are_ignored(monkeypatch):
    """LISTEN_FDS for another pid (a parent's activation) is not ours: -addr is bound as usual."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    listening.bind_before_imports(["-addr", "127.0.0.1:0"])
    listener = listening.take_early_listener()
    assert listener is not None and listener.fileno() != listening.SD_LISTEN_FDS_START
    listener.close()
