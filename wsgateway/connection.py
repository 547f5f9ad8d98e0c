"""One WebSocket connection after the handshake: reader loop, bounded outbox, writer, close.

A publisher must never wait on a player's socket. `send()` therefore never blocks: when
nothing is waiting it writes straight to the non-blocking socket; what the kernel does
not take goes to a bounded outbox drained by a writer greenlet, which exists only while
there is a backlog (an idle connection holds no greenlet of its own besides its reader).
When the outbox passes its bound in frames or bytes the client is too slow: the backlog
is discarded and the connection closed with 4000, and nobody else notices.

Close codes are real (gevent-websocket's `close()` never sends one): a close we start
is answered by the client or times out; a client's close is echoed with its code.
"""
from __future__ import annotations

import logging
import socket
import ssl
import time
from collections import deque
from typing import Callable

import gevent
from gevent import Greenlet
from gevent.ssl import SSLSocket

from wsgateway.errors import CloseCode, ProtocolViolation
from wsgateway.frames import (OP_PONG, PING_FRAME, Close, FrameParser, Message, Ping,
                              close_frame, encode_frame)
from wsgateway.scheduling import let_io_in

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 65536
FLUSH_SLICE = 32  # connections the flusher writes between two turns of the event loop
CLOSE_HANDSHAKE_TIMEOUT_S = 2.0  # how long a close we started waits for the client's answer
LINGER_BYTES = 1 << 20  # after failing a connection, bytes read and discarded while our close frame drains
WRITE_CHUNK_BYTES = 256 * 1024  # the writer joins queued frames into sends of about this size


def direct_socket(sock: socket.socket) -> socket.socket | None:
    """The real non-blocking socket inside a gevent socket: sending on it returns at once
    with what the kernel took, where gevent's send() would wait. None under TLS, where
    every byte must go through the TLS layer (the caller then uses sendall)."""
    if isinstance(sock, SSLSocket):
        return None
    return getattr(sock, "_sock", sock)


class OutboxLimits:
    """Bounds of one connection's outbox, and how long one write may stall."""

    __slots__ = ("max_frames", "max_bytes", "write_timeout_s")

    def __init__(self, max_frames: int, max_bytes: int, write_timeout_s: float) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.write_timeout_s = write_timeout_s


class Flusher:
    """Writes, from one greenlet, the frames that `Connection.send_later` queued.

    A broadcast queues its frame on every connection (cheap: no syscall) and leaves the
    writing to the flusher, which sends each connection's queued frames with one
    non-blocking send. Before every `FLUSH_SLICE` connections it lets the event loop
    turn (`let_io_in`), so publishes that arrived meanwhile are served, and broadcasts
    among them add to the same queues: a burst of broadcasts reaches each socket in few
    sends, and per delivery the kernel's send cost is shared.
    A socket that does not take everything gets its own writer for the rest, as with
    `send()`. The flusher greenlet exists only while there is something to flush."""

    def __init__(self) -> None:
        self._dirty: list[Connection] = []
        self._greenlet: Greenlet | None = None

    def add(self, connection: Connection) -> None:
        self._dirty.append(connection)
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        try:
            while self._dirty:
                dirty, self._dirty = self._dirty, []
                for index, connection in enumerate(dirty):
                    if not index % FLUSH_SLICE:
                        let_io_in()
                    try:
                        connection.flush()
                    except Exception:  # the flusher's top level: one bad socket must not stall the rest
                        log.exception("flush failed", extra={
                            "event": "internal_error", "player_id": connection.player_id, "remote": connection.remote})
                        connection.abort(CloseCode.INTERNAL_ERROR)
        finally:
            self._greenlet = None


FLUSHER = Flusher()  # one per process, like gevent's hub


