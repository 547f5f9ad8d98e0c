"""wsgateway.roster_redis against the real Redis: limits, routing and hand-off across gateways,
on a single Redis and (where the test takes `redis_url`) on a Redis Cluster too."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import gevent
import pytest

from tests.support import TIMEOUT_S, wait_for
from tests.support.redis_server import REDIS_URL
from wsgateway.errors import BrokerUnavailable
from wsgateway.offline import MESSAGE_OVERHEAD_BYTES
from wsgateway.redis_link import RedisKeys, create_client, is_cluster_url, new_gateway_id
from wsgateway.roster_redis import RedisRoster, gateway_of


def make_roster(url: str, prefix: str, *, max_conns: int = 3, max_queued: int = 5, offline_ttl_s: float = 60.0,
                presence_ttl_s: float = 15.0, max_offline_bytes: int = 0, max_offline_players: int = 0) -> RedisRoster:
    """One gateway's roster on `url` in the cluster named by `prefix` (sweeping as often as asked)."""
    return RedisRoster(create_client(url, TIMEOUT_S), RedisKeys(prefix, cluster=is_cluster_url(url)), new_gateway_id(),
                       max_conns_per_player=max_conns, max_queued=max_queued, offline_ttl_s=offline_ttl_s,
                       presence_ttl_s=presence_ttl_s, max_offline_bytes=max_offline_bytes,
                       max_offline_players=max_offline_players, sweep_interval_s=0.01)


def seat(roster: RedisRoster, player_id: str):
    reserved = roster.reserve(player_id)
    assert reserved is not None
    return reserved, roster.take_seat(reserved)


def test_limit_holds_across_gateways(redis_url, redis_prefix):
    """-max-conns counts a player's connections on every gateway, reservations included."""
    first, second = make_roster(redis_url, redis_prefix, max_conns=3), make_roster(redis_url, redis_prefix, max_conns=3)
    seat(first, "p")
    assert second.reserve("p") is not None
    assert first.reserve("p") is not None
    assert second.reserve("p") is None and first.reserve("p") is None
    assert first.reserve("q") is not None, "the limit is per player"


def test_leave_and_cancel_free_their_places(redis_url, redis_prefix):
    """A connection that left, or a reservation cancelled, no longer counts against the limit."""
    roster = make_roster(redis_url, redis_prefix, max_conns=1)
    taken, _ = seat(roster, "p")
    assert roster.reserve("p") is None
    roster.leave(taken)
    pending = roster.reserve("p")
    assert pending is not None and roster.reserve("p") is None
    roster.cancel(pending)
    assert roster.reserve("p") is not None


def test_route_goes_live_to_every_gateway_holding_the_player(redis_url, redis_prefix):
    """A present player's message is routed to each gateway with one of its seats, never queued."""
    first, second = make_roster(redis_url, redis_prefix), make_roster(redis_url, redis_prefix)
    seat(first, "p")
    seat(second, "p")
    route = first.route("p", b"frame", True)
    assert route.gateways == frozenset((first.gateway_id, second.gateway_id))
    assert route.connections == 2 and not route.queued


def test_reserved_but_not_seated_player_is_still_offline(redis_url, redis_prefix):
    """A reservation counts for the limit, but messages are queued until the seat is taken."""
    roster = make_roster(redis_url, redis_prefix)
    pending = roster.reserve("p")
    assert roster.route("p", b"early", True).queued
    assert roster.take_seat(pending).frames == [b"early"]


def test_queue_keeps_order_and_drops_oldest_past_the_bound(redis_url, redis_prefix):
    """Queued frames come back in order; past -max-queued the oldest are dropped and counted."""
    roster = make_roster(redis_url, redis_prefix, max_queued=3)
    routes = [roster.route("p", f"m{n}".encode(), True) for n in range(5)]
    assert all(route.queued for route in routes)
    assert [route.dropped for route in routes] == [0, 0, 0, 1, 1]
    _, backlog = seat(roster, "p")
    assert backlog.frames == [b"m2", b"m3", b"m4"]


