"""wsgateway.client: publishing against a real running gateway (results, typed errors carrying
the gateway's message, 429 and 503 from the gateway itself), and retry behaviour against a
scripted HTTP peer; it also runs in a process without gevent."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import TIMEOUT_S
from tests.support.clients import receive_close, receive_event
from tests.scripted_http import Answer, ScriptedServer
from wsgateway.client import (AuthError, BadRequest, GatewayClient, GatewayError, PublishResult, RateLimited,
                              Unavailable)

PROJECT = Path(__file__).resolve().parent.parent


class Sleeps(list):
    """Stands in for time.sleep: records each wait instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def scripted():
    servers: list[ScriptedServer] = []

    def start(*script: Answer) -> ScriptedServer:
        server = ScriptedServer(*script)
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()


def client_for(gateway, token: str, **options) -> GatewayClient:
    return GatewayClient(f"http://{gateway.host}:{gateway.port}", token, **options)


def requests_to(gateway, endpoint: str, status: int) -> float:
    return gateway.metric("ws_http_requests_total", endpoint=endpoint, status=str(status))


# --- against a real gateway -----------------------------------------------------------------------
def test_publish_reaches_the_player_or_its_offline_queue(gateway, tokens):
    """publish returns what the gateway did: delivered to the live socket, or queued while offline."""
    publisher = client_for(gateway, tokens.server())
    client = gateway.connect(tokens.player(21))
    assert publisher.publish(21, "score", {"points": 5}) == PublishResult(delivered=1, queued=False)
    assert receive_event(client) == {"event": "score", "payload": {"points": 5}}
    assert publisher.publish("22", "later") == PublishResult(delivered=0, queued=True)


def test_broadcast_to_everyone_or_to_one_players_connections(gateway, tokens):
    """broadcast returns the number of sockets reached; with player_id only that player's."""
    publisher = client_for(gateway, tokens.server())
    first, second = gateway.connect(tokens.player(21)), gateway.connect(tokens.player(22))
    assert publisher.broadcast("round_over") == 2
    assert receive_event(first) == receive_event(second) == {"event": "round_over", "payload": None}
    assert publisher.broadcast("hint", {"n": 1}, player_id=22) == 1
    assert receive_event(second) == {"event": "hint", "payload": {"n": 1}}


def test_idempotency_key_is_harmless_to_a_gateway_that_ignores_it(gateway, tokens):
    """publish and broadcast with idempotency_key work on a gateway that does not know the header."""
    publisher = client_for(gateway, tokens.server())
    client = gateway.connect(tokens.player(21))
    assert publisher.publish(21, "once", idempotency_key="order-1").delivered == 1
    assert publisher.broadcast("all", idempotency_key="round-9") == 1
    assert [receive_event(client)["event"] for _ in range(2)] == ["once", "all"]


@pytest.mark.parametrize("token_kind, status", [("unknown", 403), ("player", 403)])
def test_refused_token_raises_auth_error_without_retrying(gateway, tokens, token_kind, status):
    """An unknown or player token raises AuthError with the gateway's message, after one request."""
    token = tokens.player(21) if token_kind == "player" else "no-such-token"
    sleeps = Sleeps()
    with pytest.raises(AuthError) as refused:
        client_for(gateway, token, sleep=sleeps).publish(21, "e")
    assert (refused.value.status, refused.value.message) == (status, "invalid, expired or non-server token")
    assert sleeps == [] and requests_to(gateway, "publish", status) == 1


def test_bad_request_raises_bad_request_with_the_gateways_message(gateway, tokens):
    """A 400 raises BadRequest carrying the gateway's error message; it is not retried."""
    sleeps = Sleeps()
    with pytest.raises(BadRequest) as refused:
        client_for(gateway, tokens.server(), sleep=sleeps).publish(21, "")
    assert (refused.value.status, refused.value.message) == (400, "event must be a non-empty string")
    assert sleeps == [] and requests_to(gateway, "publish", 400) == 1


