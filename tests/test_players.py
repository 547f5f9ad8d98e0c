"""GET /presence and POST /disconnect: who is online, and cutting a player off, on one gateway and across a cluster."""
from __future__ import annotations

import http.client
import json
import logging
import socket

import gevent
import pytest

from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import receive_close, receive_event
from wsgateway.broker import Envelope
from wsgateway.errors import CloseCode
from wsgateway.frames import close_frame
from wsgateway.roster import LOCAL_GATEWAY


def presence(gateway, token: str, query: str = ""):
    return gateway.request("GET", f"/presence{query}", headers={"Authorization": f"Bearer {token}"})


def disconnect(gateway, token: str, player_id):
    return gateway.post("/disconnect", {"player_id": player_id}, token=token)


def test_presence_counts_a_players_connections_and_everyone(gateway, tokens, server_token):
    """GET /presence?player_id=X counts X's connections; GET /presence counts players and connections."""
    for player_id in (21, 21, 22):
        gateway.connect(tokens.player(player_id))
    assert presence(gateway, server_token, "?player_id=21").json == {"player_id": "21", "connections": 2}
    assert presence(gateway, server_token, "?player_id=99").json == {"player_id": "99", "connections": 0}
    census = presence(gateway, server_token)
    assert (census.status, census.json) == (200, {"players": 2, "connections": 3})
    assert gateway.metric("ws_http_requests_total", endpoint="presence", status="200") == 3


def test_disconnect_closes_every_connection_of_the_player_with_4002(gateway, tokens, server_token, caplog):
    """POST /disconnect closes each of the player's sockets with 4002 at once, answers how many, and spares the rest."""
    player_token = tokens.player(21)
    cut_off = [gateway.connect(player_token) for _ in range(2)]
    bystander = gateway.connect(tokens.player(22))
    with caplog.at_level(logging.INFO, logger="wsgateway"):
        reply = disconnect(gateway, server_token, 21)
    assert (reply.status, reply.json) == (200, {"disconnected": 2})
    for client in cut_off:
        assert receive_close(client) == (4002, "disconnected by the server")
    wait_for(lambda: gateway.gateway.hub.connection_count() == 1, what="both sockets gone")
    assert gateway.metric("ws_disconnects_total", code="4002") == 2
    assert gateway.metric("ws_http_requests_total", endpoint="disconnect", status="200") == 1
    assert gateway.publish(server_token, 22, "still", 1).json == {"delivered": 1, "queued": False}
    assert receive_event(bystander) == {"event": "still", "payload": 1}
    record = next(record for record in caplog.records if getattr(record, "event", "") == "player_disconnected")
    assert (record.player_id, record.subject_id, record.connections) == ("21", "backend-1", 2)
    assert all(server_token not in line and player_token not in line for line in caplog.text.splitlines())


def test_disconnect_of_an_offline_player_is_zero_and_queues_nothing(gateway, tokens, server_token):
    """Disconnecting a player with no connection answers 0 and leaves nothing behind for its next connection."""
    assert disconnect(gateway, server_token, "nobody").json == {"disconnected": 0}
    assert disconnect(gateway, server_token, 21).json == {"disconnected": 0}
    client = gateway.connect(tokens.player(21))
    assert gateway.publish(server_token, 21, "first", None).json == {"delivered": 1, "queued": False}
    assert receive_event(client) == {"event": "first", "payload": None}


def test_a_disconnected_player_may_come_back_until_its_token_is_revoked(gateway, tokens, server_token):
    """The ban recipe: disconnect alone lets the player reconnect; revoke then disconnect keeps it out."""
    player_token = tokens.player(21)
    client = gateway.connect(player_token)
    disconnect(gateway, server_token, 21)
    assert receive_close(client)[0] == CloseCode.DISCONNECTED
    wait_for(lambda: gateway.gateway.hub.connection_count() == 0, what="sockets gone")
    client = gateway.connect(player_token)  # a disconnect is not a ban
    tokens.revoke(player_token)
    assert disconnect(gateway, server_token, 21).json == {"disconnected": 1}
    assert receive_close(client)[0] == CloseCode.DISCONNECTED
    assert gateway.refused(f"?token={player_token}") == (401, {"error": "invalid or expired token"})


