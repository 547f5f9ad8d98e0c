"""Real network separation for partition tests: Linux network namespaces made by the test.

`NetworkLab` builds, for one test, a small network of its own and nothing else: a router
namespace, and one namespace per host joined to it by a veth pair (each pair created
inside the namespaces, so the host's own interfaces, addresses and routes are never
touched). Every address lives inside those namespaces only (10.77.N.0/24, one subnet per
host), and every name carries this run's pid and a random tag, so a leftover of a crashed
run never collides with the next one. `close()` kills what was started in them and
deletes the namespaces, which takes their veths and routes with them. Should the test
process itself be killed, what it started in them dies with it (`PR_SET_PDEATHSIG`), and
the next lab deletes the namespaces of runs whose process is gone.

A host is cut off in the router, so that its own kernel sees nothing happen:

* `drop`: the router silently discards everything from and to the host (`ip rule ...
  blackhole` on a router that forwards: no ICMP, no reset; packets just vanish, as behind
  a switch that lost the route or a firewall dropping them);
* `link`: the router's end of the host's veth is set down (the host's end loses carrier;
  what the host sends is discarded by its own veth, again without an error to the socket).

Clients run in the test process: `Host.socket()` makes a socket inside the host's
namespace (the calling thread enters it with setns(2) only for the `socket()` call, which
never yields to another greenlet, and returns), and the socket stays there after that.
"""
from __future__ import annotations

import ctypes
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import websocket

from tests.support import TIMEOUT_S, wait_for
from tests.support.processes import GATEWAY_BIN, PROCESS_START_TIMEOUT_S, gateway_environment

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PREFIX = "wsgw-"  # every lab namespace is named wsgw-<pid of the test process>-<tag>-<host>
_libc = ctypes.CDLL(None, use_errno=True)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to make network namespaces"
    probe = f"{PREFIX}{os.getpid()}-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _die_with_the_test() -> None:
    """In a child, before it runs its program: SIGKILL when the test process ends."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def remove_stale_namespaces() -> None:
    """Delete the lab namespaces of test processes that no longer run (killed mid-test)."""
    for namespace in namespaces_of(PREFIX):
        pid = namespace[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def run(*argv: str) -> None:
    """One `ip` command; fails the test with its stderr when it fails."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


