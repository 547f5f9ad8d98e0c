"""Instructions per HTTP request, counted by callgrind: load-independent figures for a
before and after on a shared machine, where wall and CPU times move with the load.

One gateway runs in this process (sqlite, `-rate-limit 0`); a client process sends the
requests one after another; callgrind counts only while the measured requests run
(`callgrind_control -i on`, after 50 to warm the caches up). Run it under valgrind:

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/instructions.py publish 500      # or: batch 40, close 500, connect 500

and divide valgrind's "Collected" by the count. `publish`: keep-alive `/publish`;
`batch`: `/publish/batch` of 100 messages; `close`: `/publish` on a new connection each,
with `Connection: close`; `connect`: a player's `/ws` upgrade on a new connection each, its
101, then the client hangs up (the connection's whole life: accept, handshake, lookup,
seat, teardown). `--project DIR` measures another checkout. Counts vary by a
few per cent from run to run (how often the loop finds a socket not yet readable): run
each side twice or more.
"""
from __future__ import annotations

import gevent.monkey

gevent.config.track_greenlet_tree = False
gevent.monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

CLIENT = r'''
import json, socket, sys
port, token, kind, count = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
if kind == "batch":
    body, path = json.dumps({"messages": [{"player_id": i, "event": "e"} for i in range(100)]}).encode(), "/publish/batch"
else:
    body, path = b'{"player_id": 21, "event": "e"}', "/publish"
close = "Connection: close\r\n" if kind == "close" else ""
if kind == "connect":  # a player's upgrade, its 101, then the client hangs up
    request = (f"GET /ws?token={token} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 101"), answer[:200]
        sock.close()
    sys.exit(0)
request = (f"POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{close}\r\n").encode() + body
sock = None
for _ in range(count):
    if sock is None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(request)
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    if close:
        while sock.recv(65536):
            pass
        sock.close()
        sock = None
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("publish", "batch", "close", "connect"))
    parser.add_argument("count", type=int)
    parser.add_argument("--project", default=str(Path(__file__).resolve().parent.parent))
    args = parser.parse_args()
    sys.path.insert(0, args.project)
    from tests.support.gateways import TokenTable, gateway_config
    from wsgateway.server import Gateway, freeze_startup_heap

    directory = tempfile.mkdtemp(prefix="ws-gateway-instructions-")
    url = f"sqlite:///{directory}/tokens.db"
    gateway = Gateway(gateway_config(url, "-rate-limit", "0", "-max-conns", "0", "-log-level", "warning"))
    gateway.start()
    token = TokenTable(url).player(21) if args.kind == "connect" else TokenTable(url).server()

    def send(count: int) -> None:
        client = subprocess.Popen([sys.executable, "-c", CLIENT, str(gateway.address[1]), token, args.kind,
                                   str(count)])
        while client.poll() is None:
            gevent.sleep(0.005)
        if client.returncode:
            raise SystemExit(f"the client failed ({client.returncode})")

    send(50)
    freeze_startup_heap()
    subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], capture_output=True, check=False)
    send(args.count)
    subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], capture_output=True, check=False)
    gateway.shutdown(1)
    print(f"{args.count} {args.kind} requests measured; instructions per request: valgrind's Collected / {args.count}")
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
