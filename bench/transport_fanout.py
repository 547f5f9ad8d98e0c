#!/usr/bin/env python3
"""The gateway's own cost of one broadcast delivery, by transport: WebSocket connections against
event streams (`GET /events`), in one process, on socket pairs, without HTTP or clients.

`N` connections of one kind in a hub, `B` broadcasts of a ~150-byte message, written by the
flusher as in the gateway, five rounds; prints the best CPU time per delivery. On a busy
machine the times are noise: count instructions instead, two runs per kind with different `B`,
under callgrind (load-independent); the difference over the extra deliveries is the cost of one:

    for kind in websocket sse; do for b in 10 30; do
      N=300 B=$b valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
          .venv/bin/python bench/transport_fanout.py $kind 2>&1 | grep Collected
    done; done
    # (instructions at B=30 - at B=10) / (20 broadcasts x 300 connections x 5 rounds)
"""
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wsgateway.connection import Connection, PlayerConnection  # noqa: E402
from wsgateway.connection_sse import EventStreamConnection  # noqa: E402
from wsgateway.hub import Hub  # noqa: E402
from wsgateway.outbox import FLUSHER, OutboxLimits  # noqa: E402
from wsgateway.protocol import event_frame  # noqa: E402

CONNECTIONS = int(os.environ.get("N", "1000"))
BROADCASTS = int(os.environ.get("B", "50"))
ROUNDS = 5
LIMITS = OutboxLimits(1 << 20, 1 << 30, write_timeout_s=60)


def connection_of(kind: str, sock: socket.socket, player_id: str) -> PlayerConnection:
    if kind == "websocket":
        return Connection(sock, None, limits=LIMITS, max_message_bytes=1024, player_id=player_id)
    stream = EventStreamConnection(sock, b"", limits=LIMITS, player_id=player_id)
    stream.release([])
    return stream


def drain(client_ends: list[socket.socket]) -> None:
    for end in client_ends:
        try:
            while end.recv(1 << 20):
                pass
        except BlockingIOError:
            pass


def cost_per_delivery_us(kind: str) -> float:
    hub = Hub()
    pairs = [socket.socketpair() for _ in range(CONNECTIONS)]
    for index, (server_end, client_end) in enumerate(pairs):
        server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
        client_end.setblocking(False)
        hub.add(connection_of(kind, server_end, str(index)))
    best = float("inf")
    for _ in range(ROUNDS):
        frames = [event_frame("fanout", {"round": number, "text": "x" * 100}) for number in range(BROADCASTS)]
        started = time.process_time()
        for frame in frames:
            hub.broadcast(frame)
        gevent.sleep(0)
        while FLUSHER._greenlet is not None:
            gevent.sleep(0)
        best = min(best, (time.process_time() - started) / (CONNECTIONS * BROADCASTS) * 1e6)
        drain([client_end for _, client_end in pairs])
    for server_end, client_end in pairs:
        server_end.close()
        client_end.close()
    return best


if __name__ == "__main__":
    for kind in sys.argv[1:] or ["websocket", "sse"]:
        print(f"{kind}: {cost_per_delivery_us(kind):.2f} µs CPU per delivery "
              f"({CONNECTIONS} connections x {BROADCASTS} broadcasts, best of {ROUNDS})", flush=True)
