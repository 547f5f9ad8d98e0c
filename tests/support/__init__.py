"""Test helpers, one module per concern:

    gateways      an in-process gateway on a free port, its token table, HTTP and WebSocket calls
    clients       what a WebSocket or raw-socket client reads back (events, closes, raw answers)
    event_streams a Server-Sent Events client (`GET /events`) over a raw socket
    browser       headless Chromium driven by a node script in tests/browser
    frames        raw WebSocket frames as a client builds them, and a socket-level client
    fakes         a clock and a connection for the pure-module unit tests
    processes     bin/ws-gateway as a child process, free ports, a TCP relay that can be cut
    redis_server  the shared Redis's URL, and a private server a test may restart
    redis_cluster a Redis Cluster of the run's own (three masters, three replicas) on free ports
    netns         network namespaces a test makes: hosts behind a router, cut off and healed

This module holds what all of them share: the suite's one timeout unit, and waiting on a
condition with it (never on a fixed sleep)."""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import gevent


TIMEOUT_S = float(os.environ.get("WS_GATEWAY_TEST_TIMEOUT", "5"))  # the one timeout unit of the suite


def wait_for(condition: Callable[[], Any], timeout_s: float = TIMEOUT_S, what: str = "condition") -> Any:
    """Poll `condition` until it is truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        gevent.sleep(0.005)