def test_backlog_is_handed_to_exactly_one_of_simultaneous_connections(redis_url, redis_prefix):
    """Two gateways taking seats for one player at the same moment: one gets the whole backlog."""
    rosters = [make_roster(redis_url, redis_prefix, max_queued=100) for _ in range(2)]
    for number in range(50):
        rosters[0].route("p", str(number).encode(), True)
    reservations = [roster.reserve("p") for roster in rosters]
    takes = [gevent.spawn(roster.take_seat, reserved) for roster, reserved in zip(rosters, reservations)]
    gevent.joinall(takes, raise_error=True)
    backlogs = sorted((take.value.frames for take in takes), key=len)
    assert backlogs[0] == []
    assert backlogs[1] == [str(number).encode() for number in range(50)]


def test_expired_frames_are_not_handed_over_and_are_counted(redis_url, redis_prefix):
    """Frames older than -offline-ttl are skipped at hand-off and reported as expired."""
    roster = make_roster(redis_url, redis_prefix, offline_ttl_s=0.2)
    roster.route("p", b"old", True)
    gevent.sleep(0.3)  # the TTL itself is what is under test: let it pass
    roster.route("q", b"other", True)
    _, backlog = seat(roster, "p")
    assert backlog.frames == [] and backlog.expired == 1


def test_sweep_removes_and_counts_queues_nobody_came_back_for(redis_url, redis_prefix):
    """maintain() deletes fully expired queues and returns how many frames they held."""
    roster = make_roster(redis_url, redis_prefix, offline_ttl_s=0.2)
    for number in range(3):
        roster.route("gone", str(number).encode(), True)
    client = create_client(redis_url, TIMEOUT_S)
    keys = RedisKeys(redis_prefix, cluster=is_cluster_url(redis_url))
    assert client.llen(keys.queue("gone")) == 3
    expired = wait_for(lambda: roster.maintain()[0], what="a sweep that finds the expired queue")
    assert expired == 3
    assert client.llen(keys.queue("gone")) == 0
    assert int(client.hget(keys.missed("gone"), "expired")) == 3


def test_dead_gateways_players_count_as_offline_after_presence_ttl(redis_url, redis_prefix):
    """Seats that are no longer refreshed expire: the player is offline again and messages queue."""
    dead = make_roster(redis_url, redis_prefix, presence_ttl_s=0.3)
    seat(dead, "p")
    assert not dead.route("p", b"live", True).queued
    wait_for(lambda: dead.route("p", b"x", False).connections == 0, what="presence expiry")
    assert dead.route("p", b"queued", True).queued


def test_refresh_keeps_seats_alive_and_reports_those_redis_lost(redis_url, redis_prefix):
    """The heartbeat extends seats; those Redis lost (a wipe) it reports, and restore writes them back."""
    roster = make_roster(redis_url, redis_prefix, presence_ttl_s=1.0)
    taken, _ = seat(roster, "p")
    assert roster.refresh(force=True) == []
    client = create_client(redis_url, TIMEOUT_S)
    for key in client.scan_iter(f"*{redis_prefix}*"):  # a cluster's keys start with a hash tag
        client.delete(key)
    assert roster.route("p", b"x", False).connections == 0
    lost = roster.refresh(force=True)
    assert lost == [taken]
    assert roster.route("p", b"x", False).connections == 0, "refresh alone brings nothing back"
    roster.restore(lost)
    assert roster.route("p", b"x", False).gateways == frozenset((roster.gateway_id,))


def test_restore_hands_over_what_was_queued_while_the_seat_was_lost(redis_url, redis_prefix):
    """Frames queued while a seat's presence was missing come back from restore, for its connection."""
    roster = make_roster(redis_url, redis_prefix)
    taken, _ = seat(roster, "p")
    create_client(redis_url, TIMEOUT_S).delete(RedisKeys(redis_prefix, cluster=is_cluster_url(redis_url)).present("p"))
    assert roster.route("p", b"one", True).queued and roster.route("p", b"two", True).queued
    backlogs = roster.restore(roster.refresh(force=True))
    assert backlogs["p"].frames == [b"one", b"two"]
    assert not roster.route("p", b"three", True).queued


def test_left_seat_is_not_brought_back_by_a_restore(redis_url, redis_prefix):
    """A seat that left between the heartbeat and restore stays gone."""
    roster = make_roster(redis_url, redis_prefix)
    taken, _ = seat(roster, "p")
    create_client(redis_url, TIMEOUT_S).delete(RedisKeys(redis_prefix, cluster=is_cluster_url(redis_url)).present("p"))
    lost = roster.refresh(force=True)
    assert lost == [taken]
    roster.leave(taken)
    assert roster.restore(lost) == {}
    assert roster.route("p", b"x", False).connections == 0


