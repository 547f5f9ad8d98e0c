"""Resumable streams over WebSocket (-history-size): ids on request, replay after an id,
`gateway.missed` when an id cannot be honoured, and today's frames for everyone else."""
from __future__ import annotations

import json
from urllib.parse import quote

import gevent
import gevent.event
import websocket

from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import receive_close, receive_event

HISTORY = ("-history-size", "50", "-history-ttl", "1m")


def resume(last_id: str) -> str:
    return f"&last_event_id={quote(last_id)}"


def events(client: websocket.WebSocket, count: int) -> list[dict]:
    return [receive_event(client) for _ in range(count)]


def test_frames_without_the_parameter_are_byte_for_byte_todays(start_gateway):
    """A client that does not ask for ids gets exactly the legacy frames, history on or off."""
    frames = {}
    for flags in ((), HISTORY):
        gateway = start_gateway(*flags)
        server = gateway.tokens.server()
        client = gateway.connect(gateway.tokens.player(21))
        gateway.publish(server, 21, "score", {"points": 5, "who": "ü"})
        gateway.broadcast(server, "round", None)
        frames[flags] = [client.recv(), client.recv()]
    assert frames[()] == frames[HISTORY] == ['{"event":"score","payload":{"points":5,"who":"ü"}}',
                                             '{"event":"round","payload":null}']


def test_an_empty_last_event_id_gets_ids_as_the_last_key(start_gateway):
    """`last_event_id=` gets every frame with `id` appended, player messages and broadcasts."""
    gateway = start_gateway(*HISTORY)
    server = gateway.tokens.server()
    client = gateway.connect(gateway.tokens.player(21), resume(""))
    gateway.publish(server, 21, "score", {"points": 5})
    gateway.broadcast(server, "round", None)
    first, second = client.recv(), client.recv()
    assert first.startswith('{"event":"score","payload":{"points":5},"id":"') and first.endswith('"}')
    assert list(json.loads(second)) == ["event", "payload", "id"]
    assert json.loads(first)["id"] != json.loads(second)["id"]


def test_an_empty_last_event_id_gets_the_offline_backlog_with_ids(start_gateway):
    """What was queued while the player was offline arrives once, with ids, in order."""
    gateway = start_gateway(*HISTORY)
    server = gateway.tokens.server()
    for number in range(3):
        gateway.publish(server, 21, "n", number)
    client = gateway.connect(gateway.tokens.player(21), resume(""))
    received = events(client, 3)
    assert [event["payload"] for event in received] == [0, 1, 2] and all("id" in event for event in received)
    again = gateway.connect(gateway.tokens.player(21), resume(""))
    gateway.publish(server, 21, "n", 3)
    assert receive_event(again)["payload"] == 3  # the backlog went once


def test_resume_after_a_drop_while_another_tab_stays_open(start_gateway):
    """A tab that drops and comes back with its last id gets exactly what it missed,
    broadcasts included, in live order, while the other tab saw it all live."""
    gateway = start_gateway(*HISTORY)
    server = gateway.tokens.server()
    token = gateway.tokens.player(21)
    other_tab = gateway.connect(token)
    tab = gateway.connect(token, resume(""))
    gateway.publish(server, 21, "n", 0)
    last_id = receive_event(tab)["id"]
    tab.close()
    wait_for(lambda: gateway.metric("ws_active_connections") == 1, what="the tab to go")
    gateway.publish(server, 21, "n", 1)
    gateway.broadcast(server, "b", 2)
    gateway.publish(server, 21, "n", 3)
    gateway.broadcast(server, "b", 4, player_id=21)
    assert [event["payload"] for event in events(other_tab, 5)] == [0, 1, 2, 3, 4]
    tab = gateway.connect(token, resume(last_id))
    gateway.publish(server, 21, "n", 5)
    resumed = events(tab, 5)
    assert [event["payload"] for event in resumed] == [1, 2, 3, 4, 5]
    assert len({event["id"] for event in resumed}) == 5
    assert gateway.metric("ws_resumes_total", outcome="recovered") == 1


