"""Gateway processes on the real Redis acting as one gateway: what survives restarts, kills,
a Redis restart, and `-workers` serving one port."""
from __future__ import annotations

import http.client
import json
import os
import signal
from pathlib import Path
from typing import Any, Iterator

import gevent
import pytest
import websocket
from prometheus_client.parser import text_string_to_metric_families

from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import receive_close, receive_event
from tests.support.gateways import TokenTable
from tests.support.processes import GatewayProcess
from tests.support.redis_server import REDIS_URL
from wsgateway.tokens import SqlTokenStore


class Cluster:
    """Gateway processes sharing one Redis prefix and one sqlite token file."""

    def __init__(self, directory: Path, prefix: str, broker_url: str = REDIS_URL) -> None:
        self.directory = directory
        self.prefix = prefix
        self.broker_url = broker_url
        self.database = directory / "shared-tokens.db"
        store = SqlTokenStore(f"sqlite:///{self.database}", db_timeout_s=TIMEOUT_S, cache_period_s=60)
        store.ensure_schema()
        store.close()
        self.tokens = TokenTable(f"sqlite:///{self.database}")
        self.processes: list[GatewayProcess] = []
        self.clients: list[websocket.WebSocket] = []

    def start(self, count: int, *flags: str) -> list[GatewayProcess]:
        started = []
        for _ in range(count):
            home = self.directory / f"gateway-{len(self.processes)}"
            home.mkdir()
            started.append(GatewayProcess(home, "-dsn", f"file:{self.database}", "-broker", self.broker_url,
                                          "-broker-prefix", self.prefix, *flags))
            self.processes.append(started[-1])
        for process in started:
            process.wait_ready()
        return started

    def connect(self, process: GatewayProcess, token: str) -> websocket.WebSocket:
        client = websocket.create_connection(f"{process.ws_url}?token={token}", timeout=TIMEOUT_S)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.shutdown()
        for process in self.processes:
            process.kill()
        self.tokens.engine.dispose()


