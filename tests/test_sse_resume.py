"""Resumable event streams (`GET /events` with -history-size): every event with its `id:` line, the same ids a
WebSocket gets, resume after `Last-Event-ID` (the header a browser sends) or `last_event_id` (the query form),
`gateway.missed` as an event of that name when an id cannot be honoured, on one gateway and across two."""
from __future__ import annotations

from urllib.parse import quote

import gevent

from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import receive_event
from tests.support.event_streams import EventStreamClient, StreamBlock, open_stream
from tests.support.gateways import GatewayUnderTest

HISTORY = ("-history-size", "50", "-history-ttl", "1m")


def received(stream: EventStreamClient, count: int) -> list[StreamBlock]:
    return [stream.next_event() for _ in range(count)]


def gone(gateway: GatewayUnderTest, stream: EventStreamClient, connections: int = 0) -> None:
    """Close `stream` and wait until the gateway has let it go."""
    stream.close()
    wait_for(lambda: gateway.metric("ws_active_connections") == connections, what="the stream to go")


def test_with_a_history_every_event_carries_the_id_a_websocket_gets(start_gateway):
    """id:, event:, data: for player messages and broadcasts; the ids are those of a WebSocket asking for ids."""
    gateway = start_gateway(*HISTORY)
    server, token = gateway.tokens.server(), gateway.tokens.player(21)
    stream = open_stream(gateway, token)
    socket_client = gateway.connect(token, "&last_event_id=")
    gateway.publish(server, 21, "score", {"points": 5})
    gateway.broadcast(server, "round", None)
    blocks = received(stream, 2)
    frames = [receive_event(socket_client) for _ in range(2)]
    assert [[name for name, _ in block.fields] for block in blocks] == [["id", "event", "data"]] * 2
    assert [(block.get("id"), block.event, block.data) for block in blocks] == \
        [(frame["id"], frame["event"], frame["payload"]) for frame in frames]
    assert blocks[0].get("id") != blocks[1].get("id")


def test_without_a_history_there_are_no_ids_and_a_resume_is_told_so(start_gateway):
    """-history-size 0: events without id lines; a Last-Event-ID gets gateway.missed (history_off) first."""
    gateway = start_gateway()
    server, token = gateway.tokens.server(), gateway.tokens.player(21)
    assert gateway.publish(server, 21, "queued", 1).json["queued"]
    stream = open_stream(gateway, token, headers={"Last-Event-ID": "k.1.2.3"})
    notice = stream.next_event()
    assert notice.fields[0] == ("event", "gateway.missed")
    assert notice.data["recovered"] is False and notice.data["reason"] == "history_off"
    assert stream.next_event().fields == [("event", "queued"), ("data", "1")]


def test_the_offline_backlog_comes_once_with_ids(start_gateway):
    """A stream with no id yet gets what was queued while the player was offline, with ids, and only once."""
    gateway = start_gateway(*HISTORY)
    server, token = gateway.tokens.server(), gateway.tokens.player(21)
    for number in range(3):
        gateway.publish(server, 21, "n", number)
    stream = open_stream(gateway, token)
    blocks = received(stream, 3)
    assert [block.data for block in blocks] == [0, 1, 2] and all(block.get("id") for block in blocks)
    again = open_stream(gateway, token)
    gateway.publish(server, 21, "n", 3)
    assert again.next_event().data == 3


def resume_after_a_drop(gateway: GatewayUnderTest, open_resumed) -> None:
    """Player 21 with a WebSocket tab open throughout; its stream drops after message 0 and comes back with
    `open_resumed(last_id)`: it gets exactly 1-4 (broadcasts included), then live 5."""
    server, token = gateway.tokens.server(), gateway.tokens.player(21)
    other_tab = gateway.connect(token)
    stream = open_stream(gateway, token)
    gateway.publish(server, 21, "n", 0)
    last_id = stream.next_event().get("id")
    gone(gateway, stream, connections=1)
    gateway.publish(server, 21, "n", 1)
    gateway.broadcast(server, "b", 2)
    gateway.publish(server, 21, "n", 3)
    gateway.broadcast(server, "b", 4, player_id=21)
    assert [receive_event(other_tab)["payload"] for _ in range(5)] == [0, 1, 2, 3, 4]
    resumed = open_resumed(token, last_id)
    gateway.publish(server, 21, "n", 5)
    blocks = received(resumed, 5)
    assert [(block.event, block.data) for block in blocks] == [("n", 1), ("b", 2), ("n", 3), ("b", 4), ("n", 5)]
    assert len({block.get("id") for block in blocks}) == 5
    assert gateway.metric("ws_resumes_total", outcome="recovered") == 1


def test_resume_with_the_last_event_id_header(start_gateway):
    """The header an EventSource sends when it reconnects resumes the stream after that id."""
    gateway = start_gateway(*HISTORY)
    resume_after_a_drop(gateway, lambda token, last_id: open_stream(gateway, token,
                                                                     headers={"Last-Event-ID": last_id}))


def test_resume_with_the_query_form(start_gateway):
    """`last_event_id=` in the query (a page that kept the id across a reload) resumes the same way."""
    gateway = start_gateway(*HISTORY)
    resume_after_a_drop(gateway, lambda token, last_id: open_stream(gateway, token,
                                                                     f"&last_event_id={quote(last_id)}"))


