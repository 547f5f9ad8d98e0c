"""wsgateway.keepalive: one loop pings every connection once a period by the clock, spread, and
reaps those that leave a ping unanswered for pong_wait, however late its ticks come."""
from __future__ import annotations

import itertools

import pytest

from tests.support.fakes import FakeClock, FakeConnection
from wsgateway.errors import CloseCode
from wsgateway.keepalive import KeepAlive

PING_PERIOD_S = 30.0
PONG_WAIT_S = 60.0


def keepalive(connections: list[FakeConnection]) -> KeepAlive:
    return KeepAlive(lambda: list(connections), PING_PERIOD_S, PONG_WAIT_S)


def run(loop: KeepAlive, clock: FakeClock, gaps_s: list[float], until_s: float) -> int:
    """Tick `loop` at `clock`'s time, then after each of `gaps_s` in turn (cycling), up to
    `until_s`; return how many it reaped."""
    reaped = loop.tick(clock.now)
    for gap_s in itertools.cycle(gaps_s):
        if clock.now + gap_s > until_s:
            return reaped
        clock.now += gap_s
        reaped += loop.tick(clock.now)
    raise AssertionError("unreachable")


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


@pytest.mark.parametrize(("gaps_s", "fewest_pings"), [([2.5], 19), ([1.0, 4.0, 0.3, 7.0, 2.0], 19),
                                                   ([1.0] * 10 + [95.0], 5)],
                         ids=["every 2.5 s", "irregular", "stalls of 95 s"])
def test_connections_that_answer_are_never_reaped_however_late_the_ticks(gaps_s, fewest_pings):
    """Late ticks delay pings but never make a connection that answers every ping look silent (the bug
    where 300 such connections ticked every 2.5 s were all closed with 4001: pinged every 75 s, reaped at 60)."""
    clock = FakeClock(0.0)
    connections = [FakeConnection(f"p{index}", last_heard=0.0, answers_on=clock) for index in range(300)]
    assert run(keepalive(connections), clock, gaps_s, until_s=600.0) == 0
    assert all(connection.aborted_with is None for connection in connections)
    # Pinged once per period of clock time (20 periods here), once per tick that follows a stall.
    assert all(fewest_pings <= connection.pings <= 20 for connection in connections)


def test_late_ticks_ping_every_slice_that_came_due_once():
    """A late tick pings the slices whose time came since the previous one: spread stays, nobody is skipped or pinged twice."""
    connections = [FakeConnection(f"p{index}", last_heard=0.0) for index in range(3000)]
    loop = keepalive(connections)
    per_tick = []
    for now in [2.5 * index for index in range(12)] + [29.9]:
        before = sum(connection.pings for connection in connections)
        loop.tick(now)
        per_tick.append(sum(connection.pings for connection in connections) - before)
    assert all(connection.pings == 1 for connection in connections)
    assert max(per_tick) <= 3 * 3000 * 2.5 / 30


def test_a_stall_longer_than_a_period_pings_each_connection_once():
    """After a stall of several periods every connection is due, and gets one ping, not one per missed period."""
    connections = [FakeConnection(f"p{index}", last_heard=0.0) for index in range(100)]
    loop = keepalive(connections)
    loop.tick(0.0)
    before = [connection.pings for connection in connections]
    loop.tick(100.0)
    assert [connection.pings - pings for connection, pings in zip(connections, before)] == [1] * 100


@pytest.mark.parametrize("gap_s", [1.0, 2.5])
def test_a_connection_that_falls_silent_is_reaped_within_pong_wait_of_its_last_bytes(gap_s):
    """One that stops answering is closed with 4001 once silent for more than pong_wait, and no later than
    pong_wait (+ the ticks' lateness) after its last bytes, as echoCTF's ws-server does."""
    clock = FakeClock(0.0)
    connections = [FakeConnection(f"p{index}", answers_on=clock) for index in range(100)]
    loop = keepalive(connections)
    run(loop, clock, [gap_s], until_s=100.0)
    for connection in connections:
        connection.answers_on = None
    reaped_at: dict[str, float] = {}
    while len(reaped_at) < len(connections) and clock.now < 1000.0:
        clock.now += gap_s
        loop.tick(clock.now)
        for connection in connections:
            if connection.aborted_with is not None:
                reaped_at.setdefault(connection.player_id, clock.now)
    assert all(connection.aborted_with == CloseCode.PONG_TIMEOUT for connection in connections)
    for connection in connections:
        assert connection.last_heard + PONG_WAIT_S < reaped_at[connection.player_id]
        assert reaped_at[connection.player_id] <= connection.last_heard + PONG_WAIT_S + 2 * gap_s