@contextmanager
def _entered(namespace: str) -> Iterator[None]:
    """The calling thread inside `namespace` for the block, and back in its own after it."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {namespace} failed")
            try:
                yield
            finally:
                if _libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back into the test's namespace failed")
        finally:
            os.close(target)
    finally:
        os.close(own)


class Host:
    """One namespace on the lab's network, with its address there."""

    def __init__(self, lab: NetworkLab, name: str, subnet: int) -> None:
        self.lab = lab
        self.name = name  # the short name the test uses: "a", "redis"
        self.namespace = f"{lab.tag}-{name}"
        self.subnet = subnet
        self.address = f"10.77.{subnet}.2"
        self.router_address = f"10.77.{subnet}.1"
        self.router_link = f"to-{name}"[:15]  # the router's end of this host's veth
        self.processes: list[subprocess.Popen] = []

    def socket(self) -> socket.socket:
        """A TCP socket inside this host's namespace (connect it to anything it can reach)."""
        with _entered(self.namespace):
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    def connect(self, address: str, port: int, timeout_s: float = TIMEOUT_S) -> socket.socket:
        sock = self.socket()
        sock.settimeout(timeout_s)
        try:
            sock.connect((address, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def request(self, address: str, port: int, method: str, path: str, body: Any = None,
                token: str | None = None, timeout_s: float = TIMEOUT_S) -> tuple[int, Any]:
        """One HTTP request from this host; the status and the decoded JSON body."""
        connection = http.client.HTTPConnection(address, port, timeout=timeout_s)
        connection.sock = self.connect(address, port, timeout_s)
        try:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            connection.request(method, path, None if body is None else json.dumps(body), headers)
            response = connection.getresponse()
            data = response.read()
            return response.status, json.loads(data) if data else None
        finally:
            connection.close()

    def websocket(self, address: str, port: int, path: str, timeout_s: float = TIMEOUT_S) -> websocket.WebSocket:
        sock = self.connect(address, port, timeout_s)
        try:
            return websocket.create_connection(f"ws://{address}:{port}{path}", timeout=timeout_s, socket=sock)
        except BaseException:
            sock.close()
            raise

    def start(self, argv: Sequence[str], **options: Any) -> subprocess.Popen:
        """A process inside this namespace (`ip netns exec` execs it: the pid is the program's)."""
        process = subprocess.Popen(["ip", "netns", "exec", self.namespace, *argv], preexec_fn=_die_with_the_test,
                                   **options)
        self.processes.append(process)
        return process


class NetworkLab:
    """A router namespace and hosts attached to it, made for one test and removed by `close()`."""

    def __init__(self) -> None:
        remove_stale_namespaces()
        self.tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.router = f"{self.tag}-router"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        try:
            self._make_namespace(self.router)
            run("ip", "netns", "exec", self.router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        except BaseException:
            self.close()
            raise

    def _make_namespace(self, namespace: str) -> None:
        run("ip", "netns", "add", namespace)
        self._namespaces.append(namespace)
        run("ip", "-n", namespace, "link", "set", "lo", "up")

    def add_host(self, name: str) -> Host:
        """A namespace with one veth to the router (its address 10.77.N.2, the router's .1)."""
        host = Host(self, name, len(self.hosts) + 1)
        self._make_namespace(host.namespace)
        run("ip", "-n", self.router, "link", "add", host.router_link, "type", "veth",
            "peer", "name", "eth0", "netns", host.namespace)
        run("ip", "-n", self.router, "addr", "add", f"{host.router_address}/24", "dev", host.router_link)
        run("ip", "-n", self.router, "link", "set", host.router_link, "up")
        run("ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        run("ip", "-n", host.namespace, "link", "set", "eth0", "up")
        run("ip", "-n", host.namespace, "route", "add", "default", "via", host.router_address)
        self.hosts[name] = host
        return host

    def cut(self, host: Host, how: str = "drop") -> None:
        """Cut `host` off from every other host without a word: `drop` or `link` (see the module)."""
        if how == "drop":
            for direction in ("from", "to"):
                run("ip", "-n", self.router, "rule", "add", direction, host.address, "blackhole")
        elif how == "link":
            run("ip", "-n", self.router, "link", "set", host.router_link, "down")
        else:
            raise ValueError(f"unknown cut {how!r}")

    def heal(self, host: Host, how: str = "drop") -> None:
        """Undo `cut(host, how)`."""
        if how == "drop":
            for direction in ("from", "to"):
                run("ip", "-n", self.router, "rule", "del", direction, host.address, "blackhole")
        else:
            run("ip", "-n", self.router, "link", "set", host.router_link, "up")

    def close(self) -> None:
        """Kill every process started in the lab, then delete its namespaces (and with them
        their veths, addresses, routes and rules). Safe to call twice, and after a failure."""
        for host in self.hosts.values():
            for process in host.processes:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=TIMEOUT_S)
        problems = []
        for namespace in reversed(self._namespaces):
            done = subprocess.run(["ip", "netns", "del", namespace], capture_output=True, text=True)
            if done.returncode != 0:
                problems.append(f"{namespace}: {done.stderr.strip()}")
        self._namespaces.clear()
        if problems:
            raise RuntimeError(f"namespaces left behind: {problems}")


def namespaces_of(tag: str) -> list[str]:
    """The namespaces whose names start with `tag` (to check that a lab left nothing)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(tag)]


GATEWAY_PORT = 8080  # every gateway listens on this port of its own namespace
REDIS_PORT = 6379


class LabRedis:
    """A private redis-server in `host`'s namespace, listening on its lab address."""

    def __init__(self, host: Host, directory: Path) -> None:
        self.host = host
        self.process = host.start(
            ["redis-server", "--port", str(REDIS_PORT), "--bind", "0.0.0.0", "--protected-mode", "no",
             "--save", "", "--appendonly", "no", "--dir", str(directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def answers() -> bool:
            try:
                with host.connect(host.address, REDIS_PORT) as probe:
                    probe.sendall(b"PING\r\n")
                    return probe.recv(16).startswith(b"+PONG")
            except OSError:
                return False
        wait_for(answers, what=f"redis-server in {host.namespace}")

    @property
    def url(self) -> str:
        return f"redis://{self.host.address}:{REDIS_PORT}/0"


class LabGateway:
    """bin/ws-gateway in `host`'s namespace on `GATEWAY_PORT`, with its log in `directory`."""

    def __init__(self, host: Host, directory: Path, *flags: str) -> None:
        self.host = host
        self.log_file = directory / "ws-gateway.log"
        self.stderr_file = directory / "stderr.txt"
        with open(self.stderr_file, "w") as stderr:
            self.process = host.start(
                [sys.executable, GATEWAY_BIN, "-addr", f"0.0.0.0:{GATEWAY_PORT}", "-log-file", str(self.log_file),
                 "-log-level", "debug", *flags],
                cwd=directory, env=gateway_environment(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr)

    def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                timeout_s: float = TIMEOUT_S, client: Host | None = None) -> tuple[int, Any]:
        """From a client on the gateway's own host (or on `client`)."""
        return (client or self.host).request(self.host.address, GATEWAY_PORT, method, path, body, token, timeout_s)

    def websocket(self, token: str, timeout_s: float = TIMEOUT_S) -> websocket.WebSocket:
        return self.host.websocket(self.host.address, GATEWAY_PORT, f"/ws?token={token}", timeout_s)

    def ready(self) -> bool:
        try:
            return self.request("GET", "/readyz")[0] == 200
        except OSError:
            return False

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"ws-gateway exited with {self.process.returncode}: "
                                     f"{self.stderr_file.read_text()}")
            return self.ready()
        wait_for(ready, PROCESS_START_TIMEOUT_S, what=f"ws-gateway in {self.host.namespace} ready")


def unacknowledged_bytes(host: Host, address: str, port: int) -> int:
    """Bytes `host`'s kernel still holds unacknowledged (or unsent) for connections to
    address:port, closed ones included: what could still reach that server later."""
    listed = subprocess.run(["ip", "netns", "exec", host.namespace, "ss", "-tnH", "dst", f"{address}:{port}"],
                            capture_output=True, text=True, timeout=TIMEOUT_S, check=True).stdout
    return sum(int(line.split()[2]) for line in listed.splitlines() if line.strip())