def test_body_too_large_raises_bad_request(start_gateway):
    """A 413 (body over -max-body) raises BadRequest naming the limit."""
    gateway = start_gateway("-max-body", "200")
    with pytest.raises(BadRequest) as refused:
        client_for(gateway, gateway.tokens.server(), sleep=Sleeps()).publish(21, "e", "x" * 500)
    assert refused.value.status == 413 and "200 bytes" in refused.value.message


def test_rate_limit_longer_than_the_client_waits_raises_rate_limited_at_once(start_gateway):
    """A 429 whose Retry-After exceeds max_backoff_s raises RateLimited with it, without waiting."""
    gateway = start_gateway("-rate-limit", "1", "-rate-period", "1m")
    sleeps = Sleeps()
    publisher = client_for(gateway, gateway.tokens.server(), sleep=sleeps, max_backoff_s=5)
    publisher.publish(21, "first")
    with pytest.raises(RateLimited) as limited:
        publisher.publish(21, "second")
    assert (limited.value.status, limited.value.retry_after, limited.value.message) == (429, 60, "rate limit exceeded")
    assert sleeps == [] and requests_to(gateway, "publish", 429) == 1


def test_database_outage_503_is_retried_until_the_gateway_answers(start_gateway, mysql_url):
    """A 503 from a gateway whose database is cut is retried after its Retry-After; it succeeds once restored."""
    from sqlalchemy.engine import make_url
    from tests.support.processes import TcpForwarder

    url = make_url(mysql_url)
    forwarder = TcpForwarder((url.host or "127.0.0.1", url.port or 3306))
    try:
        relayed = url.set(host="127.0.0.1", port=forwarder.port).render_as_string(hide_password=False)
        gateway = start_gateway("-db-timeout", "1s", database_url=relayed)
        server_token = gateway.tokens.server()  # not yet checked, so not cached: the gateway must ask the database
        forwarder.cut()
        waits: list[float] = []

        def wait_and_restore(seconds: float) -> None:
            waits.append(seconds)
            if len(waits) == 2:
                forwarder.restore()
        publisher = client_for(gateway, server_token, backoff_s=0.1, sleep=wait_and_restore)
        assert publisher.publish(21, "after-outage") == PublishResult(delivered=0, queued=True)
        assert waits == [1.0, 1.0]  # the gateway's Retry-After: 1, longer than the 0.1 s and 0.2 s backoff
        assert requests_to(gateway, "publish", 503) == 2
    finally:
        forwarder.close()


def test_batch_publish_against_the_gateway(gateway, tokens):
    """publish_batch returns one result per message, in order."""
    publisher = client_for(gateway, tokens.server(), retries=0)
    client = gateway.connect(tokens.player(21))
    results = publisher.publish_batch([{"player_id": 21, "event": "a", "payload": 1},
                                       {"player_id": 22, "event": "b"}])
    assert results == [PublishResult(1, False), PublishResult(0, True)]
    assert receive_event(client) == {"event": "a", "payload": 1}


def test_client_works_in_a_process_without_gevent(gateway, tokens):
    """The client imports and publishes in a plain Python process that never loads gevent."""
    client = gateway.connect(tokens.player(21))
    script = textwrap.dedent(f"""
        import sys
        from wsgateway.client import GatewayClient
        result = GatewayClient("http://{gateway.host}:{gateway.port}", {tokens.server()!r}).publish(21, "plain")
        assert not any(name.split(".")[0] == "gevent" for name in sys.modules), "gevent was imported"
        print(result.delivered)
    """)
    finished = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, capture_output=True, text=True,
                              timeout=3 * TIMEOUT_S)
    assert (finished.returncode, finished.stdout.strip()) == (0, "1"), finished.stderr
    assert receive_event(client) == {"event": "plain", "payload": None}


