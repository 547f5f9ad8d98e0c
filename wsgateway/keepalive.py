"""Pings, and the reaping of connections that stopped answering.

One loop serves every connection (a timer per socket would cost a greenlet each). Each
tick it closes with 4001 any connection that has sent nothing, not even a pong, for
`pong_wait_s`, and pings one slice of the connections: each connection belongs to one of
the ping period's ticks (by its identity hash), so every connection is pinged once per
`ping_period_s` and the pings, and the pongs that answer them, are spread over the period
instead of arriving in one burst (a burst of 10,000 pongs stalls publishing for that
moment). Half-open sockets and vanished clients are released within `pong_wait_s` plus
one tick.
"""
from __future__ import annotations

from typing import Callable, Iterable, Protocol

from wsgateway.errors import CloseCode

CHECK_INTERVAL_S = 1.0  # how often silence is checked (and a slice pinged), at most


class Pingable(Protocol):
    last_heard: float  # time.monotonic() of the last bytes received

    def ping(self) -> None: ...

    def abort(self, code: CloseCode) -> None: ...


class KeepAlive:
    """Decides, at each `tick(now)`, which connections to ping and which to reap."""

    def __init__(self, connections: Callable[[], Iterable[Pingable]], ping_period_s: float,
                 pong_wait_s: float) -> None:
        self._connections = connections
        self.ping_period_s = ping_period_s
        self.pong_wait_s = pong_wait_s
        self.interval_s = min(CHECK_INTERVAL_S, ping_period_s)
        self._slots = max(1, round(ping_period_s / self.interval_s))  # ticks in one ping period
        self._ticks = 0

    def tick(self, now: float) -> int:
        """Reap the silent, ping this tick's slice of the rest; return how many were reaped."""
        slot = self._ticks % self._slots
        self._ticks += 1
        reaped = 0
        for connection in self._connections():
            if now - connection.last_heard > self.pong_wait_s:
                connection.abort(CloseCode.PONG_TIMEOUT)
                reaped += 1
            elif hash(connection) % self._slots == slot:
                connection.ping()
        return reaped
