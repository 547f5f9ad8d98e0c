"""history_redis on the real Redis: bounds, expiry and the queued mark, without gateways."""
from __future__ import annotations

import json

import pytest
import redis

from tests.support import wait_for
from tests.support.redis_server import REDIS_URL
from wsgateway.history import frame_text, restamp
from wsgateway.history_redis import HistoryRoster, RedisHistory
from wsgateway.protocol import event_frame
from wsgateway.redis_link import RedisKeys


@pytest.fixture
def rig(redis_prefix):
    client = redis.Redis.from_url(REDIS_URL)
    keys = RedisKeys(redis_prefix)

    def make(**options):
        settings = dict(max_per_stream=10, ttl_s=60, max_total_bytes=0, stream_length=100, stream_ttl_s=30)
        settings.update(options)
        history = RedisHistory(client, keys, **settings)
        roster = HistoryRoster(client, keys, "gateway-a", history=history, max_conns_per_player=0, max_queued=10,
                               offline_ttl_s=10, presence_ttl_s=15)
        return history, roster
    yield make, client, keys
    client.close()


def payloads(frames):
    return [json.loads(frame_text(frame))["payload"] for frame in frames]


def test_the_byte_bound_gives_up_the_oldest_of_any_stream(rig):
    """-max-history-bytes across streams: the oldest item of all goes first, and the
    stream it left answers an id before it as too old."""
    make, client, keys = rig
    history, roster = make(max_total_bytes=2 * 700)
    roster.route("21", event_frame("n", 0), True)
    first = history.replay("21", "")
    assert payloads(first.frames) == [0]
    roster.route("22", event_frame("n", 1), True)
    roster.route("22", event_frame("n", 2), True)
    assert int(client.hget(keys.history_sizes, "")) <= 2 * 700
    assert history.replay("21", first.frames[0].event_id).recovered  # nothing after it was lost
    assert client.llen(keys.history("21")) == 0
    again = history.replay("22", "")
    assert payloads(again.frames) == [1, 2]


def test_expired_items_are_swept_and_their_accounts_return_to_zero(rig):
    """-history-ttl: the sweep gives up what expired and the byte accounts go back to 0."""
    make, client, keys = rig
    history, roster = make(ttl_s=0.2)
    roster.route("21", event_frame("n", 0), True)
    history.record_broadcast(event_frame("b", 1))
    old = history.replay("21", "").frames[0].event_id
    wait_for(lambda: history.maintain() >= 0 and client.zcard(keys.history_heads) == 0, what="the sweep")
    assert client.hget(keys.history_sizes, "") is None
    assert history.replay("21", old).reason == "too_old"


def test_a_message_routed_again_into_the_queue_is_marked_queued_in_the_same_step(rig):
    """A message sent live whose connection closed on the way is requeued, and marked
    queued in the history by that same step: a connection resuming with an empty
    last_event_id right after it (it takes the queue and replays what was queued) gets
    it, once. Marked in a later step, the resume in between would replay past it."""
    make, client, keys = rig
    history, roster = make()
    seat = "gateway-a/1"
    client.zadd(keys.present("21"), {seat: 10**13})  # a seat that looks present
    route = roster.route("21", event_frame("n", 0), True)
    assert route.sent and route.gateways == frozenset({"gateway-a"})
    entry = client.xrange(keys.stream("gateway-a"))[-1][1]
    stamped = restamp(event_frame("n", 0), entry[b"i"].decode())
    assert client.lindex(keys.history("21"), 0).split(b":")[4] == b"0"  # kept as sent live, not queued
    requeued = roster.requeue("21", event_frame("n", 0), frozenset((seat,)), frozenset((seat,)), stamped=stamped)
    assert requeued.queued
    assert payloads(history.replay("21", "").frames) == [0]
    assert history.replay("21", "").frames == []


def test_per_stream_size_and_generations(rig):
    """-history-size per stream; a stream forgotten by Redis starts a new generation."""
    make, client, keys = rig
    history, roster = make(max_per_stream=2)
    for number in range(4):
        roster.route("21", event_frame("n", number), True)
    replay = history.replay("21", "")
    assert payloads(replay.frames) == [2, 3]
    old_id = replay.frames[0].event_id
    client.delete(keys.history_meta("21"), keys.history("21"))
    roster.route("21", event_frame("n", 4), True)
    assert history.replay("21", old_id).reason == "history_lost"
