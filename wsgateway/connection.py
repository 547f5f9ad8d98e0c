"""A player connection after its request was admitted: what every transport shares
(`PlayerConnection`: the outbox, holding live frames behind the backlog, the life as one
`ConnectionState`), and the WebSocket one (`Connection`: reader loop, close handshake).
The Server-Sent Events stream is the other kind (`wsgateway.connection_sse`).

A publisher must never wait on a player's socket: `send()` never blocks (see `Outbox`).
When the outbox passes its bound in frames or bytes the client is too slow: the backlog
is discarded and the connection closed with 4000, and nobody else notices.

Close codes are real (gevent-websocket's `close()` never sends one): a close we start
is answered by the client or times out; a client's close is echoed with its code. The
connection's life is one `ConnectionState`: OPEN, then CLOSING (a close frame was
started or answered, or the reader ended), or ABORTED (ended at once, backlog dropped).
"""
from __future__ import annotations

import logging
import socket
import ssl
import time
from enum import Enum
from typing import Callable

import gevent
from gevent import Greenlet

from wsgateway.errors import CloseCode, ProtocolViolation
from wsgateway.frames import (OP_PONG, PING_FRAME, Close, FrameParser, Message, Ping,
                              close_frame, encode_frame)
from wsgateway.history import Stamped, StreamPoint
from wsgateway.outbox import FLUSHER, Flusher, Outbox, OutboxLimits

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 65536
CLOSE_HANDSHAKE_TIMEOUT_S = 2.0  # how long a close we started waits for the client's answer
LINGER_BYTES = 1 << 20  # after failing a connection, bytes read and discarded while our close frame drains


class ConnectionState(Enum):
    OPEN = "open"  # frames are accepted
    CLOSING = "closing"  # a close frame was started or answered: nothing new is accepted
    ABORTED = "aborted"  # ended at once: the backlog was dropped


class PlayerConnection:
    """What every kind of player connection shares, whatever its framing: who it is, its
    life (`ConnectionState`), its outbox, and live frames held behind the backlog.

    The hub, delivery, keep-alive, revalidation and shutdown see only this (`hub.Deliverable`,
    `delivery.HeldConnection`, `keepalive.Pingable`, `revalidation.Closable`): what a
    transport adds is how it frames a message (`send`, `send_later` take the WebSocket frame
    every recipient shares), how it pings, closes and reads. `send()`, `close()` and
    `abort()` may be called from any greenlet, never block, and are idempotent once the
    connection is closing.
    """

    __slots__ = (
        "player_id", "token", "remote", "last_heard", "close_code", "dropped_frames", "state", "wants_ids",
        "_socket", "_limits", "_clock", "_outbox", "_held", "_replayed_through",
    )

    def __init__(self, sock: socket.socket, *, limits: OutboxLimits, player_id: str = "", token: str = "",
                 remote: str = "", wants_ids: bool = False, clock: Callable[[], float] = time.monotonic,
                 flusher: Flusher = FLUSHER) -> None:
        self.player_id = player_id
        self.token = token  # kept for revalidation; never logged
        self.remote = remote
        self.wants_ids = wants_ids  # frames carry their ids (history.Stamped): it asked with last_event_id
        self._socket = sock
        self._limits = limits
        self._clock = clock
        self.last_heard = clock()
        self.close_code: int = CloseCode.ABNORMAL
        self.dropped_frames = 0
        self.state = ConnectionState.OPEN
        self._outbox = Outbox(sock, limits, self, flusher)
        self._held: list[bytes] | None = None  # live frames waiting behind the backlog (see hold)
        self._replayed_through: StreamPoint | None = None  # live frames up to here were had (see release)

    @property
    def is_open(self) -> bool:
        return self.state is ConnectionState.OPEN

    def _start_closing(self, code: int) -> bool:
        """OPEN -> CLOSING with `code`; False when it was closing already."""
        if self.state is not ConnectionState.OPEN:
            return False
        self.state = ConnectionState.CLOSING
        self.close_code = code
        return True

    # --- sending -------------------------------------------------------------------
    def send(self, frame: bytes) -> bool:
        """Queue one complete frame for the client. False if the connection is closing
        (nothing was queued) or just closed itself as too slow."""
        if self.state is not ConnectionState.OPEN:
            return False
        if self._held is not None:
            return self._hold_back(frame)
        if self._replayed_through is not None and self._replayed_through.covers(frame):
            return True  # had already (see release)
        return self._outbox.write(frame)

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

    def release(self, first: list[bytes], replayed: frozenset[str] = frozenset(),
                through: StreamPoint | None = None) -> int:
        """Send `first` (the backlog, or a replay), then the frames held since `hold`,
        except those whose id is in `replayed` (`first` carried them already); return
        how many of `first` were taken. `through` (a replay's, see `history.Replay`):
        from now on, a live frame at or before it is not sent, however late it comes.
        Held frames the connection no longer takes (it started closing while they were
        held) count in `dropped_frames`: they were counted as delivered when held."""
        held, self._held = self._held or [], None
        taken = sum(self.send(frame) for frame in first)
        if through is not None:
            self._replayed_through = through
        for frame in held:
            if not (replayed and isinstance(frame, Stamped) and frame.event_id in replayed):
                if not self.send(frame):
                    self.dropped_frames += 1
        return taken

    def send_later(self, frame: bytes) -> bool:
        """Queue one complete frame for the shared flusher to write soon, after anything
        queued before it; for broadcasts, whose frames to one socket then leave together.
        Same answers and bounds as `send()`."""
        if self.state is not ConnectionState.OPEN:
            return False
        if self._held is not None:
            return self._hold_back(frame)
        if self._replayed_through is not None and self._replayed_through.covers(frame):
            return True  # had already (see release)
        return self._outbox.write_later(frame)

    def flush(self) -> None:
        """The flusher's turn (see `Outbox.flush`)."""
        self._outbox.flush()

    # --- ending ---------------------------------------------------------------------
    def hang_up(self) -> None:
        """End the connection now, without a word more: the reader returns at once."""
        self._shutdown()

    def abort(self, code: CloseCode) -> None:
        """End now: discard the backlog, try to tell the client why without waiting, and
        shut the socket so the reader returns. For clients that cannot or will not read."""
        if self.state is ConnectionState.ABORTED:
            return
        self._start_closing(code)
        self.state = ConnectionState.ABORTED
        if self._held:
            self.dropped_frames += len(self._held)
        self._held = None
        # Only a writer can have put part of a frame on the wire (a partial send always
        # hands the rest to one); frames merely queued for the flusher are whole.
        dropped, mid_frame = self._outbox.discard()
        self.dropped_frames += dropped
        if not mid_frame and code != CloseCode.ABNORMAL:
            farewell = self._farewell(code)
            if farewell:
                try:
                    self._outbox.send_now(farewell)
                except OSError:  # ssl.SSLError included: under TLS the farewell is best effort
                    pass
        self._shutdown()

    def _farewell(self, code: CloseCode) -> bytes:
        """The bytes that tell the client why an abort ends the connection (b"": none
        left to send); what the kernel does not take at once is lost."""
        raise NotImplementedError

    def _shutdown(self) -> None:
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _discard_backlog(self) -> None:
        """The reader ended: nothing more will be written."""
        dropped, _ = self._outbox.discard()
        self.dropped_frames += dropped