# --- retry behaviour, against a scripted peer -----------------------------------------------------------
def test_5xx_is_retried_with_exponential_backoff(scripted):
    """502 and 503 are retried after backoff_s, then twice that; the third answer's result is returned."""
    server = scripted(Answer(502, b"<html>bad gateway</html>"), Answer(503, {"error": "busy"}),
                      Answer(200, {"delivered": 1, "queued": False}))
    sleeps = Sleeps()
    result = GatewayClient(server.url, "token", backoff_s=0.25, sleep=sleeps).publish(21, "e", {"a": 1})
    assert result == PublishResult(1, False)
    assert sleeps == [0.25, 0.5]
    assert len(server.received) == 3
    assert all(request.json == {"player_id": 21, "event": "e", "payload": {"a": 1}} for request in server.received)


def test_backoff_is_capped_and_retries_are_bounded(scripted):
    """After `retries` retries the last 5xx is raised as Unavailable with its status and message."""
    server = scripted(Answer(500, {"error": "internal error"}))
    sleeps = Sleeps()
    with pytest.raises(Unavailable) as failed:
        GatewayClient(server.url, "token", retries=4, backoff_s=1, max_backoff_s=3, sleep=sleeps).broadcast("e")
    assert (failed.value.status, failed.value.message) == (500, "internal error")
    assert sleeps == [1, 2, 3, 3]
    assert len(server.received) == 5


def test_429_waits_for_retry_after_then_succeeds(scripted):
    """A 429 is retried after exactly its Retry-After (not the shorter backoff)."""
    server = scripted(Answer(429, {"error": "rate limit exceeded"}, {"Retry-After": "3"}),
                      Answer(200, {"delivered": 4}))
    sleeps = Sleeps()
    assert GatewayClient(server.url, "token", backoff_s=0.1, sleep=sleeps).broadcast("e") == 4
    assert sleeps == [3.0]


def test_503_retry_after_longer_than_backoff_is_honoured(scripted):
    """A 503 with Retry-After waits at least that long before the retry."""
    server = scripted(Answer(503, {"error": "token store unavailable, retry later"}, {"Retry-After": "1"}),
                      Answer(200, {"delivered": 0, "queued": True}))
    sleeps = Sleeps()
    assert GatewayClient(server.url, "token", backoff_s=0.1, sleep=sleeps).publish(1, "e").queued is True
    assert sleeps == [1.0]


@pytest.mark.parametrize("status, error_type", [(400, BadRequest), (401, AuthError), (403, AuthError),
                                                (404, GatewayError), (405, GatewayError), (413, BadRequest),
                                                (422, GatewayError)])
def test_other_4xx_are_never_retried(scripted, status, error_type):
    """4xx other than 429 raise at once, typed by status, with the gateway's message."""
    server = scripted(Answer(status, {"error": f"refused with {status}"}))
    sleeps = Sleeps()
    with pytest.raises(error_type) as refused:
        GatewayClient(server.url, "token", sleep=sleeps).publish(21, "e")
    assert type(refused.value) is error_type
    assert (refused.value.status, refused.value.message) == (status, f"refused with {status}")
    assert sleeps == [] and len(server.received) == 1


def test_idempotency_key_is_sent_on_every_retry(scripted):
    """The Idempotency-Key header is the same on the first attempt and on each retry; absent when not given."""
    server = scripted(Answer(503, {"error": "busy"}), Answer(200, {"delivered": 1, "queued": False}),
                      Answer(200, {"delivered": 1}))
    publisher = GatewayClient(server.url, "token", sleep=Sleeps())
    publisher.publish(21, "e", idempotency_key="award-77")
    publisher.broadcast("e")
    assert [request.headers.get("idempotency-key") for request in server.received] == ["award-77", "award-77", None]


def test_request_shape(scripted):
    """Requests are JSON POSTs with the Bearer token, under the URL's path prefix."""
    server = scripted(Answer(200, {"delivered": 2}))
    GatewayClient(server.url + "/gw/", "secret-token").broadcast("e", [1], player_id="alice")
    request = server.received[0]
    assert (request.method, request.path) == ("POST", "/gw/broadcast")
    assert request.headers["authorization"] == "Bearer secret-token"
    assert request.headers["content-type"] == "application/json"
    assert request.json == {"event": "e", "payload": [1], "player_id": "alice"}


