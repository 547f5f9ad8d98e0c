"""wsgateway.offline: the in-memory offline queue (FIFO, bounded, TTL, exact loss accounting)."""
from __future__ import annotations

from tests.support.fakes import FakeClock
from wsgateway.offline import Backlog, MemoryOfflineQueue


def queue(max_queued: int = 3, ttl_s: float = 10.0) -> tuple[MemoryOfflineQueue, FakeClock]:
    clock = FakeClock()
    return MemoryOfflineQueue(max_queued, ttl_s, clock=clock), clock


def test_fifo_order():
    """take() returns a player's frames in the order they were pushed."""
    offline, _ = queue()
    for frame in (b"1", b"2", b"3"):
        assert offline.push("p", frame) == 0
    assert offline.take("p") == Backlog(frames=[b"1", b"2", b"3"], expired=0)


def test_drop_oldest_when_full():
    """Pushing onto a full queue drops the oldest frame and reports one drop."""
    offline, _ = queue(max_queued=2)
    offline.push("p", b"1")
    offline.push("p", b"2")
    assert offline.push("p", b"3") == 1
    assert offline.push("p", b"4") == 1
    assert offline.take("p").frames == [b"3", b"4"]


def test_players_are_independent():
    """Each player has its own queue and bound."""
    offline, _ = queue(max_queued=1)
    offline.push("a", b"a1")
    assert offline.push("b", b"b1") == 0
    assert offline.take("a").frames == [b"a1"]
    assert offline.take("b").frames == [b"b1"]


def test_take_empties_queue():
    """After take() the player's queue is empty."""
    offline, _ = queue()
    offline.push("p", b"1")
    offline.take("p")
    assert offline.take("p") == Backlog()
    assert len(offline) == 0


def test_take_unknown_player():
    """take() for a player with nothing queued returns an empty backlog."""
    offline, _ = queue()
    assert offline.take("nobody") == Backlog(frames=[], expired=0)


def test_expired_frames_counted_on_take():
    """Frames older than the TTL are left out of take() and counted as expired."""
    offline, clock = queue(ttl_s=10.0)
    offline.push("p", b"old")
    clock.now += 6
    offline.push("p", b"new")
    clock.now += 5  # "old" is 11 s old, "new" 5 s
    assert offline.take("p") == Backlog(frames=[b"new"], expired=1, missed_expired=1)
    assert len(offline) == 0


def test_frame_expires_exactly_at_ttl():
    """A frame is expired once exactly the TTL has passed, and alive just before."""
    offline, clock = queue(ttl_s=10.0)
    offline.push("p", b"x")
    clock.now += 9.999
    assert offline.take("p").frames == [b"x"]
    offline.push("p", b"y")
    clock.now += 10.0
    assert offline.take("p") == Backlog(frames=[], expired=1, missed_expired=1)


def test_purge_expired():
    """purge_expired() forgets expired frames of every player, keeps fresh ones and returns the count."""
    offline, clock = queue(ttl_s=10.0)
    offline.push("a", b"a-old")
    offline.push("b", b"b-old")
    clock.now += 6
    offline.push("a", b"a-new")
    clock.now += 5
    assert offline.purge_expired() == 2
    assert len(offline) == 1
    assert offline.take("a") == Backlog(frames=[b"a-new"], expired=0, missed_expired=1)
    assert offline.take("b") == Backlog(missed_expired=1)


def test_purge_with_nothing_expired():
    """purge_expired() before any TTL ran out removes nothing."""
    offline, _ = queue()
    offline.push("p", b"x")
    assert offline.purge_expired() == 0
    assert len(offline) == 1


def test_len_counts_every_player():
    """len() is the number of frames queued for all players, net of drops, takes and purges."""
    offline, clock = queue(max_queued=2, ttl_s=10.0)
    offline.push("a", b"1")
    offline.push("a", b"2")
    offline.push("a", b"3")  # drops "1"
    offline.push("b", b"1")
    assert len(offline) == 3
    offline.take("b")
    assert len(offline) == 2
    clock.now += 10
    offline.purge_expired()
    assert len(offline) == 0


def test_enabled():
    """The queue is enabled only when both the bound and the TTL are above zero."""
    assert MemoryOfflineQueue(100, 10.0).enabled
    assert not MemoryOfflineQueue(0, 10.0).enabled
    assert not MemoryOfflineQueue(100, 0.0).enabled
