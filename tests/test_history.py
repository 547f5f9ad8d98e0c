"""history: ids, what is kept, and replay plans, without sockets (clock injected)."""
from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from tests.support.fakes import FakeClock, FakeConnection
from wsgateway.broker import InProcessBroker
from wsgateway.delivery import Delivery
from wsgateway.history import (ENTRY_OVERHEAD_BYTES, MAX_ID_LENGTH, MemoryHistory, Position, frame_text,
                               message_parts, parse_event_id, restamp)
from wsgateway.hub import Hub
from wsgateway.metrics import GatewayMetrics
from wsgateway.offline import MemoryOfflineQueue
from wsgateway.protocol import event_frame
from wsgateway.roster import HistoryLocalRoster


def frame(number: int) -> bytes:
    return event_frame("n", number)


def payloads(frames: list[bytes]) -> list:
    return [json.loads(frame_text(frame))["payload"] for frame in frames]


def test_ids_parse_and_refuse_what_no_gateway_made():
    """Both id forms parse; anything else (also too long, or leading zeros) does not."""
    assert parse_event_id("ab12.3.7.2") == Position("ab12", 2, "3", 7)
    assert parse_event_id("ab12.5") == Position("ab12", 5)
    for text in ("", "ab12", "ab12.05", "AB.1", "ab..1", "ab.1.2", "a.1.2.3.4", "x" * MAX_ID_LENGTH + ".1"):
        assert parse_event_id(text) is None, text


def test_the_id_frame_is_the_legacy_json_with_id_last():
    """A stamped frame is the legacy text with `"id"` appended as the last key."""
    history = MemoryHistory(10, 60, epoch="e")
    stamped = history.record("21", event_frame("score", {"points": 5}))
    assert frame_text(stamped) == b'{"event":"score","payload":{"points":5},"id":"e.1.1.0"}'
    assert stamped.json == b'{"event":"score","payload":{"points":5}}'
    assert message_parts(stamped) == ("e.1.1.0", "score", b'{"points":5}')


def test_replay_merges_broadcasts_in_live_order():
    """A player message goes after the broadcast it followed and before the next one."""
    history = MemoryHistory(10, 60, epoch="e")
    first = history.record("21", frame(0))
    history.record_broadcast(frame(1))
    history.record("21", frame(2))
    history.record("22", frame(-1))  # another player's: never in 21's replay
    history.record_broadcast(frame(3))
    history.record("21", frame(4))
    replay = history.replay("21", first.event_id)
    assert replay.recovered and payloads(replay.frames) == [1, 2, 3, 4]
    assert replay.replayed == {stamped.event_id for stamped in replay.frames}


def test_a_broadcast_id_resumes_every_players_stream():
    """After a broadcast's id, a player gets its own later messages and later broadcasts."""
    history = MemoryHistory(10, 60, epoch="e")
    history.record("21", frame(0))
    broadcast = history.record_broadcast(frame(1))
    history.record("21", frame(2))
    history.record_broadcast(frame(3))
    assert payloads(history.replay("21", broadcast.event_id).frames) == [2, 3]
    assert payloads(history.replay("99", broadcast.event_id).frames) == [3]  # no stream of its own


def test_past_the_size_the_old_id_is_too_old():
    """-history-size per stream: an id whose successors were given up is not honoured."""
    history = MemoryHistory(2, 60, epoch="e")
    first = history.record("21", frame(0))
    for number in range(1, 4):
        history.record("21", frame(number))
    replay = history.replay("21", first.event_id)
    assert not replay.recovered and replay.reason == "too_old"
    notice = json.loads(frame_text(replay.frames[0]))
    assert notice["payload"]["oldest_id"] == replay.frames[1].event_id and notice["payload"]["kept"] == 2
    assert payloads(replay.frames[1:]) == [2, 3]


def test_a_broadcast_id_is_too_old_when_the_player_gave_up_messages_after_it():
    """The player's stream gave up a message published after the broadcast: too old."""
    history = MemoryHistory(1, 60, epoch="e")
    broadcast = history.record_broadcast(frame(0))
    history.record("21", frame(1))
    history.record("21", frame(2))
    assert history.replay("21", broadcast.event_id).reason == "too_old"


def test_ttl_expires_messages():
    """A message older than -history-ttl is given up; resuming before it is too old."""
    clock = FakeClock()
    history = MemoryHistory(10, 5, clock=clock, epoch="e")
    first = history.record("21", frame(0))
    history.record("21", frame(1))
    clock.now += 6
    history.record("21", frame(2))
    assert history.maintain() == 0  # given up already, by the record above
    assert len(history) == 1
    assert history.replay("21", first.event_id).reason == "too_old"


def test_the_byte_bound_gives_up_the_oldest_of_any_stream():
    """-max-history-bytes: the oldest message of all goes first, whoever it was for."""
    one = len(event_frame("n", 0)) + len(',"id":"e.1.1.0"') + ENTRY_OVERHEAD_BYTES
    history = MemoryHistory(10, 60, max_total_bytes=2 * one + 10, epoch="e")
    old = history.record("21", frame(0))
    history.record("22", frame(1))
    history.record("22", frame(2))
    assert len(history) == 2 and history.held_bytes <= 2 * one + 10
    assert history.replay("21", old.event_id).recovered  # nothing after it was lost


def test_other_epochs_and_generations_are_lost_histories():
    """An id of another process (epoch) or of a forgotten stream (generation) is lost."""
    history = MemoryHistory(10, 60, epoch="e")
    history.record("21", frame(0))
    assert history.replay("21", "other.1.1.0").reason == "history_lost"
    assert history.replay("21", "e.9.1.0").reason == "history_lost"
    assert history.replay("21", "e.99").reason == "history_lost"  # a broadcast not yet made
    assert history.replay("21", "e.1.5.0").reason == "history_lost"  # a message not yet made


