"""wsgateway.offline: the in-memory offline queue (FIFO, bounded, TTL, exact loss accounting)."""
from __future__ import annotations

from tests.support.fakes import FakeClock
from wsgateway.offline import MESSAGE_OVERHEAD_BYTES, Backlog, MemoryOfflineQueue, Pushed


def queue(max_queued: int = 3, ttl_s: float = 10.0) -> tuple[MemoryOfflineQueue, FakeClock]:
    clock = FakeClock()
    return MemoryOfflineQueue(max_queued, ttl_s, clock=clock), clock


def test_fifo_order():
    """take() returns a player's frames in the order they were pushed."""
    offline, _ = queue()
    for frame in (b"1", b"2", b"3"):
        assert offline.push("p", frame) == Pushed()
    assert offline.take("p") == Backlog(frames=[b"1", b"2", b"3"], expired=0)


def test_drop_oldest_when_full():
    """Pushing onto a full queue drops the oldest frame and reports one drop."""
    offline, _ = queue(max_queued=2)
    offline.push("p", b"1")
    offline.push("p", b"2")
    assert offline.push("p", b"3") == Pushed(over_player_bound=1)
    assert offline.push("p", b"4") == Pushed(over_player_bound=1)
    assert offline.take("p").frames == [b"3", b"4"]


def test_players_are_independent():
    """Each player has its own queue and bound."""
    offline, _ = queue(max_queued=1)
    offline.push("a", b"a1")
    assert offline.push("b", b"b1") == Pushed()
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


def bounded(max_total_bytes: int = 0, max_players: int = 0, max_queued: int = 100) -> MemoryOfflineQueue:
    return MemoryOfflineQueue(max_queued, 10.0, clock=FakeClock(), max_total_bytes=max_total_bytes,
                              max_players=max_players)


def frame_of(size: int, tag: int) -> bytes:
    """A frame whose accounted size is exactly `size` bytes, told apart by `tag`."""
    return str(tag).encode().rjust(size - MESSAGE_OVERHEAD_BYTES, b"x")


def test_all_queues_together_stay_within_their_bytes_and_the_oldest_go_first():
    """Past -max-offline-bytes the oldest frame of any player is given up first, and counted."""
    offline = bounded(max_total_bytes=3000)
    assert offline.push("a", frame_of(1000, 1)) == Pushed()
    assert offline.push("b", frame_of(1000, 2)) == Pushed()
    assert offline.push("a", frame_of(1000, 3)) == Pushed()
    assert offline.push("c", frame_of(1000, 4)) == Pushed(over_total_bytes=1)  # a's first frame goes
    assert offline.held_bytes == 3000 and len(offline) == 3
    assert offline.push("c", frame_of(2000, 5)) == Pushed(over_total_bytes=2)  # b's, then a's second
    assert offline.held_bytes == 3000
    assert offline.take("a") == Backlog(missed_dropped=2)
    assert offline.take("b") == Backlog(missed_dropped=1)
    assert offline.take("c").frames == [frame_of(1000, 4), frame_of(2000, 5)]
    assert offline.held_bytes == 0 and len(offline) == 0


def test_a_frame_larger_than_every_queue_together_is_not_queued():
    """A frame past -max-offline-bytes on its own is given up (counted) without pushing anything out."""
    offline = bounded(max_total_bytes=3000)
    offline.push("a", frame_of(1000, 1))
    assert offline.push("b", frame_of(3001, 2)) == Pushed(queued=False, over_total_bytes=1)
    assert offline.take("a").frames == [frame_of(1000, 1)]
    assert offline.take("b") == Backlog(missed_dropped=1)


def test_past_the_queue_bound_the_oldest_whole_queue_goes():
    """Past -max-offline-players the queue holding the oldest frame is given up whole, and counted."""
    offline = bounded(max_players=2)
    offline.push("a", b"a1")
    offline.push("b", b"b1")
    offline.push("a", b"a2")
    assert offline.push("b", b"b2") == Pushed()  # b already has a queue
    assert offline.push("c", b"c1") == Pushed(over_total_players=2)  # a's two frames
    assert offline.take("a") == Backlog(missed_dropped=2)
    assert offline.take("b").frames == [b"b1", b"b2"]
    assert offline.take("c").frames == [b"c1"]


def test_frames_that_left_by_other_ways_are_not_given_up_twice():
    """Taken, expired and per-player drops leave no trace that a later eviction would count."""
    clock = FakeClock()
    offline = MemoryOfflineQueue(1, 10.0, clock=clock, max_total_bytes=2 * (MESSAGE_OVERHEAD_BYTES + 2))
    offline.push("a", b"a1")
    offline.push("a", b"a2")  # a1 dropped: a's own bound
    offline.push("b", b"b1")
    offline.take("b")
    clock.now += 10
    assert offline.purge_expired() == 1  # a2
    offline.push("c", b"c1")
    offline.push("d", b"d1")
    assert offline.push("e", b"e1") == Pushed(over_total_bytes=1)  # c1, not a stale entry
    assert offline.take("c") == Backlog(missed_dropped=1)
    assert [offline.take(player).frames for player in "de"] == [[b"d1"], [b"e1"]]


def test_many_players_come_and_go_without_the_bookkeeping_growing():
    """The push-order index is compacted: players that took their frames leave nothing behind."""
    offline = bounded(max_total_bytes=1 << 20, max_players=100)
    for round_ in range(50):
        for player in range(100):
            offline.push(f"p{player}", b"x")
        for player in range(100):
            assert offline.take(f"p{player}").frames == [b"x"]
    assert len(offline) == 0 and offline.held_bytes == 0
    assert len(offline._arrivals) <= 2048


def test_600_large_publishes_to_distinct_players_stay_within_the_bound():
    """The issue's case: 600 frames of 0.9 MiB to distinct players hold at most the default 64 MiB, the newest kept."""
    cap = 64 << 20
    offline = MemoryOfflineQueue(100, 10.0, clock=FakeClock(), max_total_bytes=cap, max_players=10_000)
    frame = b"x" * ((9 << 20) // 10)
    given_up = 0
    for player in range(600):
        pushed = offline.push(str(player), frame)
        given_up += pushed.over_total_bytes
        assert offline.held_bytes <= cap
    kept = len(offline)
    assert kept == cap // (len(frame) + MESSAGE_OVERHEAD_BYTES) and given_up == 600 - kept
    assert all(offline.take(str(player)).frames == [frame] for player in range(600 - kept, 600))
    assert offline.take(str(599 - kept)) == Backlog(missed_dropped=1)