class Connection(PlayerConnection):
    """A WebSocket connection over an upgraded gevent socket.

    `serve()` runs the reader loop in the calling greenlet until the connection ends and
    returns its close code.
    """

    __slots__ = ("_rfile", "_max_message_bytes", "_on_message", "_close_sent", "_close_timer")

    def __init__(self, sock: socket.socket, rfile, *, limits: OutboxLimits, max_message_bytes: int,
                 player_id: str = "", token: str = "", remote: str = "", wants_ids: bool = False,
                 on_message: Callable[[Connection, Message], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, flusher: Flusher = FLUSHER) -> None:
        super().__init__(sock, limits=limits, player_id=player_id, token=token, remote=remote, wants_ids=wants_ids,
                         clock=clock, flusher=flusher)
        self._rfile = rfile
        self._max_message_bytes = max_message_bytes
        self._on_message = on_message
        self._close_sent = False  # our close frame was written (or its echo of the client's)
        self._close_timer: Greenlet | None = None

    def ping(self) -> None:
        """Send a ping; the client's pong refreshes `last_heard`."""
        self.send(PING_FRAME)

    # --- closing --------------------------------------------------------------------
    def close(self, code: CloseCode, reason: str | None = None, *,
              handshake_timeout_s: float | None = CLOSE_HANDSHAKE_TIMEOUT_S) -> None:
        """Start the closing handshake after what is already queued; the connection ends
        when the client answers or after `handshake_timeout_s`. None: no timer of its
        own; the caller promises to `hang_up` if the client does not answer (a shutdown
        closing thousands of connections waits once for all of them)."""
        if not self._start_closing(code):
            return
        self._send_close(code, code.reason if reason is None else reason)
        if handshake_timeout_s is not None:
            self._close_timer = gevent.spawn_later(handshake_timeout_s, self._shutdown)

    def _farewell(self, code: CloseCode) -> bytes:
        if self._close_sent:
            return b""
        self._close_sent = True
        return close_frame(code, code.reason)

    def _send_close(self, code: int, reason: str) -> None:
        if not self._close_sent:
            self._close_sent = True
            self._outbox.write(close_frame(code, reason))

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
                    elif isinstance(event, Message) and self._on_message is not None and self.is_open:
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
        if self._start_closing(event.code):
            echo = CloseCode.NORMAL if event.code == CloseCode.NO_STATUS else event.code
            self._send_close(echo, "")
        self._outbox.finish(CLOSE_HANDSHAKE_TIMEOUT_S)
        return self.close_code

    def _fail(self, code: CloseCode) -> None:
        """Fail the connection: close frame, FIN, then discard input until the client
        hangs up, so that closing the socket does not reset our close frame away."""
        self._start_closing(code)
        self._send_close(code, code.reason)
        self._outbox.finish(CLOSE_HANDSHAKE_TIMEOUT_S)
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

    def _finish(self) -> None:
        self._start_closing(self.close_code)
        if self._close_timer is not None:
            self._close_timer.kill(block=False)
        self._discard_backlog()
