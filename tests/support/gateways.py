"""An in-process gateway on a free port, its token table, and HTTP/WebSocket calls to it."""
from __future__ import annotations

import http.client
import json
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import websocket
from sqlalchemy import create_engine, text

from tests.support import TIMEOUT_S, wait_for
from wsgateway.config import Config, load
from wsgateway.server import Gateway
from wsgateway.tokens import utc_now


def gateway_config(database_url: str, *flags: str) -> Config:
    db = "mysql" if database_url.startswith("mysql") else "sqlite"
    return load(["-addr", "127.0.0.1:0", "-db", db, "-dsn", database_url, "-log-level", "debug", *flags], env={})


class TokenTable:
    """Rows of `ws_token`, written the way an application backend would."""

    def __init__(self, database_url: str) -> None:
        self.engine = create_engine(database_url)
        self._sqlite = database_url.startswith("sqlite")

    def _expiry(self, ttl_s: float) -> Any:
        moment = utc_now() + timedelta(seconds=ttl_s)
        return moment.strftime("%Y-%m-%d %H:%M:%S.%f") if self._sqlite else moment

    def _insert(self, token: str, player_id: int | None, subject_id: str, is_server: bool, ttl_s: float) -> str:
        with self.engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO ws_token (token, player_id, subject_id, is_server, expires_at) "
                "VALUES (:token, :player_id, :subject_id, :is_server, :expires_at)"),
                {"token": token, "player_id": player_id, "subject_id": subject_id,
                 "is_server": is_server, "expires_at": self._expiry(ttl_s)})
        return token

    def player(self, player_id: int | None = 21, *, subject_id: str = "player-subject",
               token: str | None = None, ttl_s: float = 3600) -> str:
        return self._insert(token or secrets.token_hex(16), player_id, subject_id, False, ttl_s)

    def server(self, subject_id: str = "backend-1", *, token: str | None = None, ttl_s: float = 3600) -> str:
        return self._insert(token or secrets.token_hex(16), None, subject_id, True, ttl_s)

    def revoke(self, token: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(text("DELETE FROM ws_token WHERE token = :token"), {"token": token})

    def expire(self, token: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(text("UPDATE ws_token SET expires_at = :past WHERE token = :token"),
                               {"token": token, "past": self._expiry(-60)})


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class GatewayUnderTest:
    """A started in-process gateway and the clients to talk to it."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.host, self.port = gateway.address
        self.tokens = TokenTable(gateway.config.database_url)
        self.clients: list[websocket.WebSocket] = []

    @classmethod
    def start(cls, config: Config) -> GatewayUnderTest:
        gateway = Gateway(config)
        gateway.start()
        return cls(gateway)

    def stop(self) -> None:
        for client in self.clients:  # hang up first: shutdown need not wait for their answers
            client.shutdown()
        self.gateway.shutdown(timeout_s=TIMEOUT_S)
        self.tokens.engine.dispose()

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    # --- HTTP --------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT_S)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def post(self, path: str, body: Any = None, *, token: str | None = None, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> Reply:
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else json.dumps(body).encode()
        return self.request("POST", path, data, all_headers)

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def publish(self, token: str, player_id: Any, event: str = "e", payload: Any = None) -> Reply:
        return self.post("/publish", {"player_id": player_id, "event": event, "payload": payload}, token=token)

    def broadcast(self, token: str, event: str = "e", payload: Any = None, player_id: Any = None) -> Reply:
        body: dict[str, Any] = {"event": event, "payload": payload}
        if player_id is not None:
            body["player_id"] = player_id
        return self.post("/broadcast", body, token=token)

    # --- WebSocket -------------------------------------------------------------------------
    def connect(self, token: str, query: str = "", **options: Any) -> websocket.WebSocket:
        """A connected client; waits until the gateway has registered it and its seat is
        taken (with -broker, until every gateway routes the player's messages to it).
        `query`: more of the query string, e.g. `&last_event_id=`."""
        before = self.metric("ws_active_connections")
        client = websocket.create_connection(f"{self.ws_url}?token={token}{query}", timeout=TIMEOUT_S, **options)
        self.clients.append(client)
        wait_for(lambda: self.metric("ws_active_connections") > before, what="connection registered")
        return client

    def refused(self, query: str = "", **options: Any) -> tuple[int, Any]:
        """Status and JSON body of a WebSocket request the gateway refuses before upgrading."""
        try:
            client = websocket.create_connection(f"{self.ws_url}{query}", timeout=TIMEOUT_S, **options)
        except websocket.WebSocketBadStatusException as refusal:
            return refusal.status_code, json.loads(refusal.resp_body or b"null")
        client.close()
        raise AssertionError("the WebSocket connection was accepted")

    def metric(self, name: str, **labels: str) -> float:
        return self.gateway.metrics.registry.get_sample_value(name, labels) or 0.0
