"""The browser console: /console only with -console, its headers, and the page driven end to end in
Debian's headless Chromium (connect, publish, read the event, reconnect after 1001, stop after 1008; then the
operator's counts, presence look-up and disconnect; and resuming after a lost socket, recovered or not)."""
from __future__ import annotations

import json
import logging
import os

import gevent

from tests.support import TIMEOUT_S, wait_for
from tests.support.browser import BrowserScript, require_browser
from tests.support.clients import receive_close, receive_event
from tests.support.processes import TcpForwarder
from wsgateway.errors import CloseCode

SCREENSHOT = os.environ.get("WS_GATEWAY_CONSOLE_SCREENSHOT")  # `make console-screenshot` sets it


def test_console_is_404_unless_enabled(gateway):
    """Without -console, /console and its script are 404 like any unknown path."""
    assert gateway.get("/console").status == 404
    assert gateway.get("/console/console.js").status == 404


def test_console_page_and_script_are_served_with_a_strict_policy(start_gateway):
    """With -console, the page and its script are served, with a CSP that allows only their own origin."""
    gateway = start_gateway("-console")
    page = gateway.get("/console")
    assert page.status == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert b'<script src="console/console.js">' in page.body
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    script = gateway.get("/console/console.js")
    assert script.status == 200 and script.headers["content-type"].startswith("text/javascript")
    assert b"new WebSocket" in script.body


def test_console_in_a_real_browser(start_gateway, caplog):
    """In headless Chromium the console connects, publishes, shows the event, reconnects after 1001, stops at
    1008; as an operator it shows live counts, looks a player up and disconnects it (4002), the token in no URL."""
    require_browser()
    gateway = start_gateway("-console")
    player_token, server_token = gateway.tokens.player(21), gateway.tokens.server()
    caplog.set_level(logging.DEBUG, logger="wsgateway")
    browser = BrowserScript({"url": f"http://{gateway.host}:{gateway.port}", "playerToken": player_token,
                             "serverToken": server_token, "playerId": "21", "screenshot": SCREENSHOT})
    try:
        loaded = browser.step("loaded")
        assert (loaded["title"], loaded["state"]) == ("ws-gateway console", "idle")
        assert browser.step("open")["opened"] == "1"
        assert gateway.gateway.hub.connection_count() == 1

        received = browser.step("received")
        assert (received["event"], received["payload"]) == ("flag_captured", {"target": "web01", "points": 100})
        assert len(received["time"]) == len("12:34:56.789")
        assert "200" in received["publishResult"] and '"delivered":1' in received["publishResult"]
        assert gateway.metric("ws_messages_delivered_total") == 1

        assert browser.step("waiting")["for"] == "closed-1001"
        for connection in list(gateway.gateway.hub.connections()):
            connection.close(CloseCode.GOING_AWAY)
        browser.tell("closed-1001")
        reconnected = browser.step("reconnected")
        assert reconnected["closeCode"].startswith("1001 gateway shutting down")
        assert any("reconnecting in" in entry for entry in reconnected["log"])
        wait_for(lambda: gateway.gateway.hub.connection_count() == 1, what="the page's new connection")
        assert browser.step("broadcast")["count"] == "2"

        assert browser.step("waiting")["for"] == "revoked"
        gateway.tokens.revoke(player_token)
        gateway.gateway.revalidator.run_once()
        browser.tell("revoked")
        stopped = browser.step("stopped")
        assert stopped["state"] == "closed" and "not reconnecting" in stopped["detail"]
        assert stopped["closeCode"].startswith("1008 token revoked or expired")
        assert stopped["problems"] == []
        wait_for(lambda: gateway.gateway.hub.connection_count() == 0, what="the page's socket gone")
        assert gateway.metric("ws_disconnects_total", code="1008") == 1

        assert "403" in browser.step("refused")["watchState"]  # a wrong server token shows nothing
        assert browser.step("waiting")["for"] == "players-connected"
        cut_off = [gateway.connect(gateway.tokens.player(30)) for _ in range(2)]
        bystander = gateway.connect(gateway.tokens.player(31))
        browser.tell("players-connected")
        counts = browser.step("counts")
        assert counts["watchState"] == "watching" and counts["dropped"] == "0.0"
        assert browser.step("waiting")["for"] == "published"
        for number in range(20):
            assert gateway.publish(server_token, 31, "tick", number).status == 200
        browser.tell("published")
        assert float(browser.step("rate")["published"]) > 0
        assert '{"player_id":"30","connections":2}' in browser.step("presence")["result"]
        # The page disconnects player 30 next: its clients answer the close while the page waits.
        closes = [gevent.spawn(receive_close, client) for client in cut_off]
        disconnected = browser.step("disconnected")
        assert disconnected["status"] == "200" and '{"disconnected":2}' in disconnected["result"]
        gevent.joinall(closes, timeout=TIMEOUT_S)
        assert [close.get(block=False) for close in closes] == [(4002, "disconnected by the server")] * 2
        assert bystander.connected and disconnected["connections"] == "1"
        assert disconnected["problems"] == []
        # The server token never travels in a URL, nor reaches a log line.
        urls = [disconnected["pageUrl"], *disconnected["requested"]]
        assert not [url for url in urls if server_token in url]
        assert any(url.endswith("/presence?player_id=30") for url in urls)
        assert server_token not in caplog.text
        assert browser.finish() == 0
    finally:
        browser.kill()


