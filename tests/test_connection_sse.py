"""wsgateway.connection_sse on a socket pair: nothing before the release, then the preamble with the backlog;
a close sends gateway.close after what is queued and ends the stream; the outbox bound holds."""
from __future__ import annotations

import socket

import gevent

from tests.support import TIMEOUT_S, wait_for
from tests.support.fakes import FakeClock
from wsgateway.connection import ConnectionState
from wsgateway.connection_sse import EventStreamConnection
from wsgateway.errors import CloseCode
from wsgateway.event_stream import EventEncoder, close_event
from wsgateway.outbox import Flusher, OutboxLimits
from wsgateway.protocol import event_frame

PREAMBLE = b"HTTP/1.1 200 OK\r\n\r\nretry: 1000\n\n"


def pair(max_frames: int = 100, max_bytes: int = 1 << 20,
         clock: FakeClock | None = None) -> tuple[EventStreamConnection, socket.socket]:
    server_end, client_end = socket.socketpair()
    client_end.settimeout(TIMEOUT_S)
    connection = EventStreamConnection(server_end, PREAMBLE, limits=OutboxLimits(max_frames, max_bytes, 5),
                                       flusher=Flusher(), encoder=EventEncoder(), clock=clock or FakeClock())
    return connection, client_end


def pending(client_end: socket.socket) -> bytes:
    client_end.setblocking(False)
    try:
        return client_end.recv(1 << 20)
    except BlockingIOError:
        return b""
    finally:
        client_end.settimeout(TIMEOUT_S)


def until_closed(client_end: socket.socket) -> bytes:
    data = b""
    while chunk := client_end.recv(1 << 20):
        data += chunk
    return data


def test_nothing_is_written_until_release_then_preamble_backlog_and_held_frames_in_order():
    """Held live frames wait behind the backlog, and the preamble (head, retry) goes first, with them."""
    connection, client_end = pair()
    connection.hold()
    assert connection.send(event_frame("live", 2))
    assert pending(client_end) == b""
    assert connection.release([event_frame("queued", 1)]) == 1
    assert pending(client_end) == PREAMBLE + b"event: queued\ndata: 1\n\nevent: live\ndata: 2\n\n"


def test_a_ping_is_a_comment_and_refreshes_last_heard():
    """ping() writes the keepalive comment once released (never before the head), and counts as hearing the client."""
    clock = FakeClock()
    connection, client_end = pair(clock=clock)
    connection.hold()
    clock.now += 10
    connection.ping()
    assert pending(client_end) == b"" and connection.last_heard == clock.now
    connection.release([])
    connection.ping()
    assert pending(client_end) == PREAMBLE + b": keepalive\n\n"


def test_a_close_sends_gateway_close_after_what_is_queued_then_ends_the_stream():
    """Queued broadcast frames, then gateway.close, then EOF; serve() returns the close code."""
    connection, client_end = pair()
    reader = gevent.spawn(connection.serve)
    connection.release([])
    connection.send_later(event_frame("broadcast", 1))
    connection.close(CloseCode.DISCONNECTED)
    assert not connection.send(event_frame("late", 2))
    assert until_closed(client_end) == PREAMBLE + b"event: broadcast\ndata: 1\n\n" + close_event(CloseCode.DISCONNECTED)
    assert reader.get(timeout=TIMEOUT_S) == CloseCode.DISCONNECTED


def test_a_close_before_release_still_writes_the_head_first():
    """Revalidation may close a stream whose backlog is still being fetched: head, retry, gateway.close."""
    connection, client_end = pair()
    connection.hold()
    connection.close(CloseCode.POLICY_VIOLATION, handshake_timeout_s=None)
    assert until_closed(client_end) == PREAMBLE + close_event(CloseCode.POLICY_VIOLATION)
    assert connection.release([event_frame("queued", 1)]) == 0


def test_a_close_waits_for_a_backlog_to_drain_before_ending():
    """A backlog the kernel did not take is written out by the writer, and only then the stream ends."""
    connection, client_end = pair(max_bytes=64 << 20)
    connection.release([])
    big = event_frame("big", "x" * (1 << 20))
    for _ in range(4):
        assert connection.send(big)
    connection.close(CloseCode.GOING_AWAY)
    received = until_closed(client_end)
    assert received.endswith(close_event(CloseCode.GOING_AWAY))
    assert received.count(b"event: big\n") == 4


def test_past_the_outbox_bound_the_stream_is_cut_off_as_too_slow():
    """More queued than -max-outbox: aborted with 4000, the backlog dropped and counted, the reader ended."""
    connection, client_end = pair(max_frames=3)
    reader = gevent.spawn(connection.serve)
    connection.release([])
    accepted = [connection.send_later(event_frame("e", number)) for number in range(5)]
    assert accepted == [True, True, True, False, False]
    assert connection.state is ConnectionState.ABORTED and connection.close_code == CloseCode.SLOW_CONSUMER
    assert connection.dropped_frames == 4
    assert reader.get(timeout=TIMEOUT_S) == CloseCode.SLOW_CONSUMER
    assert until_closed(client_end) == PREAMBLE + close_event(CloseCode.SLOW_CONSUMER)


def test_the_client_hanging_up_ends_the_stream_with_1000():
    """A stream's client closes its connection to end it: recorded as 1000, whatever it sent before is dropped."""
    connection, client_end = pair()
    reader = gevent.spawn(connection.serve)
    connection.release([])
    assert pending(client_end) == PREAMBLE  # what a client leaves unread makes its close a reset (1006)
    client_end.sendall(b"anything at all")
    client_end.close()
    assert reader.get(timeout=TIMEOUT_S) == CloseCode.NORMAL
    wait_for(lambda: not connection.is_open, what="closed")
