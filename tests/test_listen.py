"""`ws-gateway listen` and `client.PlayerListener`: one JSON line per message, reconnection
with capped backoff and jitter, resuming after the last id printed (none lost, none twice,
the gateway's notice when it cannot), bounded waits, a clean stop on SIGINT/SIGTERM, and an
immediate, one-line exit for a token the gateway refuses."""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import gevent
import pytest

from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import receive_event
from tests.support.processes import (GATEWAY_BIN, PROCESS_START_TIMEOUT_S, TcpForwarder, free_port,
                                     gateway_environment)
from wsgateway.client import PlayerListener


class Listener:
    """bin/ws-gateway listen as a child process, its stdout and stderr in files."""

    def __init__(self, directory: Path, url: str, token: str, *flags: str, name: str = "listen") -> None:
        self.stdout = directory / f"{name}.out"
        self.stderr = directory / f"{name}.err"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen([GATEWAY_BIN, "listen", "--url", url, *flags],
                                            cwd=directory, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                            env=gateway_environment(WS_GATEWAY_PLAYER_TOKEN=token))

    def lines(self) -> list[str]:
        """The complete lines printed so far."""
        text = self.stdout.read_text()
        return text[:text.rfind("\n") + 1].splitlines()

    def messages(self) -> list[dict]:
        return [json.loads(line) for line in self.lines()]

    def wait_lines(self, count: int, timeout_s: float = TIMEOUT_S) -> list[dict]:
        wait_for(lambda: len(self.lines()) >= count, timeout_s, what=f"{count} lines printed")
        return self.messages()

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


# --- resuming after the last id printed (-history-size) -----------------------------------

HISTORY = ("-history-size", "2000", "-history-ttl", "1m", "-rate-limit", "0")


def publish_numbers(gateway, server: str, numbers: range, pause_s: float = 0.0) -> None:
    """Publish `numbers` to player 21 in order, every fifth as a broadcast to all players."""
    for number in numbers:
        reply = gateway.publish(server, 21, "n", number) if number % 5 else gateway.broadcast(server, "n", number)
        assert reply.status == 200, reply
        gevent.sleep(pause_s)  # lets the test cut connections while the burst goes on


def assert_exactly_once_in_order(messages: list[dict], total: int) -> None:
    assert [message["payload"] for message in messages] == list(range(total))
    assert [list(message) for message in messages] == [["event", "payload", "id"]] * total  # the id, last
    assert len({message["id"] for message in messages}) == total


