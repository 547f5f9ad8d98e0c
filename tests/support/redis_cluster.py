"""A Redis Cluster of the test run's own: three masters with one replica each, on free
local ports, keeping nothing on disk; every node is stopped by its pid.

Starting one takes a few seconds (the nodes must meet and agree), so the suite starts it
once per session (`redis_cluster` in conftest.py); tests keep apart by key prefix, and a
test that kills a master (failover) starts a cluster of its own."""
from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path

from redis.crc import key_slot

from tests.support import TIMEOUT_S, wait_for

MASTERS = 3
NODE_TIMEOUT_MS = 1000  # cluster-node-timeout: how soon a silent master is failed over
FORMING_TIMEOUT_S = 6 * TIMEOUT_S  # nodes meeting, slots assigned, replicas synced, on a loaded host


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ask(port: int, *command: str) -> str:
    """One command to one node, its reply as text ('' when the node does not answer)."""
    try:
        return subprocess.run(["redis-cli", "-p", str(port), *command], capture_output=True, text=True,
                              timeout=TIMEOUT_S).stdout
    except subprocess.TimeoutExpired:
        return ""


class RedisCluster:
    """Six redis-server processes (`--cluster-enabled yes`) joined by `redis-cli --cluster create`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports: list[int] = []
        self.processes: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """The -broker URL, naming two nodes as seeds (any reachable one is enough)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:2])

    def start(self) -> None:
        self.ports = self._distinct_free_ports(2 * MASTERS)
        for port in self.ports:
            self._start_node(port)
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=FORMING_TIMEOUT_S)
        if created.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-2000:]} {created.stderr[-2000:]}")
        self.wait_healthy()

    def _distinct_free_ports(self, count: int) -> list[int]:
        """Free ports, their cluster bus ports (port + 10000) free too, all below the
        ephemeral range: a client that reconnects again and again to a dead node's port in
        that range may be given that very port as its own and connect to itself (Linux's
        TCP self-connect), and then read its own commands back as answers."""
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        ports: list[int] = []
        while len(ports) < count:
            port = random.randrange(1024, first_ephemeral - 10_000)
            if port in ports or not all(_free(candidate) for candidate in (port, port + 10_000)):
                continue
            ports.append(port)
        return ports

    def _start_node(self, port: int) -> None:
        node_directory = self.directory / str(port)
        node_directory.mkdir(parents=True, exist_ok=True)
        self.processes[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(node_directory / "nodes.conf"),
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--save", "", "--appendonly", "no",
             # a replica takes over however long ago it last heard its master (a loaded host)
             "--cluster-replica-validity-factor", "0",
             "--dir", str(node_directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _ask(port, "PING").strip() == "PONG", what=f"cluster node on port {port}")

    def wait_healthy(self, timeout_s: float = FORMING_TIMEOUT_S) -> None:
        """Every running node says `cluster_state:ok`, and every replica is linked to its
        master (so it holds the master's data and can take over)."""
        def healthy() -> bool:
            running = [port for port, process in self.processes.items() if process.poll() is None]
            return bool(running) and all(
                "cluster_state:ok" in _ask(port, "CLUSTER", "INFO")
                and ("role:slave" not in (replication := _ask(port, "INFO", "replication"))
                     or "master_link_status:up" in replication)
                for port in running)
        wait_for(healthy, timeout_s, what="cluster_state:ok on every node, every replica linked")

    def masters(self) -> list[int]:
        """Ports of the running nodes that are masters now."""
        return [port for port, process in self.processes.items()
                if process.poll() is None and "role:master" in _ask(port, "INFO", "replication")]

    def master_of(self, key: str) -> int:
        """The port of the master serving `key`'s slot now (as a running node sees it)."""
        slot = key_slot(key.encode())
        for port in self.masters():
            for line in _ask(port, "CLUSTER", "NODES").splitlines():
                fields = line.split()
                if "master" not in fields[2] or "fail" in fields[2]:
                    continue
                for ranges in fields[8:]:
                    first, _, last = ranges.partition("-")
                    if not first.startswith("[") and int(first) <= slot <= int(last or first):
                        return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise AssertionError(f"no master serves slot {slot}")

    def kill(self, port: int) -> None:
        """SIGKILL one node, as a crashed host would vanish."""
        process = self.processes.pop(port)
        process.kill()
        process.wait(timeout=TIMEOUT_S)

    def wait_failed_over(self, killed_port: int, timeout_s: float = FORMING_TIMEOUT_S) -> float:
        """Wait until every running node sees a replica serving the killed master's slots
        (and says `cluster_state:ok`); returns the seconds it took."""
        started = time.monotonic()

        def serves_slots(port: int, seen_by: int) -> bool:
            for line in _ask(seen_by, "CLUSTER", "NODES").splitlines():
                fields = line.split()
                if fields[1].split("@")[0].endswith(f":{port}"):
                    return "master" in fields[2] and len(fields) > 8
            return False

        def taken_over() -> bool:
            running = [port for port, process in self.processes.items() if process.poll() is None]
            return all("cluster_state:ok" in _ask(port, "CLUSTER", "INFO") and not serves_slots(killed_port, port)
                       for port in running)
        wait_for(taken_over, timeout_s, what=f"a replica taking over the slots of port {killed_port}")
        return time.monotonic() - started

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=TIMEOUT_S)
        self.processes.clear()
