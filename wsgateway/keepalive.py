"""Pings, and the reaping of connections that stopped answering.

One loop serves every connection (a timer per socket would cost a greenlet each). Pings
and reaping both go by the clock that `tick(now)` is given (the one `last_heard` is read
on), never by counting ticks, so ticks that come late (an overloaded worker) delay the
checks but never make a connection that answers look silent:

* The ping period is cut into slices of `interval_s` each, and each connection belongs to
  one slice (by its identity hash). A tick pings the connections of every slice whose
  time came since the previous tick: one slice when ticks are on time, several when one
  is late, all after a stall of a whole period. So every connection is pinged once per
  `ping_period_s` of clock time, and the pings, and the pongs that answer them, are spread
  over the period instead of arriving in one burst (a burst of 10,000 pongs stalls
  publishing for that moment).
* A connection is closed with 4001 when it has sent nothing at all (a pong or anything
  else) for more than `pong_wait_s` *and* a ping it was sent is unanswered and at least
  `pong_wait_s - ping_period_s` old. With ticks on time the second condition holds
  whenever the first does (the last ping is then at most a period old), so a half-open
  socket or a vanished client is released within `pong_wait_s` of its last bytes plus
  one tick, as echoCTF's ws-server does. With ticks late, a ping that went out late still
  gets that long to be answered: one that answers every ping it is sent is never reaped,
  however late the ticks run.
"""
from __future__ import annotations

import math
from typing import Callable, Container, Iterable, Protocol

from wsgateway.errors import CloseCode

CHECK_INTERVAL_S = 1.0  # how often unanswered pings are checked (and a slice pinged), at most


class Pingable(Protocol):
    last_heard: float  # time.monotonic() of the last bytes received

    def ping(self) -> None: ...

    def abort(self, code: CloseCode) -> None: ...


class KeepAlive:
    """Decides, at each `tick(now)`, which connections to ping and which to reap.

    `now` must come from the clock `last_heard` is read on (`time.monotonic()`) and never
    go back; ticks are meant to come every `interval_s`, but may come at any time."""

    def __init__(self, connections: Callable[[], Iterable[Pingable]], ping_period_s: float,
                 pong_wait_s: float) -> None:
        self._connections = connections
        self.ping_period_s = ping_period_s
        self.pong_wait_s = pong_wait_s
        self._slices = max(1, math.ceil(ping_period_s / CHECK_INTERVAL_S))  # slices in one ping period
        self.interval_s = ping_period_s / self._slices  # one slice: at most CHECK_INTERVAL_S
        self._last_slot: int | None = None  # the slot (slice-long span of clock time) of the previous tick
        self._unanswered: dict[Pingable, float] = {}  # connection -> clock time of its oldest unanswered ping
        self._answer_grace_s = pong_wait_s - ping_period_s  # the least time a ping gets (config: pong wait > period)

    def tick(self, now: float) -> int:
        """Reap the connections silent for `pong_wait_s` with a ping unanswered, ping the
        slices that came due since the previous tick; return how many were reaped."""
        due = self._due_slices(now)
        unanswered: dict[Pingable, float] = {}  # rebuilt each tick: connections gone drop out
        reaped = 0
        for connection in self._connections():
            pinged_at = self._unanswered.get(connection)
            if pinged_at is not None and connection.last_heard < pinged_at:
                if now - connection.last_heard > self.pong_wait_s and now - pinged_at >= self._answer_grace_s:
                    connection.abort(CloseCode.PONG_TIMEOUT)
                    reaped += 1
                    continue
            else:
                pinged_at = None  # answered (or never pinged)
            if hash(connection) % self._slices in due:
                connection.ping()
                if pinged_at is None:
                    pinged_at = now
            if pinged_at is not None:
                unanswered[connection] = pinged_at
        self._unanswered = unanswered
        return reaped

    def _due_slices(self, now: float) -> Container[int]:
        """The slices whose time came after the previous tick, up to `now`."""
        slot = math.floor(now / self.interval_s)
        previous, self._last_slot = self._last_slot, slot
        if previous is None:
            return {slot % self._slices}
        if slot - previous >= self._slices:
            return range(self._slices)
        return {past % self._slices for past in range(previous + 1, slot + 1)}
