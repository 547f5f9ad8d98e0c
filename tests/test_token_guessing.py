"""Guessing tokens, on a real gateway: past `-auth-fail-limit` refused tokens a client
address gets 429 with Retry-After before its token is looked up (no query), counted in
`ws_auth_throttled_total`; other addresses, and tokens that authenticated recently, go
on as before, for `/ws` player tokens and publishing bearer tokens alike."""
from __future__ import annotations

import http.client
import json
import secrets
import socket
from typing import Callable, Iterator

import pytest
import websocket
from sqlalchemy import event

from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import receive_event
from tests.support.gateways import GatewayUnderTest, Reply

PLAYER = 21


class QueryCounter:
    """Counts the statements the gateway's own engine sends to the database."""

    def __init__(self, gateway: GatewayUnderTest) -> None:
        self.engine = gateway.gateway.store.engine
        self.count = 0
        event.listen(self.engine, "before_cursor_execute", self._seen)

    def _seen(self, *args: object) -> None:
        self.count += 1

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


@pytest.fixture
def queries() -> Iterator[Callable[[GatewayUnderTest], QueryCounter]]:
    counters: list[QueryCounter] = []

    def count(gateway: GatewayUnderTest) -> QueryCounter:
        counters.append(QueryCounter(gateway))
        return counters[-1]
    yield count
    for counter in counters:
        counter.close()


def ws_status(gateway: GatewayUnderTest, token: str, source: str = "127.0.0.1") -> tuple[int, dict[str, str]]:
    """The status of a /ws upgrade from `source` (101 when accepted), and the refusal's headers."""
    sock = socket.create_connection((gateway.host, gateway.port), timeout=TIMEOUT_S, source_address=(source, 0))
    try:
        client = websocket.create_connection(f"{gateway.ws_url}?token={token}", timeout=TIMEOUT_S, socket=sock)
    except websocket.WebSocketBadStatusException as refusal:
        sock.close()
        return refusal.status_code, {k.lower(): v for k, v in (refusal.resp_headers or {}).items()}
    gateway.clients.append(client)
    return 101, {}


def publish_from(gateway: GatewayUnderTest, token: str, source: str = "127.0.0.1") -> Reply:
    connection = http.client.HTTPConnection(gateway.host, gateway.port, timeout=TIMEOUT_S,
                                            source_address=(source, 0))
    try:
        connection.request("POST", "/publish", json.dumps({"player_id": PLAYER, "event": "e"}),
                           {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def guess() -> str:
    return secrets.token_hex(16)


def test_player_guesses_past_the_limit_get_429_without_a_query(start_gateway, queries):
    """After -auth-fail-limit unknown player tokens, the address gets 429 with Retry-After and no lookup is made."""
    gateway = start_gateway("-auth-fail-limit", "3")
    counter = queries(gateway)
    assert [ws_status(gateway, guess())[0] for _ in range(3)] == [401, 401, 401]
    before = counter.count
    status, headers = ws_status(gateway, guess())
    assert status == 429
    assert 15 <= int(headers["retry-after"]) <= 20  # one refused token refills in 60 s / 3
    assert counter.count == before
    assert gateway.metric("ws_auth_throttled_total", kind="player") == 1
    assert gateway.metric("ws_connections_rejected_total", reason="throttled") == 1
    assert gateway.metric("ws_auth_failures_total", kind="player", reason="invalid") == 3


def test_recently_valid_player_still_connects_from_a_throttled_address(start_gateway):
    """A player whose token authenticated within -revalidate-period connects from an address over its limit."""
    gateway = start_gateway("-auth-fail-limit", "2")
    token = gateway.tokens.player(PLAYER)
    assert ws_status(gateway, token)[0] == 101
    for _ in range(2):
        assert ws_status(gateway, guess())[0] == 401
    assert ws_status(gateway, guess())[0] == 429
    assert ws_status(gateway, token)[0] == 101
    assert ws_status(gateway, guess())[0] == 429


def test_other_addresses_are_not_throttled(start_gateway):
    """One address over its limit leaves another address's new valid tokens alone."""
    gateway = start_gateway("-auth-fail-limit", "2")
    for _ in range(3):
        ws_status(gateway, guess(), source="127.0.0.2")
    assert ws_status(gateway, guess(), source="127.0.0.2")[0] == 429
    assert ws_status(gateway, guess(), source="127.0.0.3")[0] == 401
    assert ws_status(gateway, gateway.tokens.player(PLAYER), source="127.0.0.3")[0] == 101
    assert publish_from(gateway, guess(), source="127.0.0.2").status == 429
    assert publish_from(gateway, guess(), source="127.0.0.3").status == 403


def test_a_new_valid_token_waits_for_the_address_budget(start_gateway):
    """A never-seen valid token from a throttled address gets 429 until one refused token has refilled, then connects."""
    gateway = start_gateway("-auth-fail-limit", "20")  # one refills every 3 s
    for _ in range(40):  # until refused, however slowly the guesses go on a loaded machine
        if ws_status(gateway, guess())[0] == 429:
            break
    token = gateway.tokens.player(PLAYER)
    status, headers = ws_status(gateway, token)
    assert status == 429 and 1 <= int(headers["retry-after"]) <= 3
    wait_for(lambda: ws_status(gateway, token)[0] == 101, timeout_s=3 * TIMEOUT_S, what="the budget to refill")


def test_server_token_guesses_past_the_limit_get_429(start_gateway, queries):
    """Unknown bearer tokens past the limit get 429 with no lookup; a valid server token keeps publishing."""
    gateway = start_gateway("-auth-fail-limit", "3")
    server = gateway.tokens.server()
    client = gateway.connect(gateway.tokens.player(PLAYER))
    assert publish_from(gateway, server).status == 200
    counter = queries(gateway)
    assert [publish_from(gateway, guess()).status for _ in range(3)] == [403, 403, 403]
    before = counter.count
    reply = publish_from(gateway, guess())
    assert reply.status == 429 and 15 <= int(reply.headers["retry-after"]) <= 20
    assert "too many refused tokens" in reply.json["error"]
    assert counter.count == before
    assert publish_from(gateway, server).status == 200
    assert gateway.metric("ws_auth_throttled_total", kind="server") == 1
    assert gateway.metric("ws_messages_published_total") == 2
    assert [receive_event(client)["event"] for _ in range(2)] == ["e", "e"]


def test_player_and_server_failures_share_the_address_budget(start_gateway):
    """Refused player and server tokens from one address count together."""
    gateway = start_gateway("-auth-fail-limit", "2")
    assert ws_status(gateway, guess())[0] == 401
    assert publish_from(gateway, guess()).status == 403
    assert publish_from(gateway, guess()).status == 429
    assert ws_status(gateway, guess())[0] == 429


def test_zero_limit_never_throttles(start_gateway):
    """-auth-fail-limit 0: every unknown token gets its 401, however many."""
    gateway = start_gateway("-auth-fail-limit", "0")
    assert {ws_status(gateway, guess())[0] for _ in range(40)} == {401}
    assert gateway.metric("ws_auth_throttled_total", kind="player") == 0


def test_missing_tokens_do_not_count(start_gateway):
    """A request without any token costs no lookup and does not use up the address's budget."""
    gateway = start_gateway("-auth-fail-limit", "2")
    for _ in range(5):
        assert ws_status(gateway, "")[0] == 401
        assert publish_from(gateway, "").status == 401
    assert ws_status(gateway, guess())[0] == 401