@pytest.mark.parametrize("raw, message", [
    (b"", "body is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
    (b"[21]", "body must be a JSON object"),
    (b"{}", "player_id is required"),
    (b'{"player": 21}', "player_id is required"),
    (b'{"player_id": ""}', "player_id must be a non-empty string of at most 64 characters or a non-negative integer"),
    (b'{"player_id": -1}', "player_id must be a non-empty string of at most 64 characters or a non-negative integer"),
    (b'{"player_id": true}', "player_id must be a non-empty string of at most 64 characters or a non-negative integer"),
    (b'{"player_id": "' + b"x" * 65 + b'"}',
     "player_id must be a non-empty string of at most 64 characters or a non-negative integer"),
])
def test_bad_disconnect_bodies_are_400_and_close_nothing(gateway, tokens, server_token, raw, message):
    """A disconnect body that names no valid player is 400 with a clear error, and no socket is closed."""
    client = gateway.connect(tokens.player(21))
    reply = gateway.post("/disconnect", raw=raw, token=server_token)
    assert (reply.status, reply.json) == (400, {"error": message})
    assert gateway.publish(server_token, 21, "still_open").json == {"delivered": 1, "queued": False}
    assert receive_event(client)["event"] == "still_open"
    assert gateway.metric("ws_http_requests_total", endpoint="disconnect", status="400") == 1


@pytest.mark.parametrize("query, message", [
    ("?player_id=", "player_id must be a non-empty string of at most 64 characters or a non-negative integer"),
    ("?player_id=1&player_id=2", "player_id given more than once"),
    ("?player=21", "unknown query parameter 'player': only player_id is accepted"),
    ("?player_id=" + "x" * 65, "player_id must be a non-empty string of at most 64 characters or a non-negative integer"),
])
def test_bad_presence_queries_are_400(gateway, server_token, query, message):
    """A presence query with a bad or unknown parameter is 400 naming it."""
    reply = presence(gateway, server_token, query)
    assert (reply.status, reply.json) == (400, {"error": message})


def test_body_larger_than_max_body_is_413(start_gateway):
    """A disconnect body over -max-body is refused 413 before it is read."""
    gateway = start_gateway("-max-body", "64")
    reply = gateway.post("/disconnect", raw=b'{"player_id": "' + b"x" * 100 + b'"}', token=gateway.tokens.server())
    assert (reply.status, reply.json) == (413, {"error": "body larger than 64 bytes"})


@pytest.mark.parametrize("endpoint", ["presence", "disconnect"])
def test_a_server_token_is_required(gateway, tokens, endpoint):
    """Without a bearer token the answer is 401; with a player's token, an unknown or expired one, 403."""
    client = gateway.connect(tokens.player(21))
    expired = tokens.server("old")
    tokens.expire(expired)

    def ask(token: str | None):
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        if endpoint == "presence":
            return gateway.request("GET", "/presence", headers=headers)
        return gateway.post("/disconnect", {"player_id": 21}, headers=headers)
    missing = ask(None)
    assert (missing.status, missing.json) == (401, {"error": "missing bearer token"})
    assert missing.headers["www-authenticate"] == "Bearer"
    for token in (tokens.player(21), "no-such-token", expired):
        refused = ask(token)
        assert (refused.status, refused.json) == (403, {"error": "invalid, expired or non-server token"})
    assert gateway.metric("ws_auth_failures_total", kind="server", reason="invalid") == 3
    assert gateway.gateway.hub.connection_count() == 1 and client.connected


def test_the_subjects_rate_limit_applies(start_gateway):
    """Presence and disconnect take from the server token's rate limit, as publishing does: over it, 429."""
    gateway = start_gateway("-rate-limit", "2", "-rate-period", "1h")
    server = gateway.tokens.server()
    assert presence(gateway, server).status == 200
    assert disconnect(gateway, server, 21).status == 200
    limited = presence(gateway, server)
    assert (limited.status, limited.json) == (429, {"error": "rate limit exceeded"})
    assert int(limited.headers["retry-after"]) >= 1
    assert disconnect(gateway, server, 21).status == 429
    assert presence(gateway, gateway.tokens.server("backend-2")).status == 200  # another subject's own budget


def test_while_shutting_down_both_are_503(gateway, tokens, server_token):
    """A presence or disconnect request in flight when shutdown begins is refused 503."""
    gateway.connect(tokens.player(21))
    requests = []
    idle = gateway.gateway.server.idle_handlers
    for path in ("/presence", "/disconnect"):
        sock = socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S)
        wait_for(lambda: len(idle) == 1, what="gateway waiting for a request line")
        sock.sendall(f"{'GET' if path == '/presence' else 'POST'} {path} HTTP/1.1\r\n".encode())
        wait_for(lambda: not idle, what="gateway reading the headers")
        requests.append((sock, path))
    stopper = gevent.spawn(gateway.gateway.shutdown, TIMEOUT_S)
    wait_for(lambda: gateway.gateway.draining, what="draining")
    body = json.dumps({"player_id": 21}).encode()
    for sock, path in requests:
        sock.sendall(f"Host: gateway\r\nAuthorization: Bearer {server_token}\r\nContent-Length: "
                     f"{len(body) if path == '/disconnect' else 0}\r\n\r\n".encode()
                     + (body if path == "/disconnect" else b""))
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert (response.status, json.loads(response.read())) == (503, {"error": "server shutting down"})
        assert response.getheader("Retry-After") == "1"
        sock.close()
    stopper.join(TIMEOUT_S)
    assert gateway.metric("ws_disconnects_total", code="4002") == 0  # the socket closed with 1001, not cut off