def test_requeue_withdraws_the_seat_that_missed_the_frame_and_queues(redis_url, redis_prefix):
    """A frame that found its connection gone: that seat stops counting, the frame is queued."""
    roster = make_roster(redis_url, redis_prefix)
    taken, _ = seat(roster, "p")
    route = roster.requeue("p", b"late", frozenset((taken.seat_id,)), frozenset((taken.seat_id,)))
    assert route.queued and not route.gateways
    assert roster.refresh(force=True) == [], "the withdrawn seat is not reported lost"
    other = make_roster(redis_url, redis_prefix)
    _, backlog = seat(other, "p")
    assert backlog.frames == [b"late"]


def test_requeue_goes_to_a_newer_connection_not_to_those_that_had_it(redis_url, redis_prefix):
    """Requeue routes to seats taken since, never back to those it was sent to."""
    first, second, third = (make_roster(redis_url, redis_prefix) for _ in range(3))
    gone, _ = seat(first, "p")
    kept, _ = seat(second, "p")
    sent_to = frozenset((gone.seat_id, kept.seat_id))
    assert first.requeue("p", b"x", sent_to, frozenset((gone.seat_id,))).queued, "second got it already"
    newer, _ = seat(third, "p")
    route = first.requeue("p", b"y", sent_to, frozenset((gone.seat_id,)))
    assert route.gateways == frozenset((third.gateway_id,)) and route.seats == frozenset((newer.seat_id,))


def test_a_copy_that_a_closing_connection_missed_waits_for_the_players_next_connection(redis_url, redis_prefix):
    """Of a message routed to two connections of a player, the copy of the one that closed
    on the way goes to the queue although the other one is present (it had its own copy):
    the player's next connection gets it, and the other seat still counts as present."""
    roster = make_roster(redis_url, redis_prefix)
    gone, _ = seat(roster, "p")
    kept, _ = seat(roster, "p")
    assert roster.requeue("p", b"missed", frozenset((gone.seat_id, kept.seat_id)), frozenset((gone.seat_id,))).queued
    assert roster.route("p", b"live", True).seats == frozenset((kept.seat_id,)), "the other seat is untouched"
    assert roster.refresh(force=True) == []
    _, backlog = seat(roster, "p")
    assert backlog.frames == [b"missed"]


def test_a_route_names_the_seats_it_goes_to(redis_url, redis_prefix):
    """A live route names each connection's seat, so each gateway gives it to those only."""
    first, second = make_roster(redis_url, redis_prefix), make_roster(redis_url, redis_prefix)
    one, _ = seat(first, "p")
    two, _ = seat(second, "p")
    route = first.route("p", b"x", True)
    assert route.seats == frozenset((one.seat_id, two.seat_id)) and route.connections == 2


def test_reach_counts_connections_of_live_gateways_that_read_broadcasts(redis_url, redis_prefix):
    """reach() sums the connections of every live gateway registered as a broadcast reader: what a broadcast goes to."""
    first, second = make_roster(redis_url, redis_prefix), make_roster(redis_url, redis_prefix)
    seat(first, "a")
    seat(first, "b")
    seat(second, "c")
    first.refresh()
    second.refresh()
    readers = create_client(redis_url, TIMEOUT_S)
    registry = RedisKeys(redis_prefix, cluster=is_cluster_url(redis_url)).streams
    readers.zadd(registry, {first.gateway_id: 2 ** 50})
    assert first.reach() == 2, "a gateway whose stream reader is not registered (back from a partition) is not reached"
    readers.zadd(registry, {second.gateway_id: 2 ** 50})
    assert first.reach() == 3
    second.close()
    assert first.reach() == 2


def test_unreachable_redis_is_broker_unavailable(redis_prefix):
    """Every roster call fails with BrokerUnavailable, not a Redis exception, when Redis is down."""
    roster = make_roster("redis://127.0.0.1:1/0", redis_prefix)
    with pytest.raises(BrokerUnavailable):
        roster.reserve("p")
    with pytest.raises(BrokerUnavailable):
        roster.route("p", b"x", True)


def test_seat_ids_name_their_gateway():
    """A seat id starts with its gateway id, which routing relies on."""
    assert gateway_of("host:12:abcd/7") == "host:12:abcd"