def test_not_reaped_at_exactly_pong_wait_of_silence():
    """A pinged connection silent for exactly pong_wait is not reaped yet; a moment later it is, with 4001."""
    connection = FakeConnection("p", last_heard=0.0)
    loop = keepalive([connection])
    second = 0
    while connection.pings == 0:
        loop.tick(float(second))
        second += 1
    assert loop.tick(PONG_WAIT_S) == 0
    assert connection.aborted_with is None
    assert loop.tick(PONG_WAIT_S + 0.5) == 1
    assert connection.aborted_with == CloseCode.PONG_TIMEOUT


def test_a_ping_sent_late_gets_pong_wait_less_ping_period_to_be_answered():
    """After a stall, a connection long silent is pinged, not reaped: its ping has
    pong_wait - ping_period to be answered (a late tick must not close everyone)."""
    connection = FakeConnection("p", last_heard=0.0)
    loop = keepalive([connection])
    loop.tick(0.0)
    loop.tick(3 * PONG_WAIT_S)  # a stall: every slice due, the connection pinged now
    assert connection.pings >= 1 and connection.aborted_with is None
    assert loop.tick(3 * PONG_WAIT_S + (PONG_WAIT_S - PING_PERIOD_S) - 0.5) == 0
    assert loop.tick(3 * PONG_WAIT_S + (PONG_WAIT_S - PING_PERIOD_S)) == 1


def test_a_connection_never_pinged_is_not_reaped():
    """Long silence alone does not reap: only a ping left unanswered does (a tick after a stall must not close everyone)."""
    connection = FakeConnection("p", last_heard=0.0)
    assert keepalive([connection]).tick(10 * PONG_WAIT_S) == 0
    assert connection.aborted_with is None


def test_any_bytes_answer_a_ping():
    """A connection heard from after the ping (a pong or any other frame) is not reaped: its silence counts from then."""
    clock = FakeClock(0.0)
    connection = FakeConnection("p", last_heard=0.0)
    loop = keepalive([connection])
    while connection.pings == 0:
        loop.tick(clock.now)
        clock.now += 1.0
    connection.last_heard = clock.now  # a message, not a pong
    heard_at = clock.now
    run(loop, clock, [1.0], until_s=heard_at + PONG_WAIT_S - 1.0)
    assert connection.aborted_with is None
    run(loop, clock, [1.0], until_s=heard_at + PONG_WAIT_S + 2.0)
    assert connection.aborted_with == CloseCode.PONG_TIMEOUT


def test_reaped_connection_is_not_pinged():
    """The tick that reaps a connection does not ping it, even when its slice is due."""
    connection = FakeConnection("p", last_heard=0.0)
    loop = keepalive([connection])
    loop.tick(0.0)
    loop.tick(PING_PERIOD_S)  # every slice due since the previous tick: pinged now
    assert connection.pings == 1
    assert loop.tick(PING_PERIOD_S + 3 * PING_PERIOD_S) == 1  # every slice due again
    assert (connection.aborted_with, connection.pings) == (CloseCode.PONG_TIMEOUT, 1)


def test_check_interval():
    """Silence is checked at most every second, and at least once per ping period, in slices that make up the period."""
    assert keepalive([]).interval_s == 1.0
    assert KeepAlive(lambda: [], 0.25, 1.0).interval_s == 0.25
    assert KeepAlive(lambda: [], 2.5, 5.0).interval_s == pytest.approx(2.5 / 3)
