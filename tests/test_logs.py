"""wsgateway.logs, and the promise behind it: no token reaches a log line, whatever path a
request takes (access log, refusals, malformed requests, revalidation, database trouble)."""
from __future__ import annotations

import json
import secrets
import signal
import socket
import sqlite3

import pytest
import websocket

from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import receive_close, receive_event
from tests.support.gateways import TokenTable
from tests.support.processes import GatewayProcess
from wsgateway.logs import redact


@pytest.mark.parametrize("text", [
    "GET /ws?token=SECRET HTTP/1.1",
    "GET /ws?a=1&token=SECRET&b=2 HTTP/1.1",
    "GET /ws?TOKEN=SECRET HTTP/1.1",
    "GET /ws?%74oken=SECRET HTTP/1.1",
    "GET /ws?%54%4F%4B%45%4E=SECRET HTTP/1.1",
    "GET /ws?tok%65n%3DSECRET HTTP/1.1",
    "Authorization: Bearer SECRET",
    "authorization: bearer   SECRET",
    "'GET /ws?token=SECRET\\r\\n'",
])
def test_redact_masks_tokens_in_any_spelling(text):
    """token= (also percent-encoded, as a query parser would decode it) and Bearer values are masked."""
    assert "SECRET" not in redact(text)
    assert "[REDACTED]" in redact(text)


def test_redact_keeps_ordinary_text():
    """Text without a token is left alone."""
    text = 'player 21 connected from 127.0.0.1, code 1000, "tokens": 3'
    assert redact(text) == text


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, return whatever comes back until the gateway hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_no_token_reaches_any_log_line(tmp_path):
    """Tokens used in every way (valid, refused, malformed, slow, revoked, during an outage) never reach the log or stderr."""
    process = GatewayProcess(tmp_path, "-revalidate-period", "300ms", "-db-timeout", "500ms",
                             "-header-timeout", "1s")
    try:
        process.wait_ready()
        table = TokenTable(process.database_url)
        secrets_used: list[str] = []

        def token(kind: str = "player", player_id: int = 21) -> str:
            value = table.server(token=secrets.token_hex(16)) if kind == "server" else table.player(
                player_id, token=secrets.token_hex(16))
            secrets_used.append(value)
            return value

        def unknown() -> str:
            value = secrets.token_hex(16)
            secrets_used.append(value)
            return value

        server = token("server")
        revoked = token(player_id=21)
        client = websocket.create_connection(f"{process.ws_url}?token={revoked}", timeout=TIMEOUT_S)
        body = json.dumps({"player_id": 21, "event": "hello!"})
        publish = (f"POST /publish HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {server}\r\nConnection: close\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n{body}")
        assert raw_exchange(process.port, publish.encode()).startswith(b"HTTP/1.1 200")
        assert receive_event(client) == {"event": "hello!", "payload": None}

        refused = [
            f"GET /ws?token={unknown()} HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            f"POST /publish HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {unknown()}\r\nConnection: close\r\n"
            "Content-Length: 2\r\n\r\n{}",
            f"GET /ws?token={unknown()} HTTP/9.9\r\n\r\n",
            f"GET /ws?%74oken={unknown()} HTTP/9.9\r\n\r\n",
            f"GET /ws?token={unknown()}\r\n\r\n",
            f"BREW /ws?token={unknown()} HTTP/1.1 extra\r\n\r\n",
            f"GET /ws?token={unknown()} HTTP/1.1\r\nBroken header line\r\n\r\n",
            f"GET /ws?token={unknown()}&{'x' * 9000} HTTP/1.1\r\n\r\n",
            f"GET /nowhere?token={unknown()} HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n",
            f"POST /publish?token={unknown()} HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        ]
        for request in refused:
            answer = raw_exchange(process.port, request.encode("latin-1"))
            assert answer == b"" or answer.split(b" ", 2)[1][:1] in (b"4", b"5"), (request[:60], answer[:80])
        slow = f"GET /ws?token={unknown()} HTTP/1.1\r\nHost: g\r\n".encode()  # then nothing: 408 at -header-timeout
        assert raw_exchange(process.port, slow).startswith(b"HTTP/1.1 408")

        table.revoke(revoked)  # revalidation closes it and logs that it did
        assert receive_close(client)[0] == 1008

        survivor = websocket.create_connection(f"{process.ws_url}?token={token(player_id=22)}", timeout=TIMEOUT_S)
        latecomer = token(player_id=23)
        lock = sqlite3.connect(process.db_path, isolation_level=None, timeout=0)
        lock.execute("BEGIN EXCLUSIVE")  # the database is unavailable: revalidation and logins fail
        try:
            wait_for(lambda: "revalidation_failed" in process.log_file.read_text(), 2 * TIMEOUT_S,
                     what="a failed revalidation logged")
            with pytest.raises(websocket.WebSocketBadStatusException) as outage:
                websocket.create_connection(f"{process.ws_url}?token={latecomer}", timeout=TIMEOUT_S)
            assert outage.value.status_code == 503
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        table.engine.dispose()
        process.send_signal(signal.SIGTERM)
        assert receive_close(survivor)[0] == 1001
        assert process.wait() == 0
    finally:
        process.kill()

    log = process.log_file.read_text()
    events = {json.loads(line)["event"] for line in log.splitlines()}
    assert {"ws_connected", "http_request", "bad_request", "token_revoked", "revalidation_failed",
            "store_unavailable", "stopped"} <= events, events
    stderr = process.stderr_file.read_text()
    leaked = [secret for secret in secrets_used if secret in log or secret in stderr]
    assert leaked == [], [line for line in log.splitlines() if any(secret in line for secret in leaked)]


def test_gevent_hub_errors_become_one_json_line(monkeypatch, capsys):
    """An error that ends a greenlet is logged as one JSON line, not gevent's traceback on stderr."""
    import io
    import logging

    import gevent

    from wsgateway.logs import JsonFormatter, route_gevent_errors

    hub = gevent.get_hub()
    monkeypatch.setattr(hub, "print_exception", hub.print_exception)  # restored after the test
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logging.getLogger("wsgateway.hub").addHandler(handler)
    try:
        route_gevent_errors()
        gevent.spawn(lambda: 1 / 0).join()
    finally:
        logging.getLogger("wsgateway.hub").removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert (line["event"], line["error_type"]) == ("internal_error", "ZeroDivisionError")
    assert "ZeroDivisionError" in line["exception"]
    assert "Traceback" not in capsys.readouterr().err
