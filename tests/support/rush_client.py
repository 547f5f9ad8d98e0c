"""A connect rush from a process of its own, so that the gateway under test has the test
process's CPU to itself, as it would in production: `python -m tests.support.rush_client
PORT TIMEOUT_S TOKEN...` opens a connection for every token, `BURST` every `INTERVAL_S`
(the pace of the issue's client: 10,000 within a second), with non-blocking sockets and
epoll (no gevent), sends each its `/ws` upgrade, reads each status line and keeps the
socket until every one is answered. Prints one JSON line: {"statuses": {status: count}}
(0: no answer within TIMEOUT_S, -1: the connection failed)."""
from __future__ import annotations

import errno
import json
import select
import socket
import sys
import time

BURST, INTERVAL_S = 200, 0.020


def rush(port: int, tokens: list[str], timeout_s: float) -> dict[int, int]:
    poller = select.epoll()
    pending: dict[int, tuple[socket.socket, bytes, bytes]] = {}  # fd -> socket, request left, answer so far
    statuses: dict[int, int] = {}
    held: list[socket.socket] = []
    started = time.monotonic()
    unopened = list(reversed(tokens))

    def open_burst() -> None:
        for _ in range(min(BURST, len(unopened))):
            token = unopened.pop()
            sock = socket.socket()
            sock.setblocking(False)
            request = (f"GET /ws?token={token} HTTP/1.1\r\nHost: rush\r\nUpgrade: websocket\r\n"
                       "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                       "Sec-WebSocket-Version: 13\r\n\r\n").encode()
            if sock.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
                statuses[-1] = statuses.get(-1, 0) + 1
                sock.close()
                continue
            pending[sock.fileno()] = (sock, request, b"")
            poller.register(sock.fileno(), select.EPOLLOUT)

    bursts = 0
    deadline = time.monotonic() + timeout_s
    while (pending or unopened) and time.monotonic() < deadline:
        now = time.monotonic()
        if unopened and now >= started + bursts * INTERVAL_S:
            open_burst()
            bursts += 1
        wait_s = max(0.0, started + bursts * INTERVAL_S - now) if unopened else 0.1
        for fd, _ in poller.poll(wait_s):
            sock, request, answer = pending[fd]
            try:
                if request:
                    request = request[sock.send(request):]
                    if not request:
                        poller.modify(fd, select.EPOLLIN)
                    pending[fd] = (sock, request, answer)
                    continue
                chunk = sock.recv(4096)
            except OSError:
                chunk, answer = b"", b""
            answer += chunk
            if b"\r\n" in answer or not chunk:
                status = int(answer.split(b" ", 2)[1]) if chunk else -1
                statuses[status] = statuses.get(status, 0) + 1
                poller.unregister(fd)
                del pending[fd]
                held.append(sock)
            else:
                pending[fd] = (sock, request, answer)
    if pending:
        statuses[0] = len(pending)
    for sock in held + [entry[0] for entry in pending.values()]:
        sock.close()
    return statuses


def main() -> None:
    port, timeout_s, tokens = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
    print(json.dumps({"statuses": rush(port, tokens, timeout_s)}), flush=True)


if __name__ == "__main__":
    main()
