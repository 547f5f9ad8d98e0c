"""bench/bench.py in a tiny configuration, so that the benchmark cannot rot: every scenario
runs against a real bin/ws-gateway and prints its figure (the figures are not judged)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.processes import PROCESS_START_TIMEOUT_S, gateway_environment

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench.py"


def test_bench_runs_every_scenario_and_prints_the_figures(tmp_path):
    """The bench starts a gateway, runs all scenarios on one gateway (and scale-out) with a few connections, and prints each figure and the core count."""
    result = subprocess.run(
        [sys.executable, str(BENCH), "--scenarios", "memory,fanout,publish,batch,latency,hold,scaleout",
         "--connections", "20", "--broadcasts", "3", "--rounds", "1",
         "--publishers", "2", "--http-clients", "1", "--batch-size", "5", "--duration-s", "0.5",
         "--latency-rate", "200", "--hold", "30", "--connections-per-client", "25"],
        cwd=tmp_path, env=gateway_environment(), capture_output=True, text=True,
        timeout=4 * PROCESS_START_TIMEOUT_S)
    assert result.returncode == 0, result.stderr + result.stdout
    output = result.stdout
    assert "cores" in output.splitlines()[0]
    for figure in ("KiB per idle connection", "fan-out deliveries/s", "server CPU µs/delivery",
                   "/publish requests/s", "batch messages/s", "latency p99 ms", "connections held"):
        assert f"| {figure}" in output, output


def test_broker_bench_prints_what_an_envelope_costs(tmp_path):
    """bench/broker.py carries a few envelopes over the real Redis and prints their rate and CPU cost."""
    from tests.support.redis_server import REDIS_URL

    result = subprocess.run(
        [sys.executable, str(BENCH.parent / "broker.py"), "--envelopes", "200", "--publishers", "2",
         "--redis", REDIS_URL],
        cwd=tmp_path, env=gateway_environment(), capture_output=True, text=True, timeout=PROCESS_START_TIMEOUT_S)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "200 envelopes, 2 publishers:" in result.stdout and "Redis CPU" in result.stdout


def test_bench_runs_the_connection_life_cycle_scenarios(tmp_path):
    """The connect, reconnect storm, stop and no-keep-alive publish scenarios run against real bin/ws-gateway processes (a restart on the same port among them) and print their figures."""
    result = subprocess.run(
        [sys.executable, str(BENCH), "--scenarios", "connect,storm,stop,publish_close", "--storm-players", "40",
         "--connections-per-client", "20", "--publishers", "2", "--http-clients", "1", "--duration-s", "0.5"],
        cwd=tmp_path, env=gateway_environment(), capture_output=True, text=True,
        timeout=4 * PROCESS_START_TIMEOUT_S)
    assert result.returncode == 0, result.stderr + result.stdout
    output = result.stdout
    for figure in ("connect: all open, s", "connect: server CPU µs/conn", "storm: all back, s",
                   "storm: failed attempts", "stop: process exited, s", "/publish, no keep-alive, req/s"):
        assert f"| {figure}" in output, output
    assert "close codes 1001: 40" in output, output


def test_capacity_bench_holds_players_on_workers_and_broadcasts_to_all(tmp_path):
    """bench/capacity.py connects players to `-workers 2` on a private redis-server from several client processes and loopback addresses, broadcasts to all of them, and prints memory, connect rate, broadcast time and errors."""
    result = subprocess.run(
        [sys.executable, str(BENCH.parent / "capacity.py"), "--players", "60", "--workers", "2",
         "--connections-per-client", "20", "--broadcasts", "1", "--idle-s", "0.2"],
        cwd=tmp_path, env=gateway_environment(), capture_output=True, text=True,
        timeout=8 * PROCESS_START_TIMEOUT_S)  # several gateway processes start
    assert result.returncode == 0, result.stderr + result.stdout
    output = result.stdout
    for figure in ("60 players open in", "connections/s", "KiB per connection", "descriptors per worker",
                   "bytes per connection", "Redis CPU", "last of 60 players received it", "errors: "):
        assert figure in output, output
    assert "frames missing" not in output, output


def test_redis_ops_bench_prints_the_redis_work_of_each_operation(tmp_path):
    """bench/redis_ops.py measures, on a private redis-server, the commands and Redis CPU of a connect, a publish, a batch message, a broadcast, a close and a heartbeat, then publishing under load, and prints one row for each."""
    result = subprocess.run(
        [sys.executable, str(BENCH.parent / "redis_ops.py"), "--operations", "20", "--broadcasts", "2",
         "--batch-size", "5", "--idle-s", "0.5", "--publishers", "2", "--load-s", "0.5"],
        cwd=tmp_path, env=gateway_environment(), capture_output=True, text=True,
        timeout=8 * PROCESS_START_TIMEOUT_S)  # several gateway processes start
    assert result.returncode == 0, result.stderr + result.stdout
    output = result.stdout
    for row in ("| connect |", "| publish, player on the same gateway |", "| publish, player on another gateway |",
                "| publish, player offline (queued) |", "| batch message (5 per request) |",
                "| broadcast (20 players, 2 gateways) |", "| close |", "| heartbeat (20 connections",
                "| /publish under load |", "| batch message under load |"):
        assert row in output, output


def test_bench_measures_event_streams_too(tmp_path):
    """With --transport sse the players hold event streams: the memory and fan-out figures are theirs."""
    result = subprocess.run(
        [sys.executable, str(BENCH), "--scenarios", "memory,fanout,latency", "--transport", "sse",
         "--connections", "20", "--broadcasts", "3", "--rounds", "1", "--duration-s", "0.5",
         "--latency-rate", "200", "--hold", "0", "--connections-per-client", "25"],
        cwd=tmp_path, env=gateway_environment(), capture_output=True, text=True,
        timeout=4 * PROCESS_START_TIMEOUT_S)
    assert result.returncode == 0, result.stderr + result.stdout
    for figure in ("KiB per idle connection", "fan-out deliveries/s", "latency p99 ms"):
        assert f"| {figure}" in result.stdout, result.stdout


def test_transport_fanout_prints_the_cost_of_a_delivery_by_transport(tmp_path):
    """bench/transport_fanout.py broadcasts to a few connections of each kind and prints the CPU per delivery."""
    result = subprocess.run(
        [sys.executable, str(BENCH.parent / "transport_fanout.py")], cwd=tmp_path,
        env={**gateway_environment(), "N": "20", "B": "3"}, capture_output=True, text=True,
        timeout=PROCESS_START_TIMEOUT_S)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "websocket:" in result.stdout and "sse:" in result.stdout and "µs CPU per delivery" in result.stdout