def test_resume_from_a_broadcast_id(start_gateway):
    """The id of a broadcast (the same frame for every player) resumes this player's stream."""
    gateway = start_gateway(*HISTORY)
    server = gateway.tokens.server()
    token = gateway.tokens.player(21)
    tab = gateway.connect(token, resume(""))
    gateway.publish(server, 21, "n", 0)
    gateway.broadcast(server, "b", 1)
    received = events(tab, 2)
    tab.close()
    wait_for(lambda: gateway.metric("ws_active_connections") == 0, what="the tab to go")
    gateway.publish(server, 21, "n", 2)
    gateway.broadcast(server, "b", 3)
    tab = gateway.connect(token, resume(received[1]["id"]))
    assert [event["payload"] for event in events(tab, 2)] == [2, 3]


def test_resume_racing_a_burst_of_publishes(start_gateway):
    """Publishes and broadcasts racing a resume: each message exactly once, in order."""
    gateway = start_gateway(*("-history-size", "2000", "-history-ttl", "1m", "-rate-limit", "0"))
    server = gateway.tokens.server()
    token = gateway.tokens.player(21)
    watcher = gateway.connect(token)
    tab = gateway.connect(token, resume(""))
    gateway.publish(server, 21, "n", 0)
    last_id = receive_event(tab)["id"]
    tab.close()
    wait_for(lambda: gateway.metric("ws_active_connections") == 1, what="the tab to go")
    total = 400

    def burst() -> None:
        for number in range(1, total):
            reply = gateway.publish(server, 21, "n", number) if number % 5 else gateway.broadcast(server, "n", number)
            assert reply.status == 200

    publisher = gevent.spawn(burst)
    gevent.sleep(0.05)  # some published before the resume, the rest during and after it
    tab = gateway.connect(token, resume(last_id))
    publisher.get(timeout=TIMEOUT_S * 4)
    numbers = [event["payload"] for event in events(tab, total - 1)]
    assert numbers == list(range(1, total))
    assert [event["payload"] for event in events(watcher, total)] == list(range(total))
    gateway.publish(server, 21, "end", None)
    assert receive_event(tab)["event"] == "end"  # nothing doubled was left in between


def test_an_id_too_old_gets_the_missed_notice_then_everything_kept(start_gateway):
    """Past -history-size the id cannot be honoured: gateway.missed, then what is kept."""
    gateway = start_gateway("-history-size", "3", "-history-ttl", "1m")
    server = gateway.tokens.server()
    token = gateway.tokens.player(21)
    tab = gateway.connect(token, resume(""))
    gateway.publish(server, 21, "n", 0)
    last_id = receive_event(tab)["id"]
    tab.close()
    wait_for(lambda: gateway.metric("ws_active_connections") == 0, what="the tab to go")
    for number in range(1, 6):
        gateway.publish(server, 21, "n", number)
    tab = gateway.connect(token, resume(last_id))
    notice = receive_event(tab)
    kept = events(tab, 3)
    assert notice["event"] == "gateway.missed" and notice["payload"]["recovered"] is False
    assert notice["payload"]["reason"] == "too_old" and notice["payload"]["oldest_id"] == kept[0]["id"]
    assert [event["payload"] for event in kept] == [3, 4, 5]
    assert gateway.metric("ws_resumes_total", outcome="missed") == 1


def test_an_id_from_a_lost_history(start_gateway):
    """An id from another gateway life (a restart without -broker) is not honoured."""
    first = start_gateway(*HISTORY)
    server = first.tokens.server()
    tab = first.connect(first.tokens.player(21), resume(""))
    first.publish(server, 21, "n", 0)
    last_id = receive_event(tab)["id"]
    second = start_gateway(*HISTORY, database_url=first.gateway.config.database_url)
    second.publish(server, 21, "n", 1)
    tab = second.connect(second.tokens.player(21), resume(last_id))
    notice = receive_event(tab)
    assert notice["payload"]["recovered"] is False and notice["payload"]["reason"] == "history_lost"
    assert receive_event(tab)["payload"] == 1