def test_requeued_frames_keep_publish_order_in_the_queue(redis_url, redis_prefix):
    """Frames requeued after their connection closed go before what was queued after they were sent."""
    roster = make_roster(redis_url, redis_prefix)
    taken, _ = seat(roster, "p")
    seconds, microseconds = create_client(redis_url, TIMEOUT_S).time()
    sent_at_ms = seconds * 1000 + microseconds // 1000
    mine = frozenset((taken.seat_id,))
    assert roster.requeue("p", b"late-1", mine, mine, sent_at_ms).queued
    gevent.sleep(0.01)
    assert roster.route("p", b"published-after", True).queued
    assert roster.requeue("p", b"late-2", mine, mine, sent_at_ms).queued
    _, backlog = seat(make_roster(redis_url, redis_prefix), "p")
    assert backlog.frames == [b"late-1", b"late-2", b"published-after"]


def item_bytes(frame: bytes) -> int:
    """What a frame counts against -max-offline-bytes in Redis, as in memory (not its expiry prefix)."""
    return len(frame) + MESSAGE_OVERHEAD_BYTES


def held_bytes(url: str, prefix: str) -> int:
    """What every queue of the cluster holds together (the sum of its shards' accounts)."""
    client = create_client(url, TIMEOUT_S)
    try:
        return sum(int(client.hget(shard.queue_sizes, "") or 0)
                   for shard in RedisKeys(prefix, cluster=is_cluster_url(url)).shards)
    finally:
        client.close()


def test_all_queues_of_the_cluster_stay_within_their_bytes_the_oldest_given_up_first(redis_prefix):
    """Past -max-offline-bytes the oldest frame of any player, pushed from any gateway, goes first, counted."""
    frame = b"x" * 1000
    first, second = (make_roster(REDIS_URL, redis_prefix, max_offline_bytes=3 * item_bytes(frame)) for _ in range(2))
    assert first.route("a", frame + b"1", True).queued
    assert second.route("b", frame + b"2", True).queued
    assert first.route("a", frame + b"3", True).over_total_bytes == 1  # a's first: one byte too many
    assert held_bytes(REDIS_URL, redis_prefix) <= 3 * item_bytes(frame)
    route = second.route("c", frame, True)
    assert route.queued and route.over_total_bytes == 1  # b's
    assert seat(first, "a")[1].frames == [frame + b"3"] and seat(first, "a")[1].frames == []
    _, backlog_b = seat(second, "b")
    assert backlog_b.frames == [] and backlog_b.missed_dropped == 1
    assert seat(first, "c")[1].frames == [frame]
    assert held_bytes(REDIS_URL, redis_prefix) == 0


def test_a_frame_larger_than_every_queue_together_is_not_queued_in_redis(redis_prefix):
    """A frame past -max-offline-bytes on its own is given up (counted), pushing nothing out."""
    roster = make_roster(REDIS_URL, redis_prefix, max_offline_bytes=2000)
    assert roster.route("a", b"small", True).queued
    route = roster.route("b", b"x" * 2000, True)
    assert (route.queued, route.over_total_bytes, route.gateways) == (False, 1, frozenset())
    assert seat(roster, "a")[1].frames == [b"small"]
    assert seat(roster, "b")[1].missed_dropped == 1


def test_past_the_queue_bound_the_oldest_whole_queue_goes_in_redis(redis_prefix):
    """Past -max-offline-players the queue holding the oldest frame is given up whole, and counted."""
    roster = make_roster(REDIS_URL, redis_prefix, max_offline_players=2)
    for player, frame in (("a", b"a1"), ("b", b"b1"), ("a", b"a2"), ("b", b"b2")):
        assert roster.route(player, frame, True).over_total_players == 0
    route = roster.route("c", b"c1", True)
    assert route.queued and route.over_total_players == 2
    _, backlog_a = seat(roster, "a")
    assert backlog_a.frames == [] and backlog_a.missed_dropped == 2
    assert seat(roster, "b")[1].frames == [b"b1", b"b2"]
    assert seat(roster, "c")[1].frames == [b"c1"]
    assert held_bytes(REDIS_URL, redis_prefix) == 0