# --- across a cluster ------------------------------------------------------------------------------------
def test_presence_and_disconnect_span_the_cluster(start_cluster_gateway):
    """With -broker, any gateway counts every gateway's players, and a disconnect closes the player everywhere."""
    first, second = start_cluster_gateway(), start_cluster_gateway()
    server = first.tokens.server()
    on_first = first.connect(first.tokens.player(21))
    on_second = second.connect(first.tokens.player(21))
    bystander = second.connect(first.tokens.player(22))
    for gateway in (first, second):
        assert presence(gateway, server).json == {"players": 2, "connections": 3}
        assert presence(gateway, server, "?player_id=21").json == {"player_id": "21", "connections": 2}
    reply = disconnect(first, server, 21)
    assert (reply.status, reply.json) == (200, {"disconnected": 2})
    assert receive_close(on_first) == receive_close(on_second) == (4002, "disconnected by the server")
    wait_for(lambda: presence(second, server).json == {"players": 1, "connections": 1}, what="player 21 gone")
    assert presence(first, server, "?player_id=21").json == {"player_id": "21", "connections": 0}
    assert second.metric("ws_disconnects_total", code="4002") == 1
    assert first.publish(server, 22, "still", 1).json == {"delivered": 1, "queued": False}
    assert receive_event(bystander) == {"event": "still", "payload": 1}


def test_a_player_on_two_gateways_counts_once(start_cluster_gateway):
    """The census counts a player connected to several gateways once, and forgets it with its last connection."""
    first, second = start_cluster_gateway(), start_cluster_gateway()
    server = first.tokens.server()
    on_first = first.connect(first.tokens.player(21))
    on_second = second.connect(first.tokens.player(21))
    assert presence(first, server).json == {"players": 1, "connections": 2}
    on_first.close()
    wait_for(lambda: presence(second, server).json == {"players": 1, "connections": 1}, what="one connection left")
    on_second.close()
    wait_for(lambda: presence(first, server).json == {"players": 0, "connections": 0}, what="nobody left")