def test_a_malformed_id(start_gateway):
    """An id no gateway made: gateway.missed (malformed), then everything kept, then live."""
    gateway = start_gateway(*HISTORY)
    server = gateway.tokens.server()
    gateway.publish(server, 21, "n", 0)
    tab = gateway.connect(gateway.tokens.player(21), resume("not an id" * 20))
    notice = receive_event(tab)
    assert notice["payload"]["reason"] == "malformed"
    assert receive_event(tab)["payload"] == 0
    gateway.publish(server, 21, "n", 1)
    assert receive_event(tab)["payload"] == 1


def test_an_honoured_id_sends_no_notice(start_gateway):
    """Resuming from the latest id with nothing missed sends nothing before live frames."""
    gateway = start_gateway(*HISTORY)
    server = gateway.tokens.server()
    token = gateway.tokens.player(21)
    tab = gateway.connect(token, resume(""))
    gateway.publish(server, 21, "n", 0)
    last_id = receive_event(tab)["id"]
    tab = gateway.connect(token, resume(last_id))
    gateway.publish(server, 21, "n", 1)
    assert receive_event(tab)["payload"] == 1


def test_without_history_a_resume_is_told_so(start_gateway):
    """-history-size 0: a resume gets gateway.missed (history_off) and today's frames."""
    gateway = start_gateway()
    server = gateway.tokens.server()
    tab = gateway.connect(gateway.tokens.player(21), resume("abc.1"))
    assert receive_event(tab)["payload"]["reason"] == "history_off"
    gateway.publish(server, 21, "n", 1)
    assert tab.recv() == '{"event":"n","payload":1}'


# --- with -broker: the history in Redis, ids per player across the cluster -----------------

def test_cluster_frames_without_the_parameter_are_byte_for_byte_todays(start_cluster_gateway):
    """With -broker and a history, a client without ids gets exactly the legacy frames."""
    first, second = start_cluster_gateway(*HISTORY), start_cluster_gateway(*HISTORY)
    server = first.tokens.server()
    client = second.connect(first.tokens.player(21))
    with_ids = second.connect(first.tokens.player(21), resume(""))
    first.publish(server, 21, "score", {"points": 5})
    first.broadcast(server, "round", None)
    assert [client.recv(), client.recv()] == ['{"event":"score","payload":{"points":5}}',
                                              '{"event":"round","payload":null}']
    stamped = [json.loads(with_ids.recv()) for _ in range(2)]
    assert [list(event) for event in stamped] == [["event", "payload", "id"]] * 2


def test_resume_on_another_gateway_gets_exactly_what_was_missed(start_cluster_gateway):
    """A player that loses gateway A resumes on gateway B with its last id: what it
    missed, published through either gateway, broadcasts included, then live."""
    first, second = start_cluster_gateway(*HISTORY), start_cluster_gateway(*HISTORY)
    server = first.tokens.server()
    token = first.tokens.player(21)
    other_tab = second.connect(token)
    tab = first.connect(token, resume(""))
    first.publish(server, 21, "n", 0)
    last_id = receive_event(tab)["id"]
    tab.close()
    wait_for(lambda: first.metric("ws_active_connections") == 0, what="the tab to go")
    first.publish(server, 21, "n", 1)
    second.broadcast(server, "b", 2)
    second.publish(server, 21, "n", 3)
    first.broadcast(server, "b", 4, player_id=21)
    assert [event["payload"] for event in events(other_tab, 5)] == [0, 1, 2, 3, 4]
    tab = second.connect(token, resume(last_id))
    first.publish(server, 21, "n", 5)
    resumed = events(tab, 5)
    assert [event["payload"] for event in resumed] == [1, 2, 3, 4, 5]
    assert second.metric("ws_resumes_total", outcome="recovered") == 1