def test_batch_request_follows_the_agreed_contract(scripted):
    """publish_batch POSTs {"messages": [...]} to /publish/batch and reads {"results": [...]} in order."""
    server = scripted(Answer(200, {"results": [{"delivered": 2, "queued": False}, {"delivered": 0, "queued": True}]}))
    messages = [{"player_id": 21, "event": "a", "payload": {"x": 1}}, {"player_id": "22", "event": "b"}]
    results = GatewayClient(server.url, "token").publish_batch(messages)
    assert results == [PublishResult(2, False), PublishResult(0, True)]
    assert (server.received[0].path, server.received[0].json) == ("/publish/batch", {"messages": messages})


def test_connection_refused_is_retried_then_raises_unavailable():
    """Nothing listening: retried with backoff, then Unavailable without a status."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps = Sleeps()
    with pytest.raises(Unavailable) as failed:
        GatewayClient(f"http://127.0.0.1:{port}", "token", retries=3, backoff_s=0.5, sleep=sleeps).publish(1, "e")
    assert failed.value.status is None and "refused" in failed.value.message
    assert sleeps == [0.5, 1.0, 2.0]


def test_silent_gateway_times_out():
    """A gateway that accepts but never answers raises Unavailable after timeout_s."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with pytest.raises(Unavailable, match="timed out"):
            GatewayClient(f"http://127.0.0.1:{port}", "token", timeout_s=0.2, retries=0).publish(1, "e")


@pytest.mark.parametrize("url", ["127.0.0.1:8080", "ftp://host", "http://"])
def test_bad_url_is_refused_at_construction(url):
    """A URL that is not http(s)://HOST raises ValueError before any request."""
    with pytest.raises(ValueError):
        GatewayClient(url, "token")


def test_payload_that_is_not_json_is_refused_before_sending(scripted):
    """NaN or an unserialisable payload raises ValueError/TypeError; nothing is sent."""
    server = scripted(Answer(200, {"delivered": 0}))
    publisher = GatewayClient(server.url, "token")
    with pytest.raises(ValueError):
        publisher.publish(1, "e", float("nan"))
    with pytest.raises(TypeError):
        publisher.publish(1, "e", {1, 2})
    assert server.received == []


def test_presence_and_disconnect_requests(scripted):
    """presence is a GET without a body, retried on 503; disconnect POSTs the player id; both under the prefix."""
    server = scripted(Answer(503, {"error": "broker unavailable, retry later"}, {"Retry-After": "1"}),
                      Answer(200, {"players": 3, "connections": 4}),
                      Answer(200, {"player_id": "al ice", "connections": 1}), Answer(200, {"disconnected": 2}))
    client = GatewayClient(server.url + "/gw", "secret-token", sleep=Sleeps())
    assert client.presence() == {"players": 3, "connections": 4}
    assert client.presence("al ice") == {"player_id": "al ice", "connections": 1}
    assert client.disconnect(21) == 2
    shapes = [(request.method, request.path, request.headers.get("content-type")) for request in server.received]
    assert shapes == [("GET", "/gw/presence", None), ("GET", "/gw/presence", None),
                      ("GET", "/gw/presence", None), ("POST", "/gw/disconnect", "application/json")]
    assert server.received[-1].json == {"player_id": 21}
    assert all(request.headers["authorization"] == "Bearer secret-token" for request in server.received)


def test_presence_and_disconnect_against_the_gateway(gateway, tokens):
    """Against a real gateway: the counts, then the player's socket closed with 4002."""
    operator = client_for(gateway, tokens.server())
    client = gateway.connect(tokens.player(21))
    assert operator.presence() == {"players": 1, "connections": 1}
    assert operator.presence(21) == {"player_id": "21", "connections": 1}
    assert operator.presence("al ice&x=1") == {"player_id": "al ice&x=1", "connections": 0}  # the query is encoded
    assert operator.disconnect(21) == 1
    assert receive_close(client) == (4002, "disconnected by the server")
