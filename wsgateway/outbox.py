"""One socket's bounded outbox, its writer greenlet, and the flusher that all sockets share.

A publisher must never wait on a player's socket, so nothing here blocks the caller:
`Outbox.write()` hands a frame straight to the non-blocking socket when nothing waits
before it; what the kernel does not take waits in the outbox, drained by a writer
greenlet that exists only while there is a backlog. `Outbox.write_later()` queues a
frame for the shared `Flusher`, which writes each socket's queued frames with one send
(a burst of broadcasts then costs few syscalls per socket). Past its bound in frames or
bytes the outbox calls its owner's `abort` (the connection closes as too slow, 4000).

Where the frames are is one `OutboxState`:

    EMPTY     nothing waits: the next frame goes straight to the socket
    QUEUED    frames wait for the flusher's turn (no writer yet)
    DRAINING  a writer greenlet sends the backlog (it may have part of a frame on the wire)
"""
from __future__ import annotations

import logging
import socket
from collections import deque
from enum import Enum
from typing import Protocol

import gevent
from gevent import Greenlet
from gevent.ssl import SSLSocket

from wsgateway.errors import CloseCode
from wsgateway.scheduling import let_io_in

log = logging.getLogger(__name__)

FLUSH_SLICE = 32  # connections the flusher writes between two turns of the event loop
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


class OutboxState(Enum):
    EMPTY = "empty"
    QUEUED = "queued"
    DRAINING = "draining"


class Flushable(Protocol):
    """What the flusher needs of a connection."""

    player_id: str
    remote: str

    def flush(self) -> None:
        """Write what is queued without waiting."""

    def abort(self, code: CloseCode) -> None:
        """End the connection now."""


class Flusher:
    """Writes, from one greenlet, the frames that `Outbox.write_later` queued.

    Before every `FLUSH_SLICE` connections it lets the event loop turn (`let_io_in`), so
    publishes that arrived meanwhile are served, and broadcasts among them add to the same
    queues: a burst of broadcasts reaches each socket in few sends. A socket that does not
    take everything gets its own writer for the rest. The flusher greenlet exists only
    while there is something to flush."""

    def __init__(self) -> None:
        self._dirty: list[Flushable] = []
        self._greenlet: Greenlet | None = None

    def add(self, connection: Flushable) -> None:
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


