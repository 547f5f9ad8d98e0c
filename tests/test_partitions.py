"""Real network partitions: two gateway processes, each in its own network namespace, and
Redis in a third, joined by a router namespace (`tests/support/netns.py`). One gateway is
cut off from Redis (packets silently dropped, or its link down) while its players stay
connected and publishers on both sides keep publishing; then the network heals.

What is checked is the outage table of docs/scale-out.md: during the cut the cut-off
gateway answers `scope: local` for its own players and 503 for the others, within its
timeouts, its players stay connected and keep receiving its local messages, the other
gateway serves as usual; after the heal the cut-off gateway is ready again and counted in
presence, and every message answered 200 without `scope: local` reached as many of the
player's connections as the answer said, once each, in publish order."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import gevent
import gevent.event
import pytest
import websocket

from tests.support import TIMEOUT_S, wait_for
from tests.support.gateways import TokenTable
from tests.support.netns import (REDIS_PORT, LabGateway, LabRedis, NetworkLab, namespaces_of, unacknowledged_bytes,
                                  unavailable_reason)
from tests.support.clients import receive_event
from wsgateway.tokens import SqlTokenStore

DB_TIMEOUT_S = 1.0
PRESENCE_TTL_S = 3.0
GATEWAY_FLAGS = ("-db-timeout", f"{DB_TIMEOUT_S:g}s", "-presence-ttl", f"{PRESENCE_TTL_S:g}s",
                 "-offline-ttl", "60s", "-max-queued", "10000", "-rate-limit", "0", "-max-conns", "0")
# Long enough for the cut-off gateway's presence, its broadcast registration and its
# stream's idle expiry (each a -presence-ttl after its last refresh) to run out.
CUT_HOLD_S = 2.5 * PRESENCE_TTL_S
# The longest a publish may take on the cut-off gateway: a few Redis calls, each bounded by
# -db-timeout, and the machine's load.
SLOWEST_ANSWER_S = 4 * DB_TIMEOUT_S + TIMEOUT_S


@pytest.fixture
def lab() -> Iterator[NetworkLab]:
    """A network of namespaces made for this test; always removed, also when it fails."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    made = NetworkLab()
    try:
        yield made
    finally:
        made.close()
        assert namespaces_of(made.tag) == [], "the lab left namespaces behind"


class Player:
    """One WebSocket connection, read by a greenlet: every message's (publisher, number)."""

    def __init__(self, client: websocket.WebSocket, label: str) -> None:
        self.client = client
        self.label = label
        self.received: list[tuple[str, int]] = []  # (publisher, number), or (event, 0) for other events
        self.closed: str | None = None
        self._reader = gevent.spawn(self._read)

    def _read(self) -> None:
        while True:
            try:
                event = receive_event(self.client)
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError) as exc:
                self.closed = f"{type(exc).__name__}: {exc}"
                return
            payload = event["payload"]
            self.received.append((payload["from"], payload["n"]) if isinstance(payload, dict) else (event["event"], 0))

    def count(self, message: tuple[str, int]) -> int:
        return self.received.count(message)

    def stop(self) -> None:
        self._reader.kill()
        self.client.shutdown()


@dataclass
class Answer:
    publisher: str
    n: int
    player: int | None  # None: a broadcast
    at: float  # time.monotonic() when sent
    took_s: float
    status: int | None  # None: no answer (the request failed)
    body: Any


