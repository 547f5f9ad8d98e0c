"""A Redis Cluster master killed under traffic: two in-process gateways follow the promoted
replica, answer 503 (or `scope: local`) only while the cluster switches, and every 200
answered outside the switch reaches its player, who stayed connected. The cluster is this
test's own, since it kills one of its nodes."""
from __future__ import annotations

import time
from typing import Any, Iterator, NamedTuple

import gevent
import gevent.event
import pytest

from tests.support import TIMEOUT_S, wait_for
from tests.support.redis_cluster import FORMING_TIMEOUT_S, RedisCluster
from tests.test_cluster_faults import receive_event_forever
from wsgateway.redis_link import RedisKeys

PLAYERS_PER_SIDE = 3  # on the killed master's shards, and as many elsewhere


class Answer(NamedTuple):
    sent_at: float  # time.monotonic()
    answered_at: float
    status: int
    body: Any

    @property
    def accepted(self) -> bool:
        """A 200 for the cluster: not `scope: local`."""
        return self.status == 200 and self.body.get("scope") != "local"


@pytest.fixture
def own_cluster(tmp_path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path / "cluster")
    cluster.start()
    yield cluster
    cluster.stop()


def players_by_master(cluster: RedisCluster, keys: RedisKeys, master: int) -> tuple[list[int], list[int]]:
    """Player ids whose keys live on `master`, and as many whose keys live elsewhere."""
    there: list[int] = []
    elsewhere: list[int] = []
    for player in range(21, 2000):
        side = there if cluster.master_of(keys.seats(str(player))) == master else elsewhere
        if len(side) < PLAYERS_PER_SIDE:
            side.append(player)
        if len(there) == len(elsewhere) == PLAYERS_PER_SIDE:
            return there, elsewhere
    raise AssertionError("no players found on both sides")


def test_a_killed_master_is_followed_and_no_message_answered_200_outside_the_switch_is_lost(
        own_cluster, start_cluster_gateway, redis_prefix):
    """Kill the master holding the players' gateway's stream (and some players' keys) while
    publishers publish: only 503 or scope local during the switch, nothing else; every 200
    outside it reaches the connected player, in order, once; the time to recover is printed."""
    flags = ("-rate-limit", "0")  # the default -presence-ttl (15s): well above the switch
    publisher_side = start_cluster_gateway(*flags, broker_url=own_cluster.url)
    player_side = start_cluster_gateway(*flags, broker_url=own_cluster.url)
    keys = RedisKeys(redis_prefix, cluster=True)
    doomed = own_cluster.master_of(keys.stream(player_side.gateway.gateway_id))
    there, elsewhere = players_by_master(own_cluster, keys, doomed)
    server = publisher_side.tokens.server()
    clients = {player: player_side.connect(publisher_side.tokens.player(player)) for player in there + elsewhere}
    received: dict[int, list[int]] = {player: [] for player in clients}
    answers: dict[int, list[Answer]] = {player: [] for player in clients}
    stop = gevent.event.Event()

    def read(player: int) -> None:
        while True:
            received[player].append(receive_event_forever(clients[player])["payload"])

    def publish(player: int) -> None:
        for number in range(1_000_000):
            if stop.is_set():
                return
            gateway = publisher_side if number % 2 else player_side  # both gateways publish
            sent_at = time.monotonic()
            reply = gateway.publish(server, player, "n", number)
            answers[player].append(Answer(sent_at, time.monotonic(), reply.status, reply.json))
            gevent.sleep(0.01)

    jobs = [gevent.spawn(read, player) for player in clients] + [gevent.spawn(publish, player) for player in clients]
    try:
        wait_for(lambda: all(len(replies) >= 20 for replies in answers.values()), what="traffic before the kill")
        killed_at = time.monotonic()
        own_cluster.kill(doomed)
        failover_s = own_cluster.wait_failed_over(doomed)
        # recovered: every publisher's last two seconds of answers are accepted
        wait_for(lambda: all(replies[-1].answered_at - killed_at > failover_s + 2 and
                             all(answer.accepted for answer in replies if answer.sent_at > replies[-1].sent_at - 2)
                             for replies in answers.values()),
                 FORMING_TIMEOUT_S, what="every publisher answered 200 again for two seconds")
        stop.set()
        gevent.joinall(jobs[len(clients):], timeout=TIMEOUT_S)
        every = [answer for replies in answers.values() for answer in replies]
        refused = [answer for answer in every if not answer.accepted]
        assert all(answer.status in (200, 503) for answer in every), {answer.status for answer in every}
        switch_ends_at = max((answer.answered_at for answer in refused), default=killed_at)
        print(f"\nfailover: replica promoted after {failover_s:.1f}s; 503 or scope local for "
              f"{switch_ends_at - killed_at:.1f}s after the kill ({len(refused)} of {len(every)} answers)")
        assert refused, "the kill was noticed"
        assert all(answer.answered_at >= killed_at for answer in refused), "nothing refused before the kill"

        def owed(player: int) -> list[int]:
            return [number for number, answer in enumerate(answers[player]) if answer.accepted and
                    (answer.answered_at < killed_at or answer.sent_at > switch_ends_at)]
        wait_for(lambda: all(set(owed(player)) <= set(received[player]) for player in clients), TIMEOUT_S * 2,
                 what="every message answered 200 outside the switch at its player")
        for player in clients:  # (scope local ones may overtake what waited in a stream meanwhile)
            kept = set(owed(player))
            in_order = [number for number in received[player] if number in kept]
            assert in_order == sorted(in_order), f"player {player}: in publish order"
            assert len(received[player]) == len(set(received[player])), f"player {player}: none twice"
        assert all(client.connected for client in clients.values()), "players stayed connected"
        assert player_side.get("/readyz").status == 200
    finally:
        stop.set()
        gevent.killall(jobs)