def test_the_header_is_newer_than_the_query(start_gateway):
    """An EventSource opened with an old id in its URL sends a newer one in the header when it reconnects: the
    header wins."""
    gateway = start_gateway(*HISTORY)
    server, token = gateway.tokens.server(), gateway.tokens.player(21)
    stream = open_stream(gateway, token)
    for number in range(3):
        gateway.publish(server, 21, "n", number)
    first, _, latest = (block.get("id") for block in received(stream, 3))
    gone(gateway, stream)
    gateway.publish(server, 21, "n", 3)
    resumed = open_stream(gateway, token, f"&last_event_id={quote(first)}", headers={"Last-Event-ID": latest})
    assert resumed.next_event().data == 3


def test_an_id_too_old_gets_gateway_missed_then_everything_kept(start_gateway):
    """Past -history-size: event gateway.missed (recovered false, too_old, the oldest id kept), then what is kept."""
    gateway = start_gateway("-history-size", "3", "-history-ttl", "1m")
    server, token = gateway.tokens.server(), gateway.tokens.player(21)
    stream = open_stream(gateway, token)
    gateway.publish(server, 21, "n", 0)
    last_id = stream.next_event().get("id")
    gone(gateway, stream)
    for number in range(1, 6):
        gateway.publish(server, 21, "n", number)
    resumed = open_stream(gateway, token, headers={"Last-Event-ID": last_id})
    notice = resumed.next_event()
    assert notice.event == "gateway.missed" and notice.get("id") is None
    kept = received(resumed, 3)
    assert notice.data["recovered"] is False and notice.data["reason"] == "too_old"
    assert notice.data["oldest_id"] == kept[0].get("id")
    assert [block.data for block in kept] == [3, 4, 5]
    assert gateway.metric("ws_resumes_total", outcome="missed") == 1


def test_a_malformed_id_gets_gateway_missed(start_gateway):
    """An id no gateway made, in either form: gateway.missed (malformed), then everything kept, then live."""
    gateway = start_gateway(*HISTORY)
    server, token = gateway.tokens.server(), gateway.tokens.player(21)
    gateway.publish(server, 21, "n", 0)
    for stream in (open_stream(gateway, token, headers={"Last-Event-ID": "not an id\u00e9"}),
                   open_stream(gateway, token, "&last_event_id=x" * 3)):
        notice = stream.next_event()
        assert (notice.event, notice.data["reason"]) == ("gateway.missed", "malformed")
        assert stream.next_event().data == 0


def test_an_id_from_a_lost_history(start_gateway):
    """After a restart without -broker the history is gone: the old id gets gateway.missed (history_lost)."""
    gateway = start_gateway(*HISTORY)
    server, token = gateway.tokens.server(), gateway.tokens.player(21)
    stream = open_stream(gateway, token)
    gateway.publish(server, 21, "n", 0)
    last_id = stream.next_event().get("id")
    restarted = start_gateway(*HISTORY)
    notice = open_stream(restarted, token, headers={"Last-Event-ID": last_id}).next_event()
    assert (notice.event, notice.data["recovered"], notice.data["reason"]) == \
        ("gateway.missed", False, "history_lost")


def test_a_resume_racing_a_burst_of_publishes(start_gateway):
    """Publishes and broadcasts racing a stream's resume: each message exactly once, in order."""
    gateway = start_gateway("-history-size", "2000", "-history-ttl", "1m", "-rate-limit", "0")
    server, token = gateway.tokens.server(), gateway.tokens.player(21)
    stream = open_stream(gateway, token)
    gateway.publish(server, 21, "n", 0)
    last_id = stream.next_event().get("id")
    gone(gateway, stream)
    total = 400

    def burst() -> None:
        for number in range(1, total):
            reply = gateway.publish(server, 21, "n", number) if number % 5 else gateway.broadcast(server, "n", number)
            assert reply.status == 200

    publisher = gevent.spawn(burst)
    gevent.sleep(0.05)  # some published before the resume, the rest during and after it
    resumed = open_stream(gateway, token, headers={"Last-Event-ID": last_id})
    publisher.get(timeout=TIMEOUT_S * 4)
    assert [block.data for block in received(resumed, total - 1)] == list(range(1, total))
    gateway.publish(server, 21, "end", None)
    assert resumed.next_event().event == "end"  # nothing doubled was left in between


def test_a_stream_resumes_on_another_gateway(start_cluster_gateway):
    """With -broker, a stream that loses gateway A and comes back on B with its last id gets exactly what it
    missed, published through either, broadcasts included."""
    first, second = start_cluster_gateway(*HISTORY), start_cluster_gateway(*HISTORY)
    server, token = first.tokens.server(), first.tokens.player(21)
    stream = open_stream(first, token)
    first.publish(server, 21, "n", 0)
    last_id = stream.next_event().get("id")
    gone(first, stream)
    wait_for(lambda: second.request("GET", "/presence?player_id=21", headers={"Authorization": f"Bearer {server}"})
             .json["connections"] == 0, what="the cluster to see the player gone")
    first.publish(server, 21, "n", 1)
    second.broadcast(server, "b", 2)
    second.publish(server, 21, "n", 3)
    resumed = open_stream(second, token, headers={"Last-Event-ID": last_id})
    second.publish(server, 21, "n", 4)
    assert [(block.event, block.data) for block in received(resumed, 4)] == [("n", 1), ("b", 2), ("n", 3), ("n", 4)]
