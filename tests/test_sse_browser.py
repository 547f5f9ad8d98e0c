"""`GET /events` in a real browser: an `EventSource` in Debian's headless Chromium receives named events (also
from another origin, through CORS), reconnects by itself after the gateway ends the stream, stops when its
token was revoked (the reconnection is refused 401), and resumes with Last-Event-ID after a restart with -broker."""
from __future__ import annotations

import json

from tests.support import TIMEOUT_S, wait_for
from tests.support.browser import BROWSER_STEP_TIMEOUT_S, BrowserScript, require_browser
from tests.support.processes import free_port
from wsgateway.errors import CloseCode

EVENTS = ["score", "round_over", "gateway.close"]


def unexpected(problems: list[str]) -> list[str]:
    """The page's errors, less the browser's console lines for refused loads (the 401 of a revoked token's
    reconnection, the 404 of the page's favicon)."""
    return [problem for problem in problems if not problem.startswith("Failed to load resource")]


def test_event_source_receives_named_events_reconnects_and_stops_when_revoked(start_gateway):
    """Named events arrive as sent; after gateway.close 1001 the browser reconnects by itself; after 1008 it is
    refused 401 and stays closed."""
    require_browser()
    gateway = start_gateway()
    server, token = gateway.tokens.server(), gateway.tokens.player(21)
    browser = BrowserScript({"page": f"http://{gateway.host}:{gateway.port}/healthz"}, "event_source_check.mjs")
    try:
        browser.step("loaded")
        browser.tell(json.dumps({"cmd": "open", "url": f"/events?token={token}", "events": EVENTS}))
        browser.step("opened")
        browser.tell(json.dumps({"cmd": "wait", "opens": 1}))
        browser.step("waited")
        wait_for(lambda: gateway.gateway.hub.connection_count() == 1, what="the browser's stream seated")
        assert gateway.publish(server, 21, "score", {"points": 5, "big": 2 ** 53 - 1}).status == 200
        assert gateway.broadcast(server, "round_over", {"round": 3}).status == 200
        assert gateway.publish(server, 21, "two\nlines", [1]).status == 200
        browser.tell(json.dumps({"cmd": "wait", "events": 3}))
        seen = browser.step("waited")
        assert [(event["type"], event["data"]) for event in seen["events"]] == [
            ("score", {"points": 5, "big": 2 ** 53 - 1}), ("round_over", {"round": 3}),
            ("message", {"event": "two\nlines", "payload": [1]})]

        (connection,) = gateway.gateway.hub.connections()
        connection.close(CloseCode.GOING_AWAY)
        browser.tell(json.dumps({"cmd": "wait", "events": 4, "opens": 2}))  # the retry hint is at most 5 s
        seen = browser.step("waited")
        assert seen["events"][3] == {"type": "gateway.close", "data": {"code": 1001, "reason": "server shutting down"},
                                     "lastEventId": ""}
        wait_for(lambda: gateway.gateway.hub.connection_count() == 1, what="the browser's new stream")
        assert gateway.metric("ws_sse_disconnects_total", code="1001") == 1
        assert gateway.publish(server, 21, "score", "after").status == 200
        browser.tell(json.dumps({"cmd": "wait", "events": 5}))
        assert browser.step("waited")["events"][4]["data"] == "after"

        gateway.tokens.revoke(token)
        assert gateway.gateway.revalidator.run_once() == 1
        browser.tell(json.dumps({"cmd": "wait", "events": 6}))
        assert browser.step("waited")["events"][5]["data"] == {"code": 1008, "reason": "token revoked or expired"}
        wait_for(lambda: gateway.metric("ws_connections_rejected_total", reason="unauthorized") == 1,
                 what="the browser's reconnection refused", timeout_s=30)
        browser.tell(json.dumps({"cmd": "state"}))
        state = browser.step("state")
        assert state["readyState"] == 2  # CLOSED: a 401 is not retried
        assert unexpected(state["problems"]) == []

        # From another origin (localhost is not 127.0.0.1): CORS lets the page read the stream.
        other = gateway.tokens.player(22)
        browser.tell(json.dumps({"cmd": "open", "url": f"http://localhost:{gateway.port}/events?token={other}",
                                 "events": EVENTS}))
        browser.step("opened")
        browser.tell(json.dumps({"cmd": "wait", "opens": 1}))
        browser.step("waited")
        wait_for(lambda: gateway.gateway.hub.is_connected("22"), what="the cross-origin stream seated")
        assert gateway.publish(server, 22, "score", "cross-origin").status == 200
        browser.tell(json.dumps({"cmd": "wait", "events": 1}))
        assert browser.step("waited")["events"] == [{"type": "score", "data": "cross-origin", "lastEventId": ""}]
        browser.tell(json.dumps({"cmd": "quit"}))
        assert browser.finish() == 0
    finally:
        browser.kill()


def test_event_source_resumes_after_the_gateway_restarts_with_broker(start_gateway, private_redis):
    """With -broker and a history, the gateway behind the page shuts down and another takes its port: the
    browser's EventSource (on another origin) reconnects by itself with Last-Event-ID and gets exactly what was
    published (through a second gateway) meanwhile, then live events, none twice."""
    require_browser()
    port = free_port()
    flags = ("-broker", private_redis.url, "-history-size", "50", "-history-ttl", "1m")
    gateway = start_gateway("-addr", f"127.0.0.1:{port}", *flags)
    other = start_gateway(*flags)
    server, token = gateway.tokens.server(), gateway.tokens.player(21)
    # The page is on another origin (localhost, the stream 127.0.0.1): Last-Event-ID crosses origins as it is.
    browser = BrowserScript({"page": f"http://localhost:{port}/healthz"}, "event_source_check.mjs")
    try:
        browser.step("loaded")
        browser.tell(json.dumps({"cmd": "open", "url": f"http://127.0.0.1:{port}/events?token={token}",
                                 "events": ["n", "b"]}))
        browser.step("opened")
        browser.tell(json.dumps({"cmd": "wait", "opens": 1}))
        browser.step("waited")
        wait_for(lambda: gateway.gateway.hub.connection_count() == 1, what="the browser's stream seated")
        assert gateway.publish(server, 21, "n", 0).status == 200
        browser.tell(json.dumps({"cmd": "wait", "events": 1}))
        first_id = browser.step("waited")["events"][0]["lastEventId"]
        assert first_id

        gateway.gateway.shutdown(timeout_s=TIMEOUT_S)
        assert other.publish(server, 21, "n", 1).json == {"delivered": 0, "queued": True}
        assert other.broadcast(server, "b", 2).status == 200
        assert other.publish(server, 21, "n", 3).status == 200
        restarted = start_gateway("-addr", f"127.0.0.1:{port}", *flags)
        wait_for(lambda: restarted.metric("ws_resumes_total", outcome="recovered") == 1,
                 timeout_s=BROWSER_STEP_TIMEOUT_S, what="the browser reconnected by itself, and resumed")
        assert other.publish(server, 21, "n", 4).json["delivered"] == 1
        browser.tell(json.dumps({"cmd": "wait", "events": 5}))
        seen = browser.step("waited")
        assert [(event["type"], event["data"]) for event in seen["events"]] == \
            [("n", 0), ("n", 1), ("b", 2), ("n", 3), ("n", 4)]
        ids = [event["lastEventId"] for event in seen["events"]]
        assert len(set(ids)) == 5 and ids[0] == first_id
        assert seen["opens"] == 2 and unexpected(seen["problems"]) == []
        browser.tell(json.dumps({"cmd": "quit"}))
        assert browser.finish() == 0
    finally:
        browser.kill()