HISTORY = ("-history-size", "100", "-history-ttl", "1m")


def test_console_resumes_in_a_real_browser(start_gateway):
    """In headless Chromium, the page's socket cut while another tab stays open and events are published: it
    reconnects after the last id it showed, shows each event once, in order, and says it recovered; moved to a
    gateway that never had that history, it shows the gateway.missed notice, says it did not recover, and goes
    on with the new ids."""
    require_browser()
    gateway = start_gateway("-console", *HISTORY)
    server, token = gateway.tokens.server(), gateway.tokens.player(21)
    other_tab = gateway.connect(token)
    relay = TcpForwarder((gateway.host, gateway.port))  # the page's way to the gateway, to be cut
    browser = BrowserScript({"url": f"http://127.0.0.1:{relay.port}", "playerToken": token,
                             "screenshot": SCREENSHOT and SCREENSHOT.replace(".png", "-resume.png")},
                            "resume_check.mjs")
    try:
        assert browser.step("open")["state"] == "none"
        for number in range(3):
            assert gateway.publish(server, 21, "n", number).status == 200
        before = browser.step("waiting")["events"]
        relay.cut()
        wait_for(lambda: gateway.metric("ws_active_connections") == 1, what="the page's socket gone")
        for number in range(3, 6):
            reply = gateway.publish(server, 21, "n", number) if number < 5 else gateway.broadcast(server, "n", number)
            assert reply.status == 200
        assert [receive_event(other_tab)["payload"] for _ in range(6)] == list(range(6))  # delivered, not queued
        relay.restore()
        browser.tell("published-while-away")

        recovered = browser.step("recovered")
        shown = recovered["events"]
        assert [event["payload"] for event in shown] == [str(number) for number in range(6)]
        assert shown[:3] == before and len({event["id"] for event in shown}) == 6 and all(e["id"] for e in shown)
        assert recovered["state"] == "recovered" and before[-1]["id"] in recovered["text"]
        assert any(f"connecting, resuming after {before[-1]['id']}" in entry for entry in recovered["log"])
        assert recovered["lastId"] == shown[-1]["id"]
        assert gateway.metric("ws_resumes_total", outcome="recovered") >= 1

        assert browser.step("waiting")["for"] == "history-lost"
        elsewhere = start_gateway("-console", *HISTORY)  # no -broker: it knows nothing of the first's history
        relay.target = (elsewhere.host, elsewhere.port)
        relay.cut()
        relay.restore()
        browser.tell("history-lost")
        lost = browser.step("not-recovered")
        assert lost["state"] == "lost" and "history_lost" in lost["text"]
        assert any(f"not recovered after {shown[-1]['id']}: history_lost" in entry for entry in lost["log"])
        assert browser.step("waiting")["for"] == "published-after"
        assert elsewhere.publish(server, 21, "n", 6).status == 200
        browser.tell("published-after")
        after = browser.step("after")
        notice, new = after["events"][6:]
        assert (notice["event"], notice["id"]) == ("gateway.missed", "")
        assert json.loads(notice["payload"])["recovered"] is False
        assert new["payload"] == "6" and new["id"] and after["lastId"] == new["id"]
        assert after["problems"] == []
        assert browser.finish() == 0
    finally:
        browser.kill()
        relay.close()