def post(process: GatewayProcess, path: str, body: dict[str, Any], token: str) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=TIMEOUT_S)
    try:
        connection.request("POST", path, json.dumps(body), {"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def publish(process: GatewayProcess, token: str, player_id: Any, event: str, payload: Any = None) -> tuple[int, Any]:
    return post(process, "/publish", {"player_id": player_id, "event": event, "payload": payload}, token)


def get(process: GatewayProcess, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=TIMEOUT_S)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@pytest.fixture
def cluster(tmp_path, redis_prefix) -> Iterator[Cluster]:
    made = Cluster(tmp_path, redis_prefix)
    yield made
    made.close()


@pytest.fixture
def on_any_redis(tmp_path, redis_prefix, redis_url) -> Iterator[Cluster]:
    """Gateway processes on the shared Redis, then (second run) on the session's Redis Cluster."""
    made = Cluster(tmp_path, redis_prefix, broker_url=redis_url)
    yield made
    made.close()


def test_three_gateways_act_as_one(on_any_redis):
    """Publish, broadcast, the shared limit and the backlog hand-off across three processes."""
    cluster = on_any_redis
    first, second, third = cluster.start(3, "-max-conns", "3", "-rate-limit", "1000")
    server = cluster.tokens.server()
    player = cluster.tokens.player(21)

    assert publish(first, server, 21, "queued", 0) == (200, {"delivered": 0, "queued": True})
    connecting = [gevent.spawn(cluster.connect, process, player) for process in (second, third)]
    gevent.joinall(connecting, raise_error=True)
    for process in (second, third):
        wait_connected(process, 1)
    status, answer = publish(first, server, 21, "live", 1)
    assert status == 200 and answer["delivered"] == 2
    received = []
    for greenlet in connecting:
        events = []
        while (event := receive_event(greenlet.value)["event"]) != "live":
            events.append(event)
        received.append(events)
    assert sorted(received) == [[], ["queued"]], "the backlog went to exactly one connection"

    cluster.connect(first, player)
    refused = websocket.WebSocket()
    with pytest.raises(websocket.WebSocketBadStatusException) as refusal:
        refused.connect(f"{second.ws_url}?token={player}", timeout=TIMEOUT_S)
    assert refusal.value.status_code == 429

    watcher = cluster.connect(first, cluster.tokens.player(99))
    assert post(third, "/broadcast", {"event": "all"}, server)[0] == 200
    assert receive_event(watcher)["event"] == "all"


def test_rate_limit_is_shared_by_processes(cluster):
    """A server token's budget is the same whichever gateway process it publishes to."""
    gateways = cluster.start(3, "-rate-limit", "4", "-rate-period", "1m")
    server = cluster.tokens.server()
    statuses = [publish(gateway, server, 21, "e")[0] for gateway in gateways + gateways[:2]]
    assert statuses == [200, 200, 200, 200, 429]


def test_offline_queue_survives_a_restart_of_every_gateway(cluster):
    """Messages queued in Redis are still delivered after all gateways were stopped and restarted."""
    old = cluster.start(3, "-offline-ttl", "5m")
    server = cluster.tokens.server()
    assert publish(old[0], server, 21, "kept", {"n": 1})[1]["queued"] is True
    for process in old:
        process.send_signal(signal.SIGTERM)
    assert [process.wait() for process in old] == [0, 0, 0]
    new = cluster.start(3, "-offline-ttl", "5m")
    client = cluster.connect(new[2], cluster.tokens.player(21))
    assert receive_event(client) == {"event": "kept", "payload": {"n": 1}}


def test_killed_gateways_players_expire_from_presence(cluster):
    """When a gateway dies without a word, its players count as offline within -presence-ttl."""
    survivor, doomed = cluster.start(2, "-presence-ttl", "1s")
    server = cluster.tokens.server()
    cluster.connect(doomed, cluster.tokens.player(21))
    wait_connected(doomed, 1)
    assert publish(survivor, server, 21, "live")[1] == {"delivered": 1, "queued": False}
    doomed.process.send_signal(signal.SIGKILL)
    doomed.wait()
    wait_for(lambda: publish(survivor, server, 21, "probe")[1]["queued"], TIMEOUT_S, what="presence expiry")


def test_gateways_recover_from_a_redis_restart(tmp_path, redis_prefix, private_redis):
    """Redis restarting empty: gateways reconnect by themselves and players are present again."""
    cluster = Cluster(tmp_path, redis_prefix, broker_url=private_redis.url)
    try:
        first, second = cluster.start(2)
        server = cluster.tokens.server()
        client = cluster.connect(second, cluster.tokens.player(21))
        wait_connected(second, 1)
        private_redis.stop()
        assert publish(first, server, 21, "lost")[0] == 503
        private_redis.start()
        wait_for(lambda: publish(first, server, 21, "back") == (200, {"delivered": 1, "queued": False}),
                 TIMEOUT_S * 2, what="cross-gateway delivery after the restart")
        assert receive_event(client)["event"] == "back"
        assert get(first, "/readyz")[0] == 200
    finally:
        cluster.close()


def metric_value(process: GatewayProcess, name: str) -> float:
    """A sample of the process's /metrics (0 when absent)."""
    status, text = get(process, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return 0.0


def wait_connected(process: GatewayProcess, count: int) -> None:
    """Until the process holds `count` player connections (their seats taken)."""
    wait_for(lambda: metric_value(process, "ws_active_connections") == count, what=f"{count} connections")


def worker_pids(process: GatewayProcess) -> set[str]:
    """The pids of the live workers, from the per-worker gauge of /metrics."""
    status, text = get(process, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        if family.name == "ws_worker_active_connections":
            return {sample.labels["pid"] for sample in family.samples}
    return set()


def test_workers_serve_one_port_are_replaced_and_drain(on_any_redis):
    """-workers 2: two processes share the port, a killed one is replaced, SIGTERM drains both."""
    cluster = on_any_redis
    (supervisor,) = cluster.start(1, "-workers", "2", "-shutdown-timeout", "3s")
    pids = wait_for(lambda: len(worker_pids(supervisor)) == 2 and worker_pids(supervisor), what="two workers")
    assert str(supervisor.process.pid) not in pids
    server = cluster.tokens.server()
    clients = [cluster.connect(supervisor, cluster.tokens.player(100 + number)) for number in range(10)]
    wait_connected(supervisor, 10)
    for number, client in enumerate(clients):
        assert publish(supervisor, server, 100 + number, "hello", number)[1]["delivered"] == 1
        assert receive_event(client) == {"event": "hello", "payload": number}

    os.kill(int(sorted(pids)[0]), signal.SIGKILL)
    wait_for(lambda: (now := worker_pids(supervisor)) and len(now) == 2 and now != pids,
             TIMEOUT_S * 2, what="a replacement worker")

    fresh = cluster.connect(supervisor, cluster.tokens.player(200))
    wait_for(lambda: metric_value(supervisor, "ws_active_connections") >= 1, what="the fresh connection")
    supervisor.send_signal(signal.SIGTERM)
    assert receive_close(fresh)[0] == 1001
    assert supervisor.wait(TIMEOUT_S * 2) == 0
    assert not supervisor.pid_file.exists()


def children(pid: int) -> set[int]:
    """The live child processes of `pid` (Linux's /proc)."""
    with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as listing:
        return {int(child) for child in listing.read().split()}


def running(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def log_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sighup_to_the_supervisor_reopens_every_log_and_kills_nobody(cluster):
    """-workers 2 and SIGHUP: supervisor and both workers reopen the log, keep their pids and sockets."""
    (supervisor,) = cluster.start(1, "-workers", "2", "-shutdown-timeout", "3s")
    workers = wait_for(lambda: len(found := children(supervisor.process.pid)) == 2 and found, what="two workers")
    wait_for(lambda: len(worker_pids(supervisor)) == 2, what="two workers serving")
    client = cluster.connect(supervisor, cluster.tokens.player(100))
    wait_connected(supervisor, 1)
    wait_for(lambda: sum(line["event"] == "heap_frozen" for line in log_events(supervisor.log_file)) == 2,
             what="both workers serving")
    supervisor.log_file.rename(supervisor.log_file.with_name("rotated.log"))

    supervisor.send_signal(signal.SIGHUP)
    wait_for(lambda: {line["pid"] for line in log_events(supervisor.log_file) if line["event"] == "log_reopened"}
             == {supervisor.process.pid, *workers}, TIMEOUT_S * 2,
             what="supervisor and both workers writing to the new log file")
    assert children(supervisor.process.pid) == workers and supervisor.process.poll() is None
    server = cluster.tokens.server()
    assert publish(supervisor, server, 100, "after-hup")[1]["delivered"] == 1
    assert receive_event(client)["event"] == "after-hup"

    supervisor.send_signal(signal.SIGTERM)
    assert receive_close(client)[0] == 1001
    assert supervisor.wait(TIMEOUT_S * 2) == 0
    assert not supervisor.pid_file.exists()


def test_workers_drain_and_exit_when_the_supervisor_is_killed(cluster):
    """SIGKILL to the supervisor: each worker notices, closes its sockets with 1001 and exits; the port goes quiet."""
    (supervisor,) = cluster.start(1, "-workers", "2", "-shutdown-timeout", "3s")
    workers = wait_for(lambda: len(found := children(supervisor.process.pid)) == 2 and found, what="two workers")
    wait_for(lambda: len(worker_pids(supervisor)) == 2, what="two workers serving")
    client = cluster.connect(supervisor, cluster.tokens.player(100))
    wait_connected(supervisor, 1)

    supervisor.process.kill()
    supervisor.wait()
    assert receive_close(client)[0] == 1001
    wait_for(lambda: not any(running(pid) for pid in workers), TIMEOUT_S * 2, what="both workers gone")
    with pytest.raises(OSError):
        get(supervisor, "/healthz")
    gone = [line for line in log_events(supervisor.log_file) if line["event"] == "supervisor_gone"]
    assert len(gone) == 2
