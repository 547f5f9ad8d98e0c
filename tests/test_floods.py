"""Connection floods and slow clients at the HTTP layer: slowloris, idle sockets, the global
connection cap, and malformed requests. The gateway must keep serving everyone else."""
from __future__ import annotations

import json
import socket
import time

import gevent
import websocket

from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import read_until_closed, receive_event, status_and_json
from tests.support.gateways import GatewayUnderTest

HEADER_TIMEOUT_S = 1.0


def served_quickly(gateway: GatewayUnderTest, player_id: int) -> None:
    """A new player connects and gets a publish, and the publish is answered fast."""
    client = gateway.connect(gateway.tokens.player(player_id))
    started = time.monotonic()
    assert gateway.publish(gateway.tokens.server(), player_id, "served").status == 200
    assert time.monotonic() - started < 0.5
    assert receive_event(client) == {"event": "served", "payload": None}
    client.close()


def test_slowloris_does_not_starve_others_and_gets_408(start_gateway):
    """200 sockets dribbling headers byte by byte: others are served meanwhile, and each slow one gets 408."""
    gateway = start_gateway("-header-timeout", f"{HEADER_TIMEOUT_S}s")
    request = f"GET /ws?token={'a' * 32} HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\n".encode()
    answers: list[bytes] = []

    def dribble() -> None:
        with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
            try:
                for byte in request:
                    sock.sendall(bytes([byte]))
                    gevent.sleep(0.05)  # the attack's pace, not a wait for the gateway
            except OSError:
                pass  # the gateway hung up mid-dribble, as it should
            answers.append(read_until_closed(sock))

    started = time.monotonic()
    attackers = [gevent.spawn(dribble) for _ in range(200)]
    wait_for(lambda: len(gateway.gateway.server.pool) >= 200, what="the slow sockets accepted")
    for player_id in range(21, 24):
        served_quickly(gateway, player_id)
    gevent.joinall(attackers, timeout=HEADER_TIMEOUT_S + TIMEOUT_S, raise_error=True)
    assert time.monotonic() - started < HEADER_TIMEOUT_S + TIMEOUT_S
    assert len(answers) == 200
    assert all(status_and_json(answer) == (408, {"error": "request not received in time"})
               for answer in answers), answers[0]
    wait_for(lambda: len(gateway.gateway.server.pool) == 0, what="every slow socket's greenlet gone")


def test_silent_and_idle_connections_are_closed_quietly_at_header_timeout(start_gateway):
    """A socket that never sends, and a keep-alive one idle after a request, are closed without a response."""
    gateway = start_gateway("-header-timeout", f"{HEADER_TIMEOUT_S}s")
    silent = socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S)
    idle = socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S)
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
    started = time.monotonic()
    first = read_until_closed(idle)
    assert first.startswith(b"HTTP/1.1 200") and first.count(b"HTTP/1.1") == 1
    assert read_until_closed(silent) == b""
    assert HEADER_TIMEOUT_S * 0.9 < time.monotonic() - started < HEADER_TIMEOUT_S + TIMEOUT_S / 2
    wait_for(lambda: len(gateway.gateway.server.pool) == 0, what="their greenlets gone")
    silent.close()
    idle.close()


def test_keep_alive_idling_past_header_timeout_in_total_stays_open(start_gateway):
    """The deadline counts from each request's start: idle gaps shorter than it never add up to a hang-up."""
    gateway = start_gateway("-header-timeout", "300ms")
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
        for _ in range(4):
            gevent.sleep(0.15)  # the client's pace: 600 ms idle in all, 150 ms at a time
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            response = b""
            while b'"ok"}' not in response:
                chunk = sock.recv(4096)
                assert chunk, f"closed after {response!r}"
                response += chunk
            assert response.startswith(b"HTTP/1.1 200")


def test_websocket_outlives_header_timeout(start_gateway):
    """The header deadline ends with the headers: an upgraded socket lives on past it."""
    gateway = start_gateway("-header-timeout", "200ms", "-ping-period", "400ms", "-pong-wait", "5s")
    client = gateway.connect(gateway.tokens.player(21))
    opcode, _ = client.recv_data_frame(True)  # the first ping comes after the header deadline
    assert opcode == websocket.ABNF.OPCODE_PING
    assert gateway.publish(gateway.tokens.server(), 21, "still").status == 200
    assert receive_event(client) == {"event": "still", "payload": None}


def test_connection_cap_refuses_503_and_keeps_serving(start_gateway):
    """At -max-total-conns, upgrades get 503 with Retry-After before any token query; a freed place is reusable."""
    gateway = start_gateway("-max-total-conns", "5")
    server = gateway.tokens.server()
    clients = [gateway.connect(gateway.tokens.player(player_id)) for player_id in range(1, 5)]
    tokens = [gateway.tokens.player(100 + index) for index in range(30)]
    assert gateway.publish(server, 3, "live").status == 200  # the fifth place, while it lasts
    assert receive_event(clients[2]) == {"event": "live", "payload": None}
    clients.append(gateway.connect(gateway.tokens.player(5)))
    lookups = gateway.metric("ws_auth_failures_total", kind="player", reason="invalid")

    def attempt(token: str) -> tuple[int, str | None, dict]:
        try:
            client = websocket.create_connection(f"{gateway.ws_url}?token={token}", timeout=TIMEOUT_S)
        except websocket.WebSocketBadStatusException as refusal:
            return refusal.status_code, refusal.resp_headers.get("retry-after"), json.loads(refusal.resp_body)
        gateway.clients.append(client)
        return 101, None, {}

    flood = [gevent.spawn(attempt, token) for token in tokens]
    gevent.joinall(flood, timeout=TIMEOUT_S, raise_error=True)
    answers = [attempt.value for attempt in flood]
    assert all(status == 503 and retry_after == "5" for status, retry_after, _ in answers), answers
    assert answers[0][2] == {"error": "gateway at its limit of 5 connections, retry later"}
    assert gateway.metric("ws_connections_rejected_total", reason="capacity") == 30
    assert gateway.metric("ws_auth_failures_total", kind="player", reason="invalid") == lookups
    assert gateway.gateway.hub.connection_count() == 5
    clients[0].close()
    wait_for(lambda: gateway.gateway.server.open_connections == 4, what="a place freed")
    gateway.connect(tokens[0])


