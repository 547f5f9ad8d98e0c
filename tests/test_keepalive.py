"""wsgateway.keepalive: one loop pings every connection and reaps the silent ones."""
from __future__ import annotations

from tests.helpers import FakeClock, FakeConnection
from wsgateway.errors import CloseCode
from wsgateway.keepalive import KeepAlive

PING_PERIOD_S = 30.0
PONG_WAIT_S = 60.0


def keepalive(connections: list[FakeConnection], clock: FakeClock) -> KeepAlive:
    return KeepAlive(lambda: list(connections), PING_PERIOD_S, PONG_WAIT_S, clock=clock)


def test_no_ping_before_period():
    """Ticks before a ping period has passed send no ping."""
    clock = FakeClock()
    connections = [FakeConnection("p", last_heard=clock.now)]
    loop = keepalive(connections, clock)
    assert loop.tick(clock.now + PING_PERIOD_S - 0.1) == 0
    assert connections[0].pings == 0


def test_pings_all_when_due():
    """When the period is up, every live connection is pinged once; the next ping a period later."""
    clock = FakeClock()
    connections = [FakeConnection("p", last_heard=clock.now), FakeConnection("q", last_heard=clock.now)]
    loop = keepalive(connections, clock)
    due = clock.now + PING_PERIOD_S
    loop.tick(due)
    assert [connection.pings for connection in connections] == [1, 1]
    loop.tick(due + 1)
    assert [connection.pings for connection in connections] == [1, 1]
    loop.tick(due + PING_PERIOD_S)
    assert [connection.pings for connection in connections] == [2, 2]


def test_reaps_silent_connections():
    """A connection silent longer than pong_wait is aborted with 4001; others are untouched."""
    clock = FakeClock()
    now = clock.now + 100
    silent = FakeConnection("p", last_heard=now - PONG_WAIT_S - 0.1)
    lively = FakeConnection("q", last_heard=now - 1)
    loop = keepalive([silent, lively], clock)
    assert loop.tick(now) == 1
    assert silent.aborted_with == CloseCode.PONG_TIMEOUT
    assert lively.aborted_with is None


def test_not_reaped_at_exactly_pong_wait():
    """A connection silent for exactly pong_wait is not reaped yet."""
    clock = FakeClock()
    now = clock.now + 10
    connection = FakeConnection("p", last_heard=now - PONG_WAIT_S)
    assert keepalive([connection], clock).tick(now) == 0
    assert connection.aborted_with is None


def test_reaped_connection_not_pinged():
    """A reaped connection gets no ping, even when a ping is due."""
    clock = FakeClock()
    due = clock.now + PING_PERIOD_S
    silent = FakeConnection("p", last_heard=due - PONG_WAIT_S - 1)
    keepalive([silent], clock).tick(due)
    assert (silent.aborted_with, silent.pings) == (CloseCode.PONG_TIMEOUT, 0)


def test_check_interval():
    """Silence is checked at most every second, and at least once per ping period."""
    clock = FakeClock()
    assert keepalive([], clock).interval_s == 1.0
    assert KeepAlive(lambda: [], 0.25, 1.0, clock=clock).interval_s == 0.25
