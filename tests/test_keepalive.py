"""wsgateway.keepalive: one loop pings every connection once a period, spread, and reaps the silent."""
from __future__ import annotations

from tests.support.fakes import FakeConnection
from wsgateway.errors import CloseCode
from wsgateway.keepalive import KeepAlive

PING_PERIOD_S = 30.0
PONG_WAIT_S = 60.0


def keepalive(connections: list[FakeConnection]) -> KeepAlive:
    return KeepAlive(lambda: list(connections), PING_PERIOD_S, PONG_WAIT_S)


def test_each_connection_is_pinged_once_per_period():
    """Over one ping period's ticks every live connection gets exactly one ping; the next period, one more."""
    connections = [FakeConnection(f"p{index}", last_heard=0.0) for index in range(100)]
    loop = keepalive(connections)
    for second in range(30):
        loop.tick(float(second))
    assert all(connection.pings == 1 for connection in connections)
    for second in range(30, 60):
        loop.tick(float(second))
    assert all(connection.pings == 2 for connection in connections)


def test_pings_are_spread_over_the_period():
    """No tick pings a large share of the connections: the pongs do not come back in one burst."""
    connections = [FakeConnection(f"p{index}", last_heard=0.0) for index in range(3000)]
    loop = keepalive(connections)
    per_tick = []
    for second in range(30):
        before = sum(connection.pings for connection in connections)
        loop.tick(float(second))
        per_tick.append(sum(connection.pings for connection in connections) - before)
    assert sum(per_tick) == 3000
    assert max(per_tick) <= 3 * 3000 / 30


def test_reaps_silent_connections():
    """A connection silent longer than pong_wait is aborted with 4001; others are untouched."""
    now = 100.0
    silent = FakeConnection("p", last_heard=now - PONG_WAIT_S - 0.1)
    lively = FakeConnection("q", last_heard=now - 1)
    assert keepalive([silent, lively]).tick(now) == 1
    assert silent.aborted_with == CloseCode.PONG_TIMEOUT
    assert lively.aborted_with is None


def test_not_reaped_at_exactly_pong_wait():
    """A connection silent for exactly pong_wait is not reaped yet."""
    connection = FakeConnection("p", last_heard=10.0 - PONG_WAIT_S)
    assert keepalive([connection]).tick(10.0) == 0
    assert connection.aborted_with is None


def test_reaped_connection_is_not_pinged():
    """A reaped connection gets no ping, whichever tick it falls on."""
    silent = FakeConnection("p", last_heard=-PONG_WAIT_S - 1)
    loop = keepalive([silent])
    for second in range(30):
        loop.tick(float(second))
    assert (silent.aborted_with, silent.pings) == (CloseCode.PONG_TIMEOUT, 0)


def test_check_interval():
    """Silence is checked at most every second, and at least once per ping period."""
    assert keepalive([]).interval_s == 1.0
    assert KeepAlive(lambda: [], 0.25, 1.0).interval_s == 0.25