def test_connection_cap_counts_plain_http_connections_too(start_gateway):
    """-max-total-conns counts every open connection: past it a plain HTTP request gets the 503 at once."""
    gateway = start_gateway("-max-total-conns", "2")
    held = [socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) for _ in range(2)]
    wait_for(lambda: gateway.gateway.server.open_connections == 2, what="two idle connections held")
    with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as third:
        third.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        answer = read_until_closed(third)
    assert status_and_json(answer) == (503, {"error": "gateway at its limit of 2 connections, retry later"})
    assert b"\r\nRetry-After: 5\r\n" in answer and b"\r\nConnection: close\r\n" in answer
    held.pop().close()
    wait_for(lambda: gateway.gateway.server.open_connections == 1, what="a place freed")
    assert gateway.get("/healthz").status == 200
    for sock in held:
        sock.close()


def test_malformed_requests_get_json_400_or_414(gateway):
    """Requests pywsgi cannot parse are answered with a JSON error (400, or 414 for an overlong line)."""
    cases = [
        (b"NONSENSE\r\n\r\n", 400),
        (b"GET /healthz HTTP/9.9\r\n\r\n", 400),
        (b"POST /publish HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    ]
    for request, status in cases:
        with socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S) as sock:
            sock.sendall(request)
            answer_status, body = status_and_json(read_until_closed(sock))
            assert answer_status == status and set(body) == {"error"}, (request[:40], answer_status, body)
    assert gateway.get("/healthz").status == 200


def flood_offline_queues(gateway: GatewayUnderTest, server_token: str) -> int:
    """The issue's flood: 600 publishes of 0.9 MiB to distinct offline players (ids 1000-1599);
    then three small ones to player 21. Returns how many were answered queued."""
    payload = "x" * ((9 << 20) // 10)
    queued = 0
    for player_id in range(1000, 1600):
        reply = gateway.publish(server_token, player_id, "big", payload)
        assert reply.status == 200, reply.body
        queued += reply.json["queued"]
    for number in range(3):
        assert gateway.publish(server_token, 21, "small", number).json == {"delivered": 0, "queued": True}
    return queued


def check_the_newest_survived(gateway: GatewayUnderTest) -> None:
    """Player 21 gets its three in order; player 1000's message (the oldest) was given up."""
    server_token = gateway.tokens.server()
    newest = gateway.connect(gateway.tokens.player(21))
    assert [receive_event(newest)["payload"] for _ in range(3)] == [0, 1, 2]
    oldest = gateway.connect(gateway.tokens.player(1000))
    assert gateway.publish(server_token, 1000, "marker").json["delivered"] == 1
    assert receive_event(oldest)["event"] == "marker"
    survivor = gateway.connect(gateway.tokens.player(1599))
    assert receive_event(survivor)["event"] == "big"


def test_offline_flood_stays_within_max_offline_bytes_and_counts_what_it_gives_up(start_gateway):
    """600 x 0.9 MiB to offline players hold at most the default 64 MiB; drops counted; the newest survive."""
    gateway = start_gateway("-rate-limit", "0")
    server_token = gateway.tokens.server()
    assert flood_offline_queues(gateway, server_token) == 600
    assert 0 < gateway.metric("ws_offline_queue_bytes") <= 64 << 20
    kept = gateway.metric("ws_offline_queue_messages")
    assert kept < 80
    assert gateway.metric("ws_messages_dropped_total", reason="offline_bytes_limit") == 603 - kept
    check_the_newest_survived(gateway)


def test_offline_flood_stays_within_max_offline_bytes_in_redis(start_cluster_gateway, redis_prefix):
    """With -broker, two gateways' queues together hold at most the cluster's 64 MiB; drops counted."""
    import redis

    from tests.support.redis_server import REDIS_URL
    from wsgateway.redis_link import RedisKeys

    first, second = start_cluster_gateway("-rate-limit", "0"), start_cluster_gateway("-rate-limit", "0")
    server_token = first.tokens.server()
    assert flood_offline_queues(first, server_token) == 600
    client = redis.Redis.from_url(REDIS_URL)
    accounts = RedisKeys(redis_prefix).shards[0]  # a single server: one accounting for all queues
    assert 0 < int(client.hget(accounts.queue_sizes, "")) <= 64 << 20
    kept = client.zcard(accounts.queue_heads) - 1 + 3  # every queue holds one frame, player 21's three
    client.close()
    assert first.metric("ws_messages_dropped_total", reason="offline_bytes_limit") == 603 - kept
    check_the_newest_survived(second)