class Connection:
    """A WebSocket connection over an upgraded gevent socket.

    `serve()` runs the reader loop in the calling greenlet until the connection ends and
    returns its close code. `send()`, `close()` and `abort()` may be called from any
    greenlet, never block, and are idempotent once the connection is closing.
    """

    __slots__ = (
        "player_id", "token", "remote", "last_heard", "close_code", "dropped_frames",
        "_socket", "_raw_socket", "_rfile", "_limits", "_max_message_bytes", "_on_message",
        "_clock", "_outbox", "_outbox_bytes", "_writer", "_close_sent", "_closing", "_aborted",
        "_close_timer", "_held", "_flush_pending", "_flusher",
    )

    def __init__(self, sock: socket.socket, rfile, *, limits: OutboxLimits, max_message_bytes: int,
                 player_id: str = "", token: str = "", remote: str = "",
                 on_message: Callable[[Connection, Message], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, flusher: Flusher = FLUSHER) -> None:
        self.player_id = player_id
        self.token = token  # kept for revalidation; never logged
        self.remote = remote
        self._socket = sock
        self._raw_socket = direct_socket(sock)
        self._rfile = rfile
        self._limits = limits
        self._max_message_bytes = max_message_bytes
        self._on_message = on_message
        self._clock = clock
        self.last_heard = clock()
        self.close_code: int = CloseCode.ABNORMAL
        self.dropped_frames = 0
        self._outbox: deque[bytes] | None = None
        self._outbox_bytes = 0
        self._writer: Greenlet | None = None
        self._close_sent = False
        self._closing = False
        self._aborted = False
        self._close_timer: Greenlet | None = None
        self._held: list[bytes] | None = None  # live frames waiting behind the backlog
        self._flush_pending = False
        self._flusher = flusher

    @property
    def is_open(self) -> bool:
        return not self._closing

    # --- sending -------------------------------------------------------------------
    def send(self, frame: bytes) -> bool:
        """Queue one complete frame for the client. False if the connection is closing
        (nothing was queued) or just closed itself as too slow."""
        if self._closing:
            return False
        if self._held is not None:
            return self._hold_back(frame)
        return self._write(frame)

    def _hold_back(self, frame: bytes) -> bool:
        assert self._held is not None
        self._held.append(frame)
        if len(self._held) > self._limits.max_frames:
            self.abort(CloseCode.SLOW_CONSUMER)
            return False
        return True

    def hold(self) -> None:
        """Keep live frames back until `release`: the backlog must reach the client first,
        and fetching it may take a round trip to the shared roster."""
        self._held = []

    def release(self, first: list[bytes]) -> int:
        """Send `first` (the backlog), then the frames held since `hold`; return how many
        of `first` were taken."""
        held, self._held = self._held or [], None
        taken = sum(self.send(frame) for frame in first)
        for frame in held:
            self.send(frame)
        return taken

    def send_later(self, frame: bytes) -> bool:
        """Queue one complete frame for the shared flusher to write soon, after anything
        queued before it; for broadcasts, whose frames to one socket then leave together.
        Same answers and bounds as `send()`."""
        if self._closing:
            return False
        if self._held is not None:
            return self._hold_back(frame)
        if not self._append(frame):
            return False
        if not self._flush_pending and self._writer is None:
            self._flush_pending = True
            self._flusher.add(self)
        return True

    def flush(self) -> None:
        """The flusher's turn: hand what is queued to the socket without waiting; a
        writer greenlet takes what the kernel does not (or a backlog over one chunk)."""
        self._flush_pending = False
        if self._writer is not None or not self._outbox:
            return  # a writer drains the outbox already, or the connection was aborted
        if self._raw_socket is None:  # TLS: only the writer's sendall may touch the socket
            self._writer = gevent.spawn(self._drain_outbox)
            return
        chunk = self._take_chunk()
        sent = self._send_or_abort(self._raw_socket, chunk)
        if sent is None:
            return
        if sent < len(chunk):
            if self._outbox is None:
                self._outbox = deque()
            self._outbox.appendleft(chunk[sent:])
            self._outbox_bytes += len(chunk) - sent
        if self._outbox:
            self._writer = gevent.spawn(self._drain_outbox)

    def ping(self) -> None:
        """Send a ping; the client's pong refreshes `last_heard`."""
        self.send(PING_FRAME)

    def _write(self, frame: bytes) -> bool:
        if self._outbox is None and self._writer is None and self._raw_socket is not None:
            sent = self._send_or_abort(self._raw_socket, frame)
            if sent is None:
                return False
            if sent == len(frame):
                return True
            frame = frame[sent:]
        elif self._flush_pending:
            return self._append(frame)  # behind the frames the flusher is about to write
        return self._enqueue(frame)

    def _send_or_abort(self, raw_socket: socket.socket, data: bytes) -> int | None:
        """What the kernel takes of `data` at once (0 when it would block); None, and the
        connection aborted, when the socket failed."""
        try:
            return raw_socket.send(data)
        except BlockingIOError:
            return 0
        except OSError:
            self.abort(CloseCode.ABNORMAL)
            return None

    def _enqueue(self, frame: bytes) -> bool:
        if not self._append(frame):
            return False
        if self._writer is None:
            self._writer = gevent.spawn(self._drain_outbox)
        return True

    def _append(self, frame: bytes) -> bool:
        """Add to the outbox; past its bound, the client is too slow and is aborted."""
        if self._outbox is None:
            self._outbox = deque()
        self._outbox.append(frame)
        self._outbox_bytes += len(frame)
        if len(self._outbox) > self._limits.max_frames or self._outbox_bytes > self._limits.max_bytes:
            self.abort(CloseCode.SLOW_CONSUMER)
            return False
        return True

    def _drain_outbox(self) -> None:
        """Writer greenlet: send the backlog in coalesced chunks, then exit."""
        try:
            while self._outbox:
                chunk = self._take_chunk()
                with gevent.Timeout(self._limits.write_timeout_s):
                    self._socket.sendall(chunk)
        except gevent.Timeout:
            self.abort(CloseCode.SLOW_CONSUMER)  # a frame is half written: no close frame
        except OSError:
            self.abort(CloseCode.ABNORMAL)
        finally:
            self._writer = None

    def _take_chunk(self) -> bytes:
        outbox = self._outbox
        assert outbox is not None
        parts = []
        size = 0
        while outbox and size < WRITE_CHUNK_BYTES:
            frame = outbox.popleft()
            parts.append(frame)
            size += len(frame)
        self._outbox_bytes -= size
        if not outbox:
            self._outbox = None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # --- closing --------------------------------------------------------------------
    def close(self, code: CloseCode, reason: str | None = None) -> None:
        """Start the closing handshake after what is already queued; the connection ends
        when the client answers or after `CLOSE_HANDSHAKE_TIMEOUT_S`."""
        if self._closing:
            return
        self._closing = True
        self.close_code = code
        self._send_close(code, code.reason if reason is None else reason)
        self._close_timer = gevent.spawn_later(CLOSE_HANDSHAKE_TIMEOUT_S, self._shutdown)

    def abort(self, code: CloseCode) -> None:
        """End now: discard the backlog, try to send a close frame without waiting, and
        shut the socket so the reader returns. For clients that cannot or will not read."""
        if self._aborted:
            return
        self._aborted = True
        if not self._closing:
            self._closing = True
            self.close_code = code
        if self._outbox:
            self.dropped_frames += len(self._outbox)
        if self._held:
            self.dropped_frames += len(self._held)
        self._held = None
        # Only a writer can have put part of a frame on the wire (a partial send always
        # hands the rest to one); frames merely queued for the flusher are whole.
        mid_frame = self._writer is not None
        self._outbox, self._outbox_bytes = None, 0
        if self._writer is not None and self._writer is not gevent.getcurrent():
            self._writer.kill(block=False)
            self._writer = None
        if not mid_frame and not self._close_sent and code != CloseCode.ABNORMAL:
            self._close_sent = True
            try:
                self._send_now(close_frame(code, code.reason))
            except OSError:  # ssl.SSLError included: under TLS the close frame is best effort
                pass
        self._shutdown()

    def _send_now(self, data: bytes) -> None:
        """One write that never waits (what the socket does not take is lost)."""
        if self._raw_socket is not None:
            self._raw_socket.send(data)
            return
        # A TLS socket with timeout 0 answers "would block" with 0 instead of waiting. No
        # other greenlet runs before the timeout is restored: nothing here yields.
        timeout_s = self._socket.gettimeout()
        self._socket.settimeout(0.0)
        try:
            self._socket.send(data)
        finally:
            self._socket.settimeout(timeout_s)

    def _send_close(self, code: int, reason: str) -> None:
        if not self._close_sent:
            self._close_sent = True
            self._write(close_frame(code, reason))

    def _shutdown(self) -> None:
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # --- reading --------------------------------------------------------------------
    def serve(self) -> int:
        """Read until the connection ends; return the close code it ended with."""
        parser = FrameParser(self._max_message_bytes)
        try:
            data = self._take_buffered_input()
            while True:
                if not data:
                    # Straight from the socket: the bytes object for a read is allocated
                    # when data is there, so an idle connection holds no read buffer
                    # (a buffered reader's read1 would hold READ_CHUNK_BYTES while it waits).
                    data = self._socket.recv(READ_CHUNK_BYTES)
                    if not data:
                        return self.close_code
                self.last_heard = self._clock()
                violation = None
                try:
                    events = parser.feed(data)
                except ProtocolViolation as caught:
                    events, violation = caught.events, caught
                for event in events:  # what the client sent before a bad frame counts
                    if isinstance(event, Close):
                        return self._answer_close(event)
                    if isinstance(event, Ping):
                        self.send(encode_frame(OP_PONG, event.payload))
                    elif isinstance(event, Message) and self._on_message is not None and not self._closing:
                        self._on_message(self, event)
                if violation is not None:
                    log.info("websocket protocol violation", extra={
                        "event": "protocol_violation", "player_id": self.player_id, "remote": self.remote,
                        "code": int(violation.code), "detail": violation.detail})
                    self._fail(violation.code)
                    return self.close_code
                data = b""
        except OSError:
            return self.close_code
        finally:
            self._finish()

    def _take_buffered_input(self) -> bytes:
        """What the HTTP layer already read past the handshake (a client may send frames
        right behind its upgrade request), without waiting; the reader is then dropped."""
        rfile, self._rfile = self._rfile, None
        if rfile is None:
            return b""
        timeout_s = self._socket.gettimeout()
        self._socket.settimeout(0.0)  # peek returns what is buffered, or b"" at once
        try:
            buffered = rfile.peek(READ_CHUNK_BYTES)
        except ssl.SSLWantReadError:  # TLS with nothing buffered says so instead of b""
            buffered = b""
        finally:
            self._socket.settimeout(timeout_s)
        return rfile.read1(len(buffered)) if buffered else b""

    def _answer_close(self, event: Close) -> int:
        if not self._closing:
            self._closing = True
            self.close_code = event.code
            echo = CloseCode.NORMAL if event.code == CloseCode.NO_STATUS else event.code
            self._send_close(echo, "")
        self._flush(CLOSE_HANDSHAKE_TIMEOUT_S)
        return self.close_code

    def _fail(self, code: CloseCode) -> None:
        """Fail the connection: close frame, FIN, then discard input until the client
        hangs up, so that closing the socket does not reset our close frame away."""
        if not self._closing:
            self._closing = True
            self.close_code = code
        self._send_close(code, code.reason)
        self._flush(CLOSE_HANDSHAKE_TIMEOUT_S)
        try:
            self._socket.shutdown(socket.SHUT_WR)
            discarded = 0
            with gevent.Timeout(CLOSE_HANDSHAKE_TIMEOUT_S, False):
                while discarded < LINGER_BYTES:
                    data = self._socket.recv(READ_CHUNK_BYTES)
                    if not data:
                        break
                    discarded += len(data)
        except OSError:
            pass

    def _flush(self, timeout_s: float) -> None:
        """Write what is queued (our close frame last) before the connection ends."""
        if self._flush_pending:
            self.flush()  # do not leave it to the flusher: the reader is about to finish
        if self._writer is not None:
            self._writer.join(timeout_s)

    def _finish(self) -> None:
        self._closing = True
        if self._close_timer is not None:
            self._close_timer.kill(block=False)
        if self._writer is not None:
            self._writer.kill(block=False)
        if self._outbox:
            self.dropped_frames += len(self._outbox)
        self._outbox, self._outbox_bytes = None, 0