def test_the_census_forgets_a_dead_gateways_players(start_cluster_gateway):
    """Players of a gateway that stopped heartbeating leave the census within -presence-ttl."""
    first, second = start_cluster_gateway("-presence-ttl", "3s"), start_cluster_gateway("-presence-ttl", "3s")
    server = first.tokens.server()
    second.connect(first.tokens.player(22))
    first.connect(first.tokens.player(21))
    assert presence(first, server).json == {"players": 2, "connections": 2}
    for job in second.gateway._jobs:  # noqa: SLF001 - the gateway "dies": its heartbeat stops, nothing is removed
        job.kill()
    wait_for(lambda: presence(first, server).json == {"players": 1, "connections": 1}, TIMEOUT_S * 2,
             what="the silent gateway's player expired")


def test_with_redis_down_both_are_503(start_cluster_gateway, private_redis):
    """When the broker does not answer, presence and disconnect are 503 and close nothing."""
    gateway = start_cluster_gateway(broker_url=private_redis.url)
    server = gateway.tokens.server()
    client = gateway.connect(gateway.tokens.player(21))
    private_redis.stop()
    for reply in (presence(gateway, server), presence(gateway, server, "?player_id=21"), disconnect(gateway, server, 21)):
        assert (reply.status, reply.json) == (503, {"error": "broker unavailable, retry later"})
        assert reply.headers["retry-after"] == "1"
    assert client.connected and gateway.gateway.hub.connection_count() == 1


def test_a_close_request_with_an_unknown_code_is_ignored(gateway, tokens, server_token, caplog):
    """A close envelope with a code outside the catalogue (a newer gateway's) closes nothing and is logged."""
    client = gateway.connect(tokens.player(21))
    with caplog.at_level(logging.WARNING, logger="wsgateway"):
        gateway.gateway.broker.publish(Envelope(close_frame(4999, "from the future"), "21", frozenset({LOCAL_GATEWAY})))
        gateway.gateway.broker.publish(Envelope(close_frame(CloseCode.DISCONNECTED)))  # no player: nobody
    assert [record.code for record in caplog.records if getattr(record, "event", "") == "close_ignored"] == [4999]
    assert gateway.publish(server_token, 21, "still_open").json == {"delivered": 1, "queued": False}
    assert receive_event(client)["event"] == "still_open"


def test_refused_tokens_are_throttled_per_client_address_behind_a_trusted_proxy(start_gateway):
    """-auth-fail-limit counts /presence and /disconnect refusals by the client X-Forwarded-For names, not the proxy."""
    gateway = start_gateway("-auth-fail-limit", "2", "-trusted-proxies", "127.0.0.1")

    def ask(client: str, path: str = "/presence"):
        headers = {"Authorization": "Bearer no-such-token", "X-Forwarded-For": client}
        if path == "/presence":
            return gateway.request("GET", path, headers=headers)
        return gateway.post(path, {"player_id": 21}, headers=headers)
    assert [ask("203.0.113.9").status, ask("203.0.113.9", "/disconnect").status] == [403, 403]
    throttled = ask("203.0.113.9", "/disconnect")
    assert throttled.status == 429 and int(throttled.headers["retry-after"]) >= 1
    assert ask("203.0.113.10").status == 403  # another client behind the same proxy is not held back


@pytest.mark.parametrize("cluster", [False, True], ids=["in-process", "redis"])
def test_a_close_request_that_finds_nobody_is_not_routed_again(start_gateway, start_cluster_gateway, cluster):
    """A close envelope for a player whose connections here are gone is dropped, never queued for its next connection."""
    gateway = start_cluster_gateway() if cluster else start_gateway()
    here = gateway.gateway.gateway_id if cluster else LOCAL_GATEWAY
    server = gateway.tokens.server()
    witness = gateway.connect(gateway.tokens.player(99))
    gateway.gateway.broker.publish(Envelope(close_frame(CloseCode.DISCONNECTED, "late"), "21", frozenset({here})))
    assert gateway.publish(server, 99, "after", None).status == 200
    assert receive_event(witness)["event"] == "after"  # the broker keeps order: the close envelope was handled
    client = gateway.connect(gateway.tokens.player(21))
    assert gateway.publish(server, 21, "first", None).json == {"delivered": 1, "queued": False}
    assert receive_event(client) == {"event": "first", "payload": None}