def test_resumes_after_its_socket_is_cut_while_publishes_continue(tmp_path, start_gateway):
    """Its socket cut three times during a burst while another tab stays open (so nothing is queued for the
    player): each reconnect resumes after the last id printed, and every message is printed once, in order."""
    total = 600
    gateway = start_gateway(*HISTORY)
    server, token = gateway.tokens.server(), gateway.tokens.player(21)
    other_tab = gateway.connect(token)
    other_tab_got = gevent.spawn(lambda: [receive_event(other_tab)["payload"] for _ in range(total)])
    relay = TcpForwarder((gateway.host, gateway.port))
    listener = Listener(tmp_path, f"http://127.0.0.1:{relay.port}", token, "--max-backoff", "200ms")
    try:
        listener.wait_connected()
        publisher = gevent.spawn(publish_numbers, gateway, server, range(total), 0.002)
        for cut in range(1, 4):
            listener.wait_connected(times=cut)
            listener.wait_lines(cut * total // 5, TIMEOUT_S * 4)  # it carries the burst, then loses it
            relay.cut()  # frames on their way through the relay are lost with it
            relay.restore()
        publisher.get(timeout=TIMEOUT_S * 6)
        assert_exactly_once_in_order(listener.wait_lines(total, TIMEOUT_S * 4), total)
        assert other_tab_got.get(timeout=TIMEOUT_S) == list(range(total))
        news = listener.stderr.read_text()
        assert news.count(", resuming after ") >= 3 and "could not resume" not in news
        assert gateway.metric("ws_resumes_total", outcome="recovered") >= 3
    finally:
        listener.kill()
        relay.close()


def test_resumes_on_a_gateway_restarted_with_broker_while_publishes_continue(tmp_path, start_cluster_gateway):
    """With -broker the history is in Redis: a gateway restarted on the same address while another keeps
    publishing gives the listener, resuming with its last id, exactly what it missed."""
    port = free_port()
    first = start_cluster_gateway("-addr", f"127.0.0.1:{port}", *HISTORY)
    publishing = start_cluster_gateway(*HISTORY)
    server, token = first.tokens.server(), first.tokens.player(21)
    listener = Listener(tmp_path, f"http://127.0.0.1:{port}", token, "--max-backoff", "200ms")
    total = 300
    try:
        listener.wait_connected()
        publisher = gevent.spawn(publish_numbers, publishing, server, range(total), 0.005)
        listener.wait_lines(total // 4, TIMEOUT_S * 4)
        first.stop()
        second = start_cluster_gateway("-addr", f"127.0.0.1:{port}", *HISTORY)
        listener.wait_connected(times=2)
        publisher.get(timeout=TIMEOUT_S * 6)
        assert_exactly_once_in_order(listener.wait_lines(total, TIMEOUT_S * 4), total)
        assert ", resuming after " in listener.stderr.read_text()
        assert second.metric("ws_resumes_total", outcome="recovered") == 1
    finally:
        listener.kill()


def test_a_lost_history_prints_the_notice_then_resumes_from_the_new_ids(tmp_path, start_gateway):
    """A restart without -broker loses the history: the gateway's gateway.missed line comes first, reported on
    stderr; the next reconnect resumes after the new history's ids, without another notice."""
    port = free_port()
    first = start_gateway("-addr", f"127.0.0.1:{port}", *HISTORY)
    server, token = first.tokens.server(), first.tokens.player(21)
    listener = Listener(tmp_path, f"http://127.0.0.1:{port}", token, "--max-backoff", "200ms")
    try:
        listener.wait_connected()
        assert first.publish(server, 21, "n", 0).status == 200
        old_id = listener.wait_lines(1)[0]["id"]
        first.stop()
        second = start_gateway("-addr", f"127.0.0.1:{port}", *HISTORY)
        listener.wait_connected(times=2)
        assert second.publish(server, 21, "n", 1).status == 200
        notice, after = listener.wait_lines(3)[1:]
        assert notice == {"event": "gateway.missed",
                          "payload": {"recovered": False, "reason": "history_lost", "oldest_id": None, "kept": 0}}
        assert after["payload"] == 1 and after["id"] != old_id
        assert f"could not resume after {old_id}: history_lost" in listener.stderr.read_text()
        assert second.post("/disconnect", {"player_id": 21}, token=server).json == {"disconnected": 1}
        listener.wait_connected(times=3)
        assert second.publish(server, 21, "n", 2).status == 200
        assert listener.wait_lines(4)[3]["payload"] == 2  # not a second notice
        assert f", resuming after {after['id']}" in listener.stderr.read_text()
    finally:
        listener.kill()


def test_a_new_run_resumes_after_the_id_an_earlier_run_printed(tmp_path, start_gateway):
    """--last-event-id: a listen started again with the id of the last line the earlier one printed gets exactly
    what was published in between (another tab was open: nothing was queued for the player)."""
    gateway = start_gateway(*HISTORY)
    server, token = gateway.tokens.server(), gateway.tokens.player(21)
    other_tab = gateway.connect(token)
    earlier = Listener(tmp_path, base_url(gateway), token, name="earlier")
    later = None
    try:
        earlier.wait_connected()
        publish_numbers(gateway, server, range(3))
        last_id = earlier.wait_lines(3)[-1]["id"]
        assert earlier.stop(signal.SIGTERM) == 0
        publish_numbers(gateway, server, range(3, 6))
        assert [receive_event(other_tab)["payload"] for _ in range(6)] == list(range(6))
        later = Listener(tmp_path, base_url(gateway), token, "--last-event-id", last_id, name="later")
        assert [message["payload"] for message in later.wait_lines(3, PROCESS_START_TIMEOUT_S)] == [3, 4, 5]
        assert f", resuming after {last_id}" in later.stderr.read_text()
        publish_numbers(gateway, server, range(6, 7))
        assert [message["payload"] for message in later.wait_lines(4)] == [3, 4, 5, 6]
    finally:
        earlier.kill()
        if later is not None:
            later.kill()


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


def test_the_position_is_the_id_of_the_last_message_handed_on(start_gateway):
    """PlayerListener.last_event_id follows what on_message got; started with one, it resumes after it."""
    gateway = start_gateway(*HISTORY)
    server, token = gateway.tokens.server(), gateway.tokens.player(21)
    listener = PlayerListener(base_url(gateway), token)
    runner, messages, statuses = listen_in_greenlet(listener)
    try:
        wait_for(lambda: statuses == [f"connected to {listener.url}"], what="connected, with no position yet")
        publish_numbers(gateway, server, range(2))
        wait_for(lambda: len(messages) == 2, what="two messages")
        assert listener.last_event_id == json.loads(messages[-1])["id"]
    finally:
        listener.stop()
        runner.join(timeout=TIMEOUT_S)
    publish_numbers(gateway, server, range(2, 4))
    resumed = PlayerListener(base_url(gateway), token, last_event_id=json.loads(messages[0])["id"])
    runner, replayed, statuses = listen_in_greenlet(resumed)
    try:
        wait_for(lambda: len(replayed) == 3, what="what came after the first message")
        assert replayed[0] == messages[1] and [json.loads(text)["payload"] for text in replayed] == [1, 2, 3]
    finally:
        resumed.stop()
        runner.join(timeout=TIMEOUT_S)
