"""`ws-gateway listen` and `client.PlayerListener`: one JSON line per message, reconnection
with capped backoff and jitter, bounded waits, a clean stop on SIGINT/SIGTERM, and an
immediate, one-line exit for a token the gateway refuses."""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import gevent
import pytest

from tests.support import TIMEOUT_S, wait_for
from tests.support.processes import GATEWAY_BIN, PROCESS_START_TIMEOUT_S, free_port, gateway_environment
from wsgateway.client import PlayerListener


class Listener:
    """bin/ws-gateway listen as a child process, its stdout and stderr in files."""

    def __init__(self, directory: Path, url: str, token: str, *flags: str) -> None:
        self.stdout = directory / "listen.out"
        self.stderr = directory / "listen.err"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen([GATEWAY_BIN, "listen", "--url", url, *flags],
                                            cwd=directory, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                            env=gateway_environment(WS_GATEWAY_PLAYER_TOKEN=token))

    def lines(self) -> list[str]:
        return self.stdout.read_text().splitlines()

    def wait_connected(self, times: int = 1) -> None:
        wait_for(lambda: self.stderr.read_text().count("connected to ") >= times, PROCESS_START_TIMEOUT_S,
                 what=f"listen connected {times} time(s)")

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=TIMEOUT_S)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=TIMEOUT_S)


def base_url(gateway) -> str:
    return f"http://127.0.0.1:{gateway.gateway.address[1]}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_prints_one_json_line_per_message_and_stops_cleanly(tmp_path, gateway, signum):
    """Each message is one line of JSON, in order (newlines in a payload stay escaped); a signal ends it with 0."""
    server = gateway.tokens.server()
    listener = Listener(tmp_path, base_url(gateway), gateway.tokens.player(21))
    try:
        listener.wait_connected()
        payloads = [{"n": 1}, {"text": "two\nlines"}, None, [1, "ü"]]
        for payload in payloads:
            assert gateway.publish(server, 21, "e", payload).status == 200
        wait_for(lambda: len(listener.lines()) == len(payloads), what="every message printed")
        assert [json.loads(line) for line in listener.lines()] == [{"event": "e", "payload": p} for p in payloads]
        assert listener.stop(signum) == 0
        assert "Traceback" not in listener.stderr.read_text()
    finally:
        listener.kill()


def test_reconnects_after_the_gateway_restarts(tmp_path, start_gateway, sqlite_url):
    """A gateway that shuts down and comes back on the same address: listen reconnects by itself and goes on."""
    port = free_port()
    first = start_gateway("-addr", f"127.0.0.1:{port}")
    player, server = first.tokens.player(21), first.tokens.server()
    listener = Listener(tmp_path, f"http://127.0.0.1:{port}", player, "--max-backoff", "500ms")
    try:
        listener.wait_connected()
        first.stop()
        wait_for(lambda: "closed by the gateway: 1001 server shutting down; reconnecting in"
                 in listener.stderr.read_text(), what="the loss reported")
        second = start_gateway("-addr", f"127.0.0.1:{port}")
        listener.wait_connected(times=2)
        assert second.publish(server, 21, "after", {"ok": True}).status == 200
        wait_for(lambda: listener.lines() == ['{"event":"after","payload":{"ok":true}}'], what="the message")
        assert player not in listener.stderr.read_text()
    finally:
        listener.kill()


@pytest.mark.parametrize("token_kind", ["unknown", "server"])
def test_refused_token_exits_1_at_once_with_one_line(tmp_path, gateway, token_kind):
    """401 at the handshake is not retried: exit 1 with the gateway's message, the token never printed."""
    token = "no-such-token" if token_kind == "unknown" else gateway.tokens.server()
    result = subprocess.run([GATEWAY_BIN, "listen", "--url", base_url(gateway), "--token", token], cwd=tmp_path,
                            env=gateway_environment(), capture_output=True, text=True,
                            timeout=PROCESS_START_TIMEOUT_S)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "ws-gateway listen: the gateway answered 401: invalid or expired token\n"


