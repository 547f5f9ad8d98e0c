"""One Server-Sent Events stream (`GET /events`): a player connection like a WebSocket,
framed as text/event-stream (`wsgateway.event_stream`).

Everything but the framing is `connection.PlayerConnection`'s: the same outbox and its
bounds (a slow reader is closed as too slow, 4000), the same holding of live messages
behind the backlog, the same states. What differs:

* `send` and `send_later` take the message's WebSocket frame, as every connection does
  (the history's `Stamped` one, with its id, whenever the gateway keeps one: a stream
  always `wants_ids` then), and write its event (encoded once per message for every
  stream, `EventEncoder`), with an `id:` line when the frame has an id;
* the response head and the `retry:` hint leave with the backlog, in one write, when
  delivery releases the stream: until then nothing is written, so a broker that fails
  while the stream is set up is still answered 503;
* a ping is a comment line. The client answers nothing, ever: its pong is TCP's
  acknowledgement. The socket's TCP_USER_TIMEOUT is `-pong-wait`, so the kernel fails a
  stream whose bytes (the keepalive among them) stay unacknowledged that long, and the
  reader ends with 1006; keep-alive's silence rule never applies (`last_heard` is
  refreshed by each ping);
* closing (revalidation 1008, an operator's disconnect 4002, shutdown 1001) sends a last
  event, `gateway.close` with the code and reason, after what is queued, then ends the
  response (FIN) once the outbox has drained, within the close timeout. There is no
  handshake to wait for;
* the client ends a stream by closing its connection (recorded as 1000; a reset as
  1006). Anything it sends on the stream is read and dropped.
"""
from __future__ import annotations

import socket
import time
from typing import Callable

import gevent
from gevent import Greenlet

from wsgateway.connection import CLOSE_HANDSHAKE_TIMEOUT_S, READ_CHUNK_BYTES, ConnectionState, PlayerConnection
from wsgateway.errors import CloseCode
from wsgateway.event_stream import ENCODER, KEEPALIVE, EventEncoder, close_event
from wsgateway.history import StreamPoint
from wsgateway.outbox import FLUSHER, Flusher, OutboxLimits, OutboxState


class EventStreamConnection(PlayerConnection):
    """A player's event stream over the socket of its `GET /events` request.

    `preamble` is the response head and the retry hint: written first, with the backlog
    (`release`), or alone if the stream is closed before that. `serve()` reads until the
    stream ends and returns its close code."""

    __slots__ = ("_preamble", "_encoder", "_closer")

    def __init__(self, sock: socket.socket, preamble: bytes, *, limits: OutboxLimits, player_id: str = "",
                 token: str = "", remote: str = "", wants_ids: bool = False,
                 clock: Callable[[], float] = time.monotonic, flusher: Flusher = FLUSHER,
                 encoder: EventEncoder = ENCODER) -> None:
        super().__init__(sock, limits=limits, player_id=player_id, token=token, remote=remote, wants_ids=wants_ids,
                         clock=clock, flusher=flusher)
        self._preamble = preamble
        self._encoder = encoder
        self._closer: Greenlet | None = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(limits.write_timeout_s * 1000)))
        except OSError:  # not TCP (a test's socket pair)
            pass

    # --- sending -------------------------------------------------------------------
    def send(self, frame: bytes) -> bool:
        if self._held is None and self.state is ConnectionState.OPEN:
            if self._replayed_through is not None and self._replayed_through.covers(frame):
                return True  # had already (see PlayerConnection.release)
            return self._outbox.write(self._encoder.event(frame))
        return super().send(frame)  # held back as the frame (encoded when released), or refused

    def send_later(self, frame: bytes) -> bool:
        """As `PlayerConnection.send_later`, written out here: once per stream of every
        broadcast, where a call more costs a tenth of the delivery."""
        if self._held is None and self.state is ConnectionState.OPEN:
            if self._replayed_through is not None and self._replayed_through.covers(frame):
                return True  # had already (see PlayerConnection.release)
            return self._outbox.write_later(self._encoder.event(frame))
        return super().send_later(frame)

    def release(self, first: list[bytes], replayed: frozenset[str] = frozenset(),
                through: StreamPoint | None = None) -> int:
        """The preamble (the first time), then the backlog or replay, then what was held
        (less what the replay carried)."""
        self._write_preamble()
        return super().release(first, replayed, through)

    def _write_preamble(self) -> None:
        if self._preamble:
            preamble, self._preamble = self._preamble, b""
            self._outbox.write(preamble)

    def ping(self) -> None:
        """A comment line; keep-alive's silence rule is TCP's here (see the module docstring)."""
        self.last_heard = self._clock()
        if self.is_open and self._held is None:
            self._outbox.write(KEEPALIVE)

    # --- ending ---------------------------------------------------------------------
    def close(self, code: CloseCode, reason: str | None = None, *,
              handshake_timeout_s: float | None = CLOSE_HANDSHAKE_TIMEOUT_S) -> None:
        """Send `gateway.close` after what is queued, then end the response once the
        outbox drained, waiting at most `handshake_timeout_s` (None: the close timeout;
        a stream has no handshake for a caller to wait on). `reason` is the catalogue's."""
        if not self._start_closing(code):
            return
        self._write_preamble()
        self._outbox.write(close_event(code))
        if self._outbox.state is OutboxState.EMPTY:
            self._shutdown()  # the kernel has it all: the FIN follows it
        elif self._closer is None:
            timeout_s = CLOSE_HANDSHAKE_TIMEOUT_S if handshake_timeout_s is None else handshake_timeout_s
            self._closer = gevent.spawn(self._drain_then_end, timeout_s)

    def _drain_then_end(self, timeout_s: float) -> None:
        self._outbox.finish(timeout_s)
        self._shutdown()  # FIN after what was written; the reader then ends

    def _farewell(self, code: CloseCode) -> bytes:
        return b"" if self._preamble else close_event(code)

    # --- reading --------------------------------------------------------------------
    def serve(self) -> int:
        """Read (and drop) until the stream ends; return the code it ended with."""
        try:
            while self._socket.recv(READ_CHUNK_BYTES):
                pass  # a stream's client has nothing to say
            self._start_closing(CloseCode.NORMAL)  # the client hung up (no-op when we closed)
        except OSError:
            pass  # a reset, or TCP_USER_TIMEOUT: 1006 unless we were closing
        finally:
            self._start_closing(self.close_code)
            if self._closer is not None:
                self._closer.kill(block=False)
            self._discard_backlog()
        return self.close_code
