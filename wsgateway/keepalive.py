"""Pings, and the reaping of connections that stopped answering.

One loop serves every connection (a timer per socket would cost a greenlet each): it
pings all of them every `ping_period_s` and closes with 4001 any that has sent nothing,
not even a pong, for `pong_wait_s`. Half-open sockets and vanished clients are thus
released within `pong_wait_s` plus one check interval.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Protocol

from wsgateway.errors import CloseCode

CHECK_INTERVAL_S = 1.0  # how often silence is checked, at most


class Pingable(Protocol):
    last_heard: float  # time.monotonic() of the last bytes received

    def ping(self) -> None: ...

    def abort(self, code: CloseCode) -> None: ...


class KeepAlive:
    """Decides, at each `tick(now)`, which connections to ping and which to reap."""

    def __init__(self, connections: Callable[[], Iterable[Pingable]], ping_period_s: float,
                 pong_wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._connections = connections
        self.ping_period_s = ping_period_s
        self.pong_wait_s = pong_wait_s
        self._next_ping_at = clock() + ping_period_s

    @property
    def interval_s(self) -> float:
        return min(CHECK_INTERVAL_S, self.ping_period_s)

    def tick(self, now: float) -> int:
        """Reap the silent, ping the rest when a ping is due; return how many were reaped."""
        ping_due = now >= self._next_ping_at
        if ping_due:
            self._next_ping_at = now + self.ping_period_s
        reaped = 0
        for connection in self._connections():
            if now - connection.last_heard > self.pong_wait_s:
                connection.abort(CloseCode.PONG_TIMEOUT)
                reaped += 1
            elif ping_due:
                connection.ping()
        return reaped