def test_an_empty_id_gets_the_queued_messages_once():
    """`last_event_id=`: what was queued while offline, once; not what went live."""
    history = MemoryHistory(10, 60, epoch="e")
    history.record("21", frame(0))  # went live
    for number in (1, 2):
        history.note_queued("21", history.record("21", frame(number)))
    history.record_broadcast(frame(3))
    assert payloads(history.replay("21", "").frames) == [1, 2]
    assert history.replay("21", "").frames == []


def test_a_legacy_backlog_counts_as_taken():
    """A connection without ids that took the backlog leaves nothing queued for an empty id."""
    history = MemoryHistory(10, 60, epoch="e")
    history.note_queued("21", history.record("21", frame(1)))
    history.note_taken("21")
    assert history.replay("21", "").frames == []


def test_forgotten_streams_refuse_only_what_they_could_have_answered():
    """An idle empty stream is forgotten; a broadcast id before its last message is then
    too old, one after it is still honoured."""
    clock = FakeClock()
    history = MemoryHistory(10, 5, clock=clock, epoch="e")
    before = history.record_broadcast(frame(0))
    history.record("21", frame(1))
    after = history.record_broadcast(frame(2))
    clock.now += 24 * 3600 + 10
    history.maintain()
    assert history.replay("21", before.event_id).reason == "too_old"
    fresh = history.record_broadcast(frame(3))
    assert history.replay("21", fresh.event_id).recovered
    assert after.broadcast_seq < fresh.broadcast_seq


class _RosterThatYields(HistoryLocalRoster):
    """A roster whose take_seat lets a publish in, as a Redis round trip does."""

    during_take_seat: list = []

    def take_seat(self, seat):
        backlog = super().take_seat(seat)
        for job in self.during_take_seat:
            job()
        return backlog


def test_live_frames_held_during_the_replay_are_sent_once():
    """A message published while a resuming connection fetches its replay arrives once,
    after the replay, and one published after it arrives live."""
    hub = Hub()
    history = MemoryHistory(10, 60, epoch="e")
    roster = _RosterThatYields(hub, MemoryOfflineQueue(10, 10), 0, history)
    delivery = Delivery(hub, roster, InProcessBroker(), GatewayMetrics(CollectorRegistry()), history=history)
    first = delivery.publish("21", frame(0))
    assert first.queued
    start = history.replay("21", "").frames[0].event_id
    roster.during_take_seat = [lambda: delivery.publish("21", frame(1))]
    connection = FakeConnection("21", wants_ids=True)
    delivery.connect(connection, roster.reserve("21"), start)
    delivery.publish("21", frame(2))
    assert payloads(connection.frames) == [1, 2]
    assert all(getattr(sent, "event_id", None) for sent in connection.frames)


def test_a_replay_says_the_point_it_brings_the_connection_to():
    """`through` covers what the replay sent and what came before it, nothing after it:
    a late live frame it covers is one the connection had."""
    history = MemoryHistory(10, 60, epoch="e")
    first = history.record("21", frame(0))
    broadcast = history.record_broadcast(frame(1))
    replayed = history.record("21", frame(2))
    replay = history.replay("21", first.event_id)
    assert payloads(replay.frames) == [1, 2]
    later_broadcast, later = history.record_broadcast(frame(3)), history.record("21", frame(4))
    assert [replay.through.covers(stamped) for stamped in (first, broadcast, replayed, later_broadcast, later)] \
        == [True, True, True, False, False]
    assert not replay.through.covers(frame(5))  # no id: a notice, or a local-only delivery
    empty = history.replay("21", later.event_id)  # nothing after it: the point is the id's
    assert empty.frames == [] and empty.through.covers(later) and not empty.through.covers(history.record("21", frame(6)))


def test_a_point_covers_nothing_of_another_epoch_or_a_later_generation():
    """Redis lost its data (a new epoch), or the player's stream was forgotten and begun
    again (a new generation, its seqs from 1): what comes is new, whatever its numbers."""
    history = MemoryHistory(10, 60, epoch="e")
    for number in range(3):
        last = history.record("21", frame(number))
    point = history.replay("21", last.event_id).through
    other_epoch = MemoryHistory(10, 60, epoch="f").record("21", frame(9))
    assert (other_epoch.player_seq, other_epoch.broadcast_seq) == (1, 0)
    assert not point.covers(other_epoch)
    next_generation = restamp(event_frame("n", 9), "e.2.1.0")
    assert not point.covers(next_generation) and point.covers(restamp(event_frame("n", 9), "e.1.1.0"))


def test_a_frame_the_replay_carried_is_not_sent_when_it_comes_again_later():
    """A live frame that reaches the connection after its release (a gateway's reader
    that fell behind, a message routed again) is not sent a second time."""
    hub = Hub()
    history = MemoryHistory(10, 60, epoch="e")
    roster = HistoryLocalRoster(hub, MemoryOfflineQueue(10, 10), 0, history)
    delivery = Delivery(hub, roster, InProcessBroker(), GatewayMetrics(CollectorRegistry()), history=history)
    start = history.record("21", frame(0))
    late = history.record("21", frame(1))
    connection = FakeConnection("21", wants_ids=True)
    delivery.connect(connection, roster.reserve("21"), start.event_id)
    assert hub.deliver("21", frame(1), stamped=late) == 1  # counted: it was delivered, by the replay
    delivery.publish("21", frame(2))
    assert payloads(connection.frames) == [1, 2]