def test_swept_and_taken_queues_leave_the_accounting(redis_url, redis_prefix):
    """Queues that expire (the sweep) or are taken no longer count against the bound."""
    roster = make_roster(redis_url, redis_prefix, offline_ttl_s=0.2, max_offline_bytes=1 << 20)
    roster.route("gone", b"1", True)
    roster.route("taken", b"2", True)
    seat(roster, "taken")
    assert held_bytes(redis_url, redis_prefix) == item_bytes(b"1")
    wait_for(lambda: roster.maintain()[0], what="a sweep that finds the expired queue")
    assert held_bytes(redis_url, redis_prefix) == 0
    client = create_client(redis_url, TIMEOUT_S)
    assert all(client.zcard(shard.queue_heads) == 0
               for shard in RedisKeys(redis_prefix, cluster=is_cluster_url(redis_url)).shards)
    client.close()


def test_600_large_publishes_to_distinct_offline_players_stay_within_the_bound_in_redis(redis_prefix):
    """The issue's case in Redis: 600 frames of 0.9 MiB to distinct players; the newest survive, the rest counted."""
    cap = 64 << 20
    roster = make_roster(REDIS_URL, redis_prefix, max_offline_bytes=cap, max_offline_players=10_000)
    frame = b"x" * ((9 << 20) // 10)
    given_up = sum(roster.route(str(player), frame, True).over_total_bytes for player in range(600))
    assert held_bytes(REDIS_URL, redis_prefix) <= cap
    kept = 600 - given_up
    assert kept == cap // item_bytes(frame)
    assert all(seat(roster, str(player))[1].frames == [frame] for player in range(600 - kept, 600))
    assert seat(roster, str(599 - kept))[1].missed_dropped == 1


def players_of_one_shard(keys: RedisKeys, count: int) -> list[str]:
    """`count` player ids that hash to the same accounting shard."""
    players = [str(number) for number in range(10_000)]
    first = keys.shard_of(players[0])
    return [player for player in players if keys.shard_of(player) == first][:count]


def test_on_a_cluster_each_shard_keeps_its_share_of_the_bounds(redis_cluster, redis_prefix):
    """On a Redis Cluster each shard holds 1/16 of -max-offline-bytes: past it the oldest frame of that shard goes."""
    keys = RedisKeys(redis_prefix, cluster=True)
    first, second = players_of_one_shard(keys, 2)
    elsewhere = next(str(number) for number in range(10_000) if keys.shard_of(str(number)) != keys.shard_of(first))
    frame = b"x" * 1000
    roster = make_roster(redis_cluster.url, redis_prefix,
                         max_offline_bytes=len(keys.shards) * 2 * item_bytes(frame + b"1"))
    assert roster.route(first, frame + b"1", True).over_total_bytes == 0
    assert roster.route(elsewhere, frame + b"2", True).over_total_bytes == 0
    assert roster.route(second, frame + b"3", True).over_total_bytes == 0
    route = roster.route(second, frame + b"4", True)
    assert route.queued and route.over_total_bytes == 1, "the shard holds two: its oldest went"
    assert seat(roster, first)[1].missed_dropped == 1
    assert seat(roster, elsewhere)[1].frames == [frame + b"2"], "another shard's queue is untouched"
    assert seat(roster, second)[1].frames == [frame + b"3", frame + b"4"]
    assert held_bytes(redis_cluster.url, redis_prefix) == 0


def test_a_clusters_census_counts_every_shard(redis_cluster, redis_prefix):
    """The census on a cluster sums the players of every shard and the connections of every gateway."""
    first, second = (make_roster(redis_cluster.url, redis_prefix) for _ in range(2))
    for number in range(40):
        seat(first if number % 2 else second, f"player-{number}")
    seat(first, "player-0")
    first.refresh(force=True)
    second.refresh(force=True)
    assert (first.census().players, first.census().connections) == (40, 41)


def test_a_clusters_refresh_goes_on_for_the_shards_that_answer(redis_cluster, redis_prefix, monkeypatch):
    """On a cluster a shard that fails (its master failing over) does not stop the others' seats being extended."""
    import redis

    roster = make_roster(redis_cluster.url, redis_prefix)
    keys = RedisKeys(redis_prefix, cluster=True)
    players = [str(number) for number in range(40)]
    for player in players:
        seat(roster, player)
    failing = keys.shard_of(players[0]).base
    extend = roster._extend_seats

    def failing_on_one_shard(seats):
        if keys.shard_of(seats[0].player_id).base == failing:
            raise redis.ConnectionError("master away")
        return extend(seats)
    monkeypatch.setattr(roster, "_extend_seats", failing_on_one_shard)
    client = create_client(redis_cluster.url, TIMEOUT_S)
    healthy = next(player for player in players if keys.shard_of(player).base != failing)
    client.delete(keys.present(healthy))
    assert [seat.player_id for seat in roster.refresh(force=True)] == [healthy], "lost seats of the others found"
    monkeypatch.setattr(roster, "_extend_seats", lambda seats: (_ for _ in ()).throw(redis.ConnectionError("gone")))
    with pytest.raises(BrokerUnavailable):
        roster.refresh(force=True)


def test_a_heartbeat_racing_seat_steps_keeps_the_count_exact(redis_url, redis_prefix):
    """The heartbeat that sets this gateway's connection count while a seat step is on its
    way to Redis neither loses that step's +1 nor its -1: the census right after is exact."""
    roster = make_roster(redis_url, redis_prefix)
    roster.refresh(force=True)
    reserved = roster.reserve("p")
    assert reserved is not None
    taking = gevent.spawn(roster.take_seat, reserved)
    gevent.sleep(0)  # the step is sent, its answer not yet read
    roster.refresh(force=True)
    taking.get(timeout=TIMEOUT_S)
    assert (roster.census().players, roster.census().connections) == (1, 1)
    leaving = gevent.spawn(roster.leave, reserved)
    gevent.sleep(0)
    roster.refresh(force=True)
    leaving.get(timeout=TIMEOUT_S)
    assert (roster.census().players, roster.census().connections) == (0, 0)


def _count_of(roster: RedisRoster, url: str, prefix: str) -> int:
    """The connection count Redis holds for `roster`'s gateway (what a broadcast's reach sums)."""
    keys = RedisKeys(prefix, cluster=is_cluster_url(url))
    return int(create_client(url, TIMEOUT_S).hget(keys.gateway_connections, roster.gateway_id) or 0)


def test_a_restore_leaves_the_connection_count_to_the_seats_own_steps(redis_url, redis_prefix):
    """Writing lost seats back does not count their connections again (each was counted when
    it took its seat): a broadcast's reach never sees a connection twice, and a seat taken
    meanwhile (counted in Redis, not yet in this gateway's seats) is not counted away."""
    roster = make_roster(redis_url, redis_prefix)
    seat(roster, "p")
    seat(roster, "q")
    roster.refresh(force=True)
    keys = RedisKeys(redis_prefix, cluster=is_cluster_url(redis_url))
    client = create_client(redis_url, TIMEOUT_S)
    client.delete(keys.present("p"))
    lost = roster.refresh(force=True)
    assert [taken.player_id for taken in lost] == ["p"]
    client.hincrby(keys.gateway_connections, roster.gateway_id, 1)  # a third seat's step, its answer on the way
    roster.restore(lost)
    assert _count_of(roster, redis_url, redis_prefix) == 3


def test_a_lost_registration_is_noticed_at_the_next_call_not_the_next_heartbeat(redis_url, redis_prefix):
    """refresh() runs every second; when Redis lost this gateway's registration (a flush, a
    restart) it heartbeats and reports the lost seats then, not a third of -presence-ttl later."""
    roster = make_roster(redis_url, redis_prefix, presence_ttl_s=60.0)
    taken, _ = seat(roster, "p")
    assert roster.refresh(force=True) == []
    assert roster.refresh() == [], "not due, nothing lost"
    client = create_client(redis_url, TIMEOUT_S)
    for key in client.scan_iter(f"*{redis_prefix}*"):
        client.delete(key)
    assert roster.refresh() == [taken]
    assert _count_of(roster, redis_url, redis_prefix) == 1


def test_a_requeued_frame_settled_at_the_front_is_the_queues_head_in_the_accounting(redis_url, redis_prefix):
    """The queue heads (which say whose frame is the oldest of all, given up first for
    -max-offline-bytes) name a requeued frame's expiry once it moved to the queue's front."""
    roster = make_roster(redis_url, redis_prefix, offline_ttl_s=60.0)
    client = create_client(redis_url, TIMEOUT_S)

    def redis_ms() -> int:
        seconds, microseconds = client.time()
        return seconds * 1000 + microseconds // 1000

    sent_at_ms = redis_ms()
    wait_for(lambda: redis_ms() > sent_at_ms + 5, what="Redis's clock to move on")
    assert roster.route("p", b"published-after", True).queued
    assert roster.requeue("p", b"late", frozenset(), frozenset(), sent_at_ms).queued
    keys = RedisKeys(redis_prefix, cluster=is_cluster_url(redis_url))
    shard = keys.shard_of("p")
    assert client.zscore(shard.queue_heads, shard.queue("p")) == sent_at_ms + 60_000 - 1
    _, backlog = seat(roster, "p")
    assert backlog.frames == [b"late", b"published-after"]


def test_a_returned_backlog_goes_before_what_was_queued_since_and_its_oldest_give_way(redis_url, redis_prefix):
    """A backlog put back (its connection closed as it was restored) goes to the front of the
    queue, in its order; past -max-queued its oldest are given up, counted, as the next
    connection's missed-notice counts say too."""
    roster = make_roster(redis_url, redis_prefix, max_queued=4)
    assert roster.route("p", b"later", True).queued
    assert roster.return_backlog("p", [b"b1", b"b2", b"b3"]) == (0, 0)
    assert roster.return_backlog("p", [b"a1", b"a2"]) == (2, 0)
    _, backlog = seat(roster, "p")
    assert backlog.frames == [b"b1", b"b2", b"b3", b"later"]
    assert (backlog.missed_dropped, backlog.expired) == (2, 0)


# --- a seat step whose answer is lost -------------------------------------------------------------
@contextmanager
def backlog_taken_with_its_answer_lost(prefix: str, **options) -> Iterator[tuple[RedisRoster, RedisRoster, Any]]:
    """Player "p" has frames 1 and 2 queued; a gateway whose link to the shared Redis goes
    through a relay reserves a seat for it, and its `take_seat` runs in Redis but its answer
    never arrives (the link resets). Yields (a roster on Redis itself, that gateway's roster,
    the seat)."""
    from tests.support.redis_server import relay_to_shared_redis, script_sha
    from wsgateway.roster_redis import TAKE_SEAT

    relay, relayed_url = relay_to_shared_redis()
    try:
        publisher = make_roster(REDIS_URL, prefix, **options)
        taker = make_roster(relayed_url, prefix, **options)
        seat(taker, "someone else")  # TAKE_SEAT known to Redis: the step runs at its first send
        for frame in (b"1", b"2"):
            publisher.route("p", frame, True)
        reserved = taker.reserve("p")
        relay.lose_answer_to(script_sha(TAKE_SEAT))
        with pytest.raises(BrokerUnavailable):
            taker.take_seat(reserved)
        assert relay.answers_lost == 1
        yield publisher, taker, reserved
    finally:
        relay.close()


def test_a_seat_taken_again_after_its_answer_was_lost_gets_the_backlog_it_took(redis_prefix):
    """The client's retry of a seat step whose answer was lost (a Redis Cluster client retries
    on a reset link) is answered the backlog the first run took."""
    with backlog_taken_with_its_answer_lost(redis_prefix) as (publisher, taker, reserved):
        assert publisher.route("p", b"live", True).queued is False, "the step ran: the seat is present"
        assert taker.take_seat(reserved).frames == [b"1", b"2"]
        assert taker.take_seat(reserved).frames == [], "once answered, the handover is done with"


def test_a_seat_given_back_after_its_answer_was_lost_puts_its_backlog_back_in_order(redis_prefix):
    """A connection that could not be seated (its seat step's answer lost) gives its seat back:
    the backlog the step took goes back to the front of the queue, before what was queued
    since, for the player's next connection; the seat no longer counts as present."""
    with backlog_taken_with_its_answer_lost(redis_prefix) as (publisher, taker, reserved):
        assert taker.cancel(reserved) == (0, 0)
        assert publisher.presence("p") == 0
        assert publisher.route("p", b"3", True).queued
        _, backlog = seat(publisher, "p")
        assert backlog.frames == [b"1", b"2", b"3"]


def test_a_backlog_given_back_to_a_full_queue_gives_way_counted(redis_prefix):
    """Given back past -max-queued, its oldest are given up and counted (in the next backlog)."""
    with backlog_taken_with_its_answer_lost(redis_prefix, max_queued=3, presence_ttl_s=0.3) \
            as (publisher, taker, reserved):
        wait_for(lambda: publisher.presence("p") == 0, what="the seat never seated expiring")
        for frame in (b"3", b"4"):
            assert publisher.route("p", frame, True).queued
        assert taker.cancel(reserved) == (1, 0)
        _, backlog = seat(publisher, "p")
        assert backlog.frames == [b"2", b"3", b"4"] and backlog.missed_dropped == 1