class Outbox:
    """The frames waiting for one socket. `write`, `write_later` and `flush` never block.

    `owner.abort(code)` is called when the bound is passed (SLOW_CONSUMER), a write
    stalls past `write_timeout_s` (SLOW_CONSUMER) or the socket fails (ABNORMAL); it must
    end the connection, calling `discard()`. The owner is also what the flusher is
    handed (it calls `owner.flush()`)."""

    __slots__ = ("state", "_frames", "_bytes", "_limits", "_socket", "_raw_socket", "_writer", "_owner", "_flusher")

    def __init__(self, sock: socket.socket, limits: OutboxLimits, owner: Flushable, flusher: Flusher) -> None:
        self.state = OutboxState.EMPTY
        self._frames: deque[bytes] | None = None  # allocated only while frames wait
        self._bytes = 0
        self._limits = limits
        self._socket = sock
        self._raw_socket = direct_socket(sock)
        self._writer: Greenlet | None = None  # set while DRAINING
        self._owner = owner
        self._flusher = flusher

    def __len__(self) -> int:
        return len(self._frames) if self._frames else 0

    def write(self, frame: bytes) -> bool:
        """Send `frame` after anything waiting; False when that overflowed or failed."""
        if self.state is OutboxState.EMPTY and self._raw_socket is not None:
            sent = self._send_or_fail(frame)
            if sent is None:
                return False
            if sent == len(frame):
                return True
            frame = frame[sent:]
        elif self.state is OutboxState.QUEUED:
            return self._append(frame)  # behind the frames the flusher is about to write
        if not self._append(frame):
            return False
        if self.state is not OutboxState.DRAINING:
            self._start_writer()
        return True

    def write_later(self, frame: bytes) -> bool:
        """Queue `frame` for the flusher (after anything queued before it)."""
        if not self._append(frame):
            return False
        if self.state is OutboxState.EMPTY:
            self.state = OutboxState.QUEUED
            self._flusher.add(self._owner)
        return True

    def flush(self) -> None:
        """The flusher's turn: hand what is queued to the socket without waiting; a writer
        takes what the kernel does not (or a backlog over one chunk)."""
        if self.state is not OutboxState.QUEUED:
            return  # a writer drains the outbox already, or it was discarded
        self.state = OutboxState.EMPTY
        if not self._frames:
            return
        if self._raw_socket is None:  # TLS: only the writer's sendall may touch the socket
            self._start_writer()
            return
        chunk = self._take_chunk()
        sent = self._send_or_fail(chunk)
        if sent is None:
            return
        if sent < len(chunk):
            if self._frames is None:
                self._frames = deque()
            self._frames.appendleft(chunk[sent:])
            self._bytes += len(chunk) - sent
        if self._frames:
            self._start_writer()

    def finish(self, timeout_s: float) -> None:
        """Write what is queued, waiting at most `timeout_s` for a writer to drain it."""
        if self.state is OutboxState.QUEUED:
            self.flush()  # do not leave it to the flusher: the connection is about to end
        writer = self._writer
        if writer is not None:
            writer.join(timeout_s)

    def discard(self) -> tuple[int, bool]:
        """Drop every waiting frame and stop the writer; return how many frames were
        dropped and whether part of a frame may be on the wire (a writer was sending)."""
        dropped = len(self)
        mid_frame = self.state is OutboxState.DRAINING
        self._frames, self._bytes = None, 0
        writer = self._writer
        if writer is not None and writer is not gevent.getcurrent():
            writer.kill(block=False)
            self._writer = None
        self.state = OutboxState.EMPTY if writer is None or self._writer is None else self.state
        return dropped, mid_frame

    def send_now(self, data: bytes) -> None:
        """One write that never waits, past anything queued (what the socket does not
        take is lost): for the close frame of an aborted connection."""
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

    def _send_or_fail(self, data: bytes) -> int | None:
        """What the kernel takes of `data` at once (0 when it would block); None, and
        the owner aborted, when the socket failed."""
        try:
            return self._raw_socket.send(data)  # type: ignore[union-attr]
        except BlockingIOError:
            return 0
        except OSError:
            self._owner.abort(CloseCode.ABNORMAL)
            return None

    def _append(self, frame: bytes) -> bool:
        """Add to the outbox; past its bound, the client is too slow."""
        if self._frames is None:
            self._frames = deque()
        self._frames.append(frame)
        self._bytes += len(frame)
        if len(self._frames) > self._limits.max_frames or self._bytes > self._limits.max_bytes:
            self._owner.abort(CloseCode.SLOW_CONSUMER)
            return False
        return True

    def _start_writer(self) -> None:
        self.state = OutboxState.DRAINING
        self._writer = gevent.spawn(self._drain)

    def _drain(self) -> None:
        """Writer greenlet: send the backlog in coalesced chunks, then exit."""
        try:
            while self._frames:
                chunk = self._take_chunk()
                with gevent.Timeout(self._limits.write_timeout_s):
                    self._socket.sendall(chunk)
        except gevent.Timeout:
            self._owner.abort(CloseCode.SLOW_CONSUMER)  # a frame is half written: no close frame
        except OSError:
            self._owner.abort(CloseCode.ABNORMAL)
        finally:
            if self._writer is gevent.getcurrent():
                self._writer = None
                self.state = OutboxState.EMPTY

    def _take_chunk(self) -> bytes:
        frames = self._frames
        assert frames is not None
        parts = []
        size = 0
        while frames and size < WRITE_CHUNK_BYTES:
            frame = frames.popleft()
            parts.append(frame)
            size += len(frame)
        self._bytes -= size
        if not frames:
            self._frames = None
        return parts[0] if len(parts) == 1 else b"".join(parts)