def test_missing_token_is_usage_error(tmp_path):
    """Without --token or WS_GATEWAY_PLAYER_TOKEN: exit 2, one line."""
    result = subprocess.run([GATEWAY_BIN, "listen"], cwd=tmp_path, env=gateway_environment(),
                            capture_output=True, text=True, timeout=PROCESS_START_TIMEOUT_S)
    assert result.returncode == 2
    assert result.stderr == ("ws-gateway listen: --token: a player token is required "
                             "(or set WS_GATEWAY_PLAYER_TOKEN)\n")


def listen_in_greenlet(listener: PlayerListener) -> tuple[gevent.Greenlet, list[str], list[str]]:
    messages: list[str] = []
    statuses: list[str] = []
    return gevent.spawn(listener.run, messages.append, on_status=statuses.append), messages, statuses


def test_backoff_doubles_up_to_its_cap_with_jitter():
    """Against an address that refuses: pauses of half to all of min(cap, base * 2**n), here at their top."""
    listener = PlayerListener(f"http://127.0.0.1:{free_port()}", "t", backoff_s=0.1, max_backoff_s=0.4,
                              jitter=lambda: 1.0)
    runner, _, statuses = listen_in_greenlet(listener)
    try:
        wait_for(lambda: len(statuses) >= 5, what="five attempts")
    finally:
        listener.stop()
        runner.join(timeout=TIMEOUT_S)
    assert runner.dead
    pauses = [line.rsplit("reconnecting in ", 1)[1] for line in statuses[:5]]
    assert pauses == ["0.1 s", "0.2 s", "0.4 s", "0.4 s", "0.4 s"]
    assert all(line.startswith("no answer from ws://127.0.0.1:") for line in statuses)


def test_jitter_spreads_pauses_between_half_and_all_of_the_ceiling():
    """With no jitter drawn the pause is half the ceiling: many listeners never retry in step."""
    listener = PlayerListener(f"http://127.0.0.1:{free_port()}", "t", backoff_s=0.4, max_backoff_s=0.4,
                              jitter=lambda: 0.0)
    runner, _, statuses = listen_in_greenlet(listener)
    try:
        wait_for(lambda: len(statuses) >= 2, what="two attempts")
    finally:
        listener.stop()
        runner.join(timeout=TIMEOUT_S)
    assert [line.rsplit("reconnecting in ", 1)[1] for line in statuses[:2]] == ["0.2 s", "0.2 s"]


def test_silent_socket_counts_as_lost(gateway):
    """A socket that brings nothing, not even a ping, for idle_timeout_s is given up and reopened."""
    listener = PlayerListener(base_url(gateway), gateway.tokens.player(21), idle_timeout_s=0.3,
                              backoff_s=0.05, max_backoff_s=0.1)
    runner, _, statuses = listen_in_greenlet(listener)
    try:
        wait_for(lambda: any(line.startswith("nothing heard for 0.3 s; reconnecting") for line in statuses),
                 what="the silence noticed")
        wait_for(lambda: sum(line.startswith("connected to ") for line in statuses) >= 2, what="a reconnect")
    finally:
        listener.stop()
        runner.join(timeout=TIMEOUT_S)
    assert runner.dead


def test_too_many_connections_is_retried_not_fatal(start_gateway):
    """429 at the handshake (-max-conns reached) is waited out: the listener connects once a seat is free."""
    gateway = start_gateway("-max-conns", "1")
    player = gateway.tokens.player(21)
    holder = gateway.connect(player)
    listener = PlayerListener(base_url(gateway), player, backoff_s=0.05, max_backoff_s=0.1)
    runner, _, statuses = listen_in_greenlet(listener)
    try:
        wait_for(lambda: any("the gateway answered 429" in line for line in statuses), what="a 429")
        holder.close()
        wait_for(lambda: any(line.startswith("connected to ") for line in statuses), what="the seat taken")
    finally:
        listener.stop()
        runner.join(timeout=TIMEOUT_S)
    assert runner.dead