def test_cluster_resume_racing_a_burst_of_publishes(start_cluster_gateway):
    """Publishes and broadcasts through two gateways racing a resume on a third: each
    message exactly once, in order."""
    flags = ("-history-size", "2000", "-history-ttl", "1m", "-rate-limit", "0")
    gateways = [start_cluster_gateway(*flags) for _ in range(2)]
    server = gateways[0].tokens.server()
    token = gateways[0].tokens.player(21)
    tab = gateways[0].connect(token, resume(""))
    gateways[0].publish(server, 21, "n", 0)
    last_id = receive_event(tab)["id"]
    tab.close()
    wait_for(lambda: gateways[0].metric("ws_active_connections") == 0, what="the tab to go")
    total = 300

    def burst() -> None:
        for number in range(1, total):
            gateway = gateways[number % 2]
            reply = gateway.publish(server, 21, "n", number) if number % 5 else gateway.broadcast(server, "n", number)
            assert reply.status == 200

    publisher = gevent.spawn(burst)
    gevent.sleep(0.05)
    tab = gateways[1].connect(token, resume(last_id))
    publisher.get(timeout=TIMEOUT_S * 6)
    assert [event["payload"] for event in events(tab, total - 1)] == list(range(1, total))
    gateways[0].publish(server, 21, "end", None)
    assert receive_event(tab)["event"] == "end"


def test_a_resume_is_not_sent_again_what_its_gateways_reader_hands_over_late(start_cluster_gateway, monkeypatch):
    """Messages already in this gateway's stream when the replay was read, but handed over
    by its reader only after the connection was released (a reader that fell behind, under
    load), are not sent twice: the replay carried them. Later ones still come, once."""
    first, second = start_cluster_gateway(*HISTORY), start_cluster_gateway(*HISTORY)
    server = first.tokens.server()
    token = first.tokens.player(21)
    other_tab = second.connect(token)  # the player's messages go to the second gateway's stream
    tab = first.connect(token, resume(""))
    first.publish(server, 21, "n", 0)
    last_id = receive_event(tab)["id"]
    assert receive_event(other_tab)["payload"] == 0
    tab.close()
    wait_for(lambda: first.metric("ws_active_connections") == 0, what="the tab to go")
    broker = second.gateway.broker
    hand_over, reader_may_go = broker._deliver, gevent.event.Event()
    monkeypatch.setattr(broker, "_deliver", lambda envelope: reader_may_go.wait(TIMEOUT_S) and hand_over(envelope))
    first.publish(server, 21, "n", 1)  # in the second gateway's stream, its reader held back
    first.broadcast(server, "b", 2)
    tab = second.connect(token, resume(last_id))
    assert [event["payload"] for event in events(tab, 2)] == [1, 2]  # the replay
    reader_may_go.set()
    assert [event["payload"] for event in events(other_tab, 2)] == [1, 2]  # what the reader brought, live
    first.publish(server, 21, "n", 3)
    assert receive_event(tab)["payload"] == 3


def test_cluster_offline_backlog_comes_once_with_ids(start_cluster_gateway):
    """Queued while offline through one gateway, received on another with an empty id:
    once, with ids; a resume from the last of them then gets only what came after."""
    first, second = start_cluster_gateway(*HISTORY), start_cluster_gateway(*HISTORY)
    server = first.tokens.server()
    token = first.tokens.player(21)
    for number in range(3):
        assert first.publish(server, 21, "n", number).json["queued"] is True
    tab = second.connect(token, resume(""))
    backlog = events(tab, 3)
    assert [event["payload"] for event in backlog] == [0, 1, 2]
    tab.close()
    wait_for(lambda: second.metric("ws_active_connections") == 0, what="the tab to go")
    first.publish(server, 21, "n", 3)
    tab = first.connect(token, resume(backlog[-1]["id"]))
    assert receive_event(tab)["payload"] == 3


