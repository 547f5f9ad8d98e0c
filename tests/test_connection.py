"""wsgateway.connection on a socket pair: frames queued for the shared flusher (broadcasts)
leave together and in order with direct sends, within the outbox bound."""
from __future__ import annotations

import socket
import struct

import gevent

from tests.support import wait_for
from wsgateway.connection import Connection
from wsgateway.errors import CloseCode
from wsgateway.outbox import Flusher, OutboxLimits
from wsgateway.frames import text_frame


def pair(max_frames: int = 100) -> tuple[Connection, socket.socket, Flusher]:
    server_end, client_end = socket.socketpair()
    flusher = Flusher()
    connection = Connection(server_end, None, limits=OutboxLimits(max_frames, 1 << 20, write_timeout_s=5),
                            max_message_bytes=1024, flusher=flusher)
    return connection, client_end, flusher


def received(client_end: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = client_end.recv(65536)
        assert chunk, data
        data += chunk
    return data


def test_frames_queued_for_the_flusher_leave_in_one_send_in_order():
    """send_later queues without writing; the flusher writes the burst at once, and a send() in between waits its turn."""
    connection, client_end, _ = pair()
    first, second, direct = text_frame(b"one"), text_frame(b"two"), text_frame(b"three")
    assert connection.send_later(first) and connection.send_later(second)
    assert connection.send(direct), "accepted, queued behind the broadcast frames"
    client_end.setblocking(False)
    try:
        client_end.recv(1)
        raise AssertionError("something was written before the flusher ran")
    except BlockingIOError:
        pass
    client_end.setblocking(True)
    client_end.settimeout(5)
    assert received(client_end, len(first + second + direct)) == first + second + direct


def test_send_writes_at_once_when_nothing_is_queued():
    """With nothing queued, send() writes straight to the socket, without the flusher."""
    connection, client_end, flusher = pair()
    frame = text_frame(b"now")
    assert connection.send(frame)
    client_end.setblocking(False)
    assert client_end.recv(100) == frame
    assert flusher._greenlet is None


def test_queued_frames_past_the_outbox_bound_close_the_connection_as_too_slow():
    """send_later past -max-outbox aborts with 4000: the queued frames are dropped and counted, a close frame is sent."""
    connection, client_end, _ = pair(max_frames=2)
    assert connection.send_later(text_frame(b"1")) and connection.send_later(text_frame(b"2"))
    assert not connection.send_later(text_frame(b"3"))
    assert connection.close_code == 4000
    assert connection.dropped_frames == 3
    assert not connection.send_later(text_frame(b"4")) and not connection.send(text_frame(b"5"))
    client_end.settimeout(5)
    header = received(client_end, 4)
    assert header[0] == 0x88 and struct.unpack("!H", header[2:4])[0] == 4000


def test_one_flusher_serves_many_connections():
    """One flusher pass writes the queued frames of every connection that has some."""
    flusher = Flusher()
    ends = [socket.socketpair() for _ in range(600)]
    connections = [Connection(server_end, None, limits=OutboxLimits(10, 1 << 20, 5), max_message_bytes=1024,
                              flusher=flusher) for server_end, _ in ends]
    frame = text_frame(b"all")
    assert all(connection.send_later(frame) for connection in connections)
    wait_for(lambda: flusher._greenlet is None, what="flusher done")
    gevent.sleep(0)
    for _, client_end in ends:
        client_end.settimeout(5)
        assert received(client_end, len(frame)) == frame


class IdleFlusher(Flusher):
    """A flusher that has not had its turn yet."""

    def add(self, connection: Connection) -> None:
        pass


def test_close_answered_while_frames_wait_for_the_flusher_sends_them_first():
    """A client's close arriving while broadcast frames wait for the flusher: they, then the echoed close, are sent."""
    server_end, client_end = socket.socketpair()
    connection = Connection(server_end, None, limits=OutboxLimits(10, 1 << 20, 5), max_message_bytes=1024,
                            flusher=IdleFlusher())
    frame = text_frame(b"queued")
    assert connection.send_later(frame)
    reader = gevent.spawn(connection.serve)
    client_end.sendall(bytes((0x88, 0x82)) + b"\0\0\0\0" + struct.pack("!H", 1000))
    client_end.settimeout(5)
    assert received(client_end, len(frame) + 4) == frame + bytes((0x88, 2)) + struct.pack("!H", 1000)
    assert reader.get(timeout=5) == 1000


def test_frames_held_for_a_connection_that_starts_closing_meanwhile_are_counted_as_dropped():
    """Held behind a backlog, then the connection closes before the release: the held
    frames (taken, so counted as delivered) are not sent, and are counted as dropped."""
    connection, _client_end, _flusher = pair()
    connection.hold()
    assert connection.send(text_frame(b"one")) and connection.send_later(text_frame(b"two"))
    connection.close(CloseCode.GOING_AWAY, handshake_timeout_s=None)
    assert connection.release([]) == 0
    assert connection.dropped_frames == 2