@dataclass
class Publisher:
    """Publishes numbered messages through one gateway, in turn to each player and, every
    tenth, a broadcast; one request at a time, keeping every answer."""

    name: str
    gateway: LabGateway
    token: str
    players: list[int]
    answers: list[Answer] = field(default_factory=list)

    def run(self, stop: gevent.event.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            player = None if n % 10 == 0 else self.players[n % len(self.players)]
            message = {"event": "m", "payload": {"from": self.name, "n": n}}
            path = "/broadcast" if player is None else "/publish"
            if player is not None:
                message["player_id"] = player
            started = time.monotonic()
            try:
                status, body = self.gateway.request("POST", path, message, self.token,
                                                    timeout_s=SLOWEST_ANSWER_S + TIMEOUT_S)
            except OSError as exc:
                status, body = None, f"{type(exc).__name__}: {exc}"
            self.answers.append(Answer(self.name, n, player, started, time.monotonic() - started, status, body))
            gevent.sleep(0.02)

    def during(self, start: float, end: float) -> list[Answer]:
        """The answers to requests sent at `start` or later and answered before `end`."""
        return [answer for answer in self.answers if start <= answer.at and answer.at + answer.took_s < end]


class PartitionedCluster:
    """Gateways `a` and `b` on hosts of their own, Redis on a third; players 1 on a, 2 on b,
    3 on both; a publisher on each side."""

    def __init__(self, lab: NetworkLab, directory: Path) -> None:
        self.lab = lab
        self.hosts = {name: lab.add_host(name) for name in ("a", "b", "redis")}
        self.redis = LabRedis(self.hosts["redis"], directory)
        database = directory / "tokens.db"
        store = SqlTokenStore(f"sqlite:///{database}", db_timeout_s=TIMEOUT_S, cache_period_s=60)
        store.ensure_schema()
        store.close()
        self.tokens = TokenTable(f"sqlite:///{database}")
        self.gateways: dict[str, LabGateway] = {}
        for name in ("a", "b"):
            home = directory / f"gateway-{name}"
            home.mkdir()
            self.gateways[name] = LabGateway(self.hosts[name], home, "-dsn", f"file:{database}",
                                             "-broker", self.redis.url, *GATEWAY_FLAGS)
        for gateway in self.gateways.values():
            gateway.wait_ready()
        self.players: dict[int, list[Player]] = {}
        self.publishers: list[Publisher] = []

    def connect(self, player_id: int, side: str) -> Player:
        client = self.gateways[side].websocket(self.tokens.player(player_id))
        player = Player(client, f"{player_id}@{side}")
        self.players.setdefault(player_id, []).append(player)
        return player

    def census(self, side: str) -> Any:
        return self.gateways[side].request("GET", "/presence", token=self.server_token)[1]

    @property
    def server_token(self) -> str:
        if not hasattr(self, "_server_token"):
            self._server_token = self.tokens.server()
        return self._server_token

    def close(self) -> None:
        for connections in self.players.values():
            for player in connections:
                player.stop()
        self.tokens.engine.dispose()


@pytest.fixture
def partitioned(lab, tmp_path) -> Iterator[PartitionedCluster]:
    cluster = PartitionedCluster(lab, tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()


def elapsed_until(condition, since: float, timeout_s: float, what: str) -> float:
    wait_for(condition, timeout_s, what=what)
    return time.monotonic() - since


def expected_receivers(cluster: PartitionedCluster, answer: Answer) -> tuple[list[Player], int] | None:
    """The connections an answer promises the message to and how many of them get it, or
    None when it promises nothing (503, no answer)."""
    if answer.status != 200:
        return None
    body = answer.body
    everyone = [player for connections in cluster.players.values() for player in connections]
    targets = everyone if answer.player is None else cluster.players[answer.player]
    if body.get("scope") == "local":  # only the answering gateway's own connections
        targets = [player for player in targets if player.label.endswith(f"@{answer.publisher}")]
    if body.get("queued"):
        return targets, 1
    return targets, body["delivered"]


class Audit:
    """Every answer against what each connection received, once every promised message
    arrived (or a deadline passed: what is missing is then reported).

    Allowed, as documented: a publish in flight as the link dropped, taken by Redis but its
    reply lost, is answered 503 or `scope: local` and yet reaches the player through Redis
    (the local connections then get it twice); a broadcast may reach more connections than
    its `delivered`; across the heal a broadcast may overtake a message to one player, so
    order is checked per publisher for each kind apart."""

    def __init__(self, cluster: PartitionedCluster, answers: list[Answer], cut_at: float, cut_done_at: float,
                 heal_at: float) -> None:
        self.cluster, self.answers, self.cut_at, self.heal_at = cluster, answers, cut_at, heal_at
        self.connections = [player for connections in cluster.players.values() for player in connections]
        self.in_flight = {(answer.publisher, answer.n) for answer in answers
                          if answer.at < cut_done_at and answer.at + answer.took_s > cut_at}
        settle_by = time.monotonic() + 4 * TIMEOUT_S
        while not self._settled() and time.monotonic() < settle_by:
            gevent.sleep(0.05)
        self.lost: list[str] = []  # received by fewer (or more) connections than the answer said
        self.unasked: list[str] = []  # refused, and received all the same
        self.twice: list[tuple[str, int]] = []
        self.overreached: list[tuple[str, int]] = []
        for answer in answers:
            self._check(answer)
        self.disordered = [disorder for player in self.connections for disorder in self._disorder(player)]

    def _settled(self) -> bool:
        for answer in self.answers:
            promised = expected_receivers(self.cluster, answer)
            if promised is not None:
                targets, count = promised
                if sum(player.count((answer.publisher, answer.n)) for player in targets) < count:
                    return False
        return True

    def _describe(self, answer: Answer) -> str:
        return (f"{answer.publisher}{answer.n} to {answer.player} at {answer.at - self.cut_at:+.2f}s "
                f"(heal at {self.heal_at - self.cut_at:.2f}s): {answer.status} {answer.body}")

    def _check(self, answer: Answer) -> None:
        message = (answer.publisher, answer.n)
        promised = expected_receivers(self.cluster, answer)
        if promised is None:
            if message not in self.in_flight and any(player.count(message) for player in self.connections):
                self.unasked.append(self._describe(answer))
            return
        targets, count = promised
        received = sum(player.count(message) for player in targets)
        if message in self.in_flight and answer.body.get("scope") == "local" and received == 2 * count:
            self.twice.append(message)
        elif received > count and answer.player is None:
            self.overreached.append(message)
        elif received != count:
            self.lost.append(f"{self._describe(answer)}, received by "
                             f"{[player.label for player in targets if player.count(message)]}")

    def _disorder(self, player: Player) -> Iterator[str]:
        for publisher, broadcasts in itertools.product(("a", "b"), (False, True)):
            numbers = [n for source, n in player.received
                       if source == publisher and (n % 10 == 0) == broadcasts and (source, n) not in self.twice]
            if numbers != sorted(set(numbers)):
                wrong = next(index for index in range(1, len(numbers)) if numbers[index] <= numbers[index - 1])
                yield f"{player.label} from {publisher}: {numbers[max(0, wrong - 5):wrong + 5]}"

    def problems(self) -> list[str]:
        closed = [f"{player.label} closed: {player.closed}" for player in self.connections if player.closed]
        return closed + [f"lost or miscounted: {line}" for line in self.lost] + \
            [f"doubled or out of order: {line}" for line in self.disordered] + \
            [f"refused but received: {line}" for line in self.unasked]


@pytest.mark.parametrize("how", ["drop", "link"])
def test_a_gateway_cut_off_from_redis_keeps_its_players_and_loses_no_accepted_message(partitioned, how):
    """Cut off from Redis (dropped packets or link down) and healed: the outage table's answers, no 200 lost."""
    cluster = partitioned
    lab, cut_side, other_side = cluster.lab, cluster.gateways["a"], cluster.gateways["b"]
    for player_id, side in ((1, "a"), (2, "b"), (3, "a"), (3, "b")):
        cluster.connect(player_id, side)
    wait_for(lambda: cluster.census("b") == {"players": 3, "connections": 4}, what="every connection counted")

    stop = gevent.event.Event()
    cluster.publishers = [Publisher(side, cluster.gateways[side], cluster.server_token, [1, 2, 3])
                          for side in ("a", "b")]
    publishing = [gevent.spawn(publisher.run, stop) for publisher in cluster.publishers]
    try:
        wait_for(lambda: all(len(publisher.answers) >= 10 for publisher in cluster.publishers),
                 what="both publishers under way")

        cut_at = time.monotonic()
        lab.cut(cluster.hosts["a"], how)
        cut_done_s = time.monotonic() - cut_at
        detect_s = elapsed_until(lambda: not cut_side.ready(), cut_at, 4 * TIMEOUT_S,
                                 "the cut-off gateway not ready")
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            cut_side.websocket(cluster.tokens.player(4), timeout_s=SLOWEST_ANSWER_S)
        assert refused.value.status_code == 503
        offline_s = elapsed_until(
            lambda: other_side.request("GET", "/presence?player_id=1", token=cluster.server_token)[1]
            == {"player_id": "1", "connections": 0},
            cut_at, PRESENCE_TTL_S + 4 * TIMEOUT_S, "the cut-off gateway's players expired")
        gevent.sleep(max(0.0, cut_at + CUT_HOLD_S - time.monotonic()))  # the rest of the cut

        heal_at = time.monotonic()
        lab.heal(cluster.hosts["a"], how)
        ready_s = elapsed_until(cut_side.ready, heal_at, 4 * TIMEOUT_S, "the healed gateway ready")
        whole_s = elapsed_until(lambda: cluster.census("b") == {"players": 3, "connections": 4}, heal_at,
                                4 * TIMEOUT_S, "the healed gateway's connections counted again")
        wait_for(lambda: any(answer.player == 1 and answer.body == {"delivered": 1, "queued": False}
                             for answer in cluster.publishers[1].during(heal_at + whole_s, float("inf"))),
                 what="a publish through b routed to player 1 on a again")
    finally:
        stop.set()
        gevent.joinall(publishing, timeout=2 * SLOWEST_ANSWER_S)
    ended_at = time.monotonic()

    answers = [answer for publisher in cluster.publishers for answer in publisher.answers]
    assert [answer for answer in answers if answer.status is None] == [], "a publish got no answer"
    slowest = max(answers, key=lambda answer: answer.took_s)
    assert slowest.took_s < SLOWEST_ANSWER_S, f"publishers blocked: {slowest}"
    cut_a, cut_b = (publisher.during(cut_at + detect_s, heal_at) for publisher in cluster.publishers)
    assert cut_a and cut_b
    for answer in cut_a:  # the cut-off gateway: its own players get it, the rest is refused
        when = f"at {answer.at - cut_at:+.2f}s, ready gone at {detect_s:.2f}s, heal at {heal_at - cut_at:.2f}s"
        if answer.player == 2:
            assert answer.status == 503, (answer, when)
        else:
            assert answer.status == 200 and answer.body.get("scope") == "local", (answer, when)
    assert all(answer.status == 200 and "scope" not in answer.body for answer in cut_b), \
        [answer for answer in cut_b if answer.status != 200 or "scope" in answer.body]
    assert any(answer.player == 1 and answer.body.get("queued") for answer in cut_b), \
        "b queued for player 1 while a's presence was gone"
    healed = [answer for publisher in cluster.publishers for answer in publisher.during(heal_at + ready_s, ended_at)]
    assert healed and all(answer.status == 200 and "scope" not in answer.body for answer in healed), \
        [answer for answer in healed if answer.status != 200 or "scope" in answer.body]

    audit = Audit(cluster, answers, cut_at, cut_at + cut_done_s, heal_at)
    assert audit.problems() == [], "\n".join(audit.problems())
    print(f"\npartition ({how}): not ready after {detect_s:.2f}s, players offline on b after {offline_s:.2f}s; "
          f"after heal ready in {ready_s:.2f}s, counted again in {whole_s:.2f}s; "
          f"{len(answers)} answers ({sum(a.status == 503 for a in answers)} 503, "
          f"{sum(a.status == 200 and a.body.get('scope') == 'local' for a in answers)} local), "
          f"slowest {slowest.took_s:.2f}s, {len(audit.twice)} in flight at the cut received twice, "
          f"{len(audit.overreached)} broadcasts received by more than `delivered`; ran {ended_at - cut_at:.1f}s")


def test_a_publish_refused_during_a_silent_cut_is_not_carried_out_when_the_network_heals(partitioned):
    """A 503 during a cut stays unaccepted: the timed-out command is not retransmitted to Redis after the heal."""
    cluster = partitioned
    cut_side, other_side, host = cluster.gateways["a"], cluster.gateways["b"], cluster.hosts["a"]
    assert cut_side.request("POST", "/publish", {"player_id": 6, "event": "e"}, cluster.server_token) == \
        (200, {"delivered": 0, "queued": True}), "Redis knows the routing script (a retransmitted one would run)"
    cluster.lab.cut(host, "drop")
    status, body = cut_side.request("POST", "/publish", {"player_id": 5, "event": "refused"},  # offline: queued
                                    cluster.server_token)
    assert (status, body) == (503, {"error": "broker unavailable: message not accepted, retry later"})
    cluster.lab.heal(host, "drop")  # within the kernel's retransmissions of what was sent
    wait_for(lambda: unacknowledged_bytes(host, cluster.redis.host.address, REDIS_PORT) == 0, 4 * TIMEOUT_S,
             what="nothing left in the cut-off host's kernel for Redis")
    player = cluster.connect(5, "b")
    wait_for(lambda: other_side.request("GET", "/presence?player_id=5", token=cluster.server_token)[1]
             == {"player_id": "5", "connections": 1}, what="player 5 seated")
    assert other_side.request("POST", "/publish", {"player_id": 5, "event": "m", "payload": {"from": "b", "n": 1}},
                              cluster.server_token) == (200, {"delivered": 1, "queued": False})
    wait_for(lambda: player.received, what="the live message")
    assert player.received == [("b", 1)], "the refused publish was queued after all"