def test_cluster_ids_from_a_lost_redis_history(start_gateway, private_redis):
    """Redis restarted without persistence: the old id is from a lost history."""
    flags = ("-broker", private_redis.url, *HISTORY)
    gateway = start_gateway(*flags)
    server = gateway.tokens.server()
    token = gateway.tokens.player(21)
    tab = gateway.connect(token, resume(""))
    gateway.publish(server, 21, "n", 0)
    last_id = receive_event(tab)["id"]
    tab.close()
    wait_for(lambda: gateway.metric("ws_active_connections") == 0, what="the tab to go")
    private_redis.stop()
    private_redis.start()
    wait_for(lambda: gateway.publish(server, 21, "n", 1).status == 200, what="the gateway back on redis")
    tab = gateway.connect(token, resume(last_id))
    notice = receive_event(tab)
    assert notice["payload"]["recovered"] is False and notice["payload"]["reason"] == "history_lost"
    assert [event["payload"] for event in events(tab, 1)] == [1]


def test_cluster_too_old_and_malformed(start_cluster_gateway):
    """With -broker too: an id past -history-size is too old, a malformed one is malformed."""
    gateway = start_cluster_gateway("-history-size", "2", "-history-ttl", "1m")
    server = gateway.tokens.server()
    token = gateway.tokens.player(21)
    tab = gateway.connect(token, resume(""))
    gateway.publish(server, 21, "n", 0)
    last_id = receive_event(tab)["id"]
    tab.close()
    wait_for(lambda: gateway.metric("ws_active_connections") == 0, what="the tab to go")
    for number in range(1, 5):
        gateway.publish(server, 21, "n", number)
    tab = gateway.connect(token, resume(last_id))
    assert receive_event(tab)["payload"]["reason"] == "too_old"
    assert [event["payload"] for event in events(tab, 2)] == [3, 4]
    other = gateway.connect(token, resume("zz.1.2"))
    assert receive_event(other)["payload"]["reason"] == "malformed"


def test_disconnect_with_a_history_keeps_nothing(start_gateway, start_cluster_gateway):
    """POST /disconnect is not a message: nothing is kept, a resume after it gets nothing."""
    for gateway in (start_gateway(*HISTORY), start_cluster_gateway(*HISTORY)):
        server = gateway.tokens.server()
        token = gateway.tokens.player(21)
        tab = gateway.connect(token, resume(""))
        gateway.publish(server, 21, "n", 0)
        last_id = receive_event(tab)["id"]
        assert gateway.post("/disconnect", {"player_id": 21}, token=server).json == {"disconnected": 1}
        assert receive_close(tab)[0] == 4002
        wait_for(lambda: gateway.metric("ws_active_connections") == 0, what="the tab to go")
        tab = gateway.connect(token, resume(last_id))
        gateway.publish(server, 21, "n", 1)
        assert receive_event(tab)["payload"] == 1


def test_queued_messages_come_once_to_a_resume(start_gateway, start_cluster_gateway):
    """Offline, its messages queued: a resume gets them once, from the history, and the
    offline queue is empty afterwards (a connection without ids gets nothing of them)."""
    for gateway in (start_gateway(*HISTORY), start_cluster_gateway(*HISTORY)):
        server = gateway.tokens.server()
        token = gateway.tokens.player(21)
        tab = gateway.connect(token, resume(""))
        gateway.publish(server, 21, "n", 0)
        last_id = receive_event(tab)["id"]
        tab.close()
        wait_for(lambda: gateway.metric("ws_active_connections") == 0, what="the tab to go")
        assert all(gateway.publish(server, 21, "n", number).json["queued"] for number in (1, 2))
        tab = gateway.connect(token, resume(last_id))
        assert [event["payload"] for event in events(tab, 2)] == [1, 2]
        legacy = gateway.connect(token)
        gateway.publish(server, 21, "n", 3)
        assert receive_event(legacy)["payload"] == 3
        assert receive_event(tab)["payload"] == 3
        tab.close()
        legacy.close()
        wait_for(lambda: gateway.metric("ws_active_connections") == 0, what="both to go")
