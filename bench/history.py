#!/usr/bin/env python3
"""What the history (-history-size) costs on the hot paths, measured without sockets.

The gateway's own work per message (route, history, fan-out to the hub's connections) is
run in process against connections that take a frame and drop it, so the figures do not
depend on the kernel or on client processes, and a noisy machine moves them less than the
socket benchmark (bench.py, which runs the same scenarios end to end with
`--gateway-flag=-history-size=100 --ids`). Modes:

* `off`: -history-size 0 (what every deployment runs today);
* `legacy`: a history is kept, no connection asks for ids (frames unchanged);
* `ids`: a history is kept and every connection asks for ids.

Scenarios: `publish` (one connected player, `/publish`'s path from `Delivery.publish`),
`fanout` (`--connections` connections, broadcasts to all), `batch` (messages to random
players among them, as /publish/batch sends them), `memory` (bytes per kept message and
per connection, tracemalloc). Figures are CPU time per message (best of `--repeat`), or
with `--once SCENARIO:MODE` one run for `valgrind --tool=callgrind` (instructions do not
depend on the load):

    .venv/bin/python bench/history.py
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out .venv/bin/python bench/history.py --once fanout:off:3

Run from another checkout (`--project DIR`) to compare with code that has no history.
"""
from __future__ import annotations

import argparse
import inspect
import random
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable


class SinkConnection:
    """A connection that takes every frame and keeps none (what the hub needs of one)."""

    def __init__(self, player_id: str, wants_ids: bool) -> None:
        self.player_id = player_id
        self.token = ""
        self.is_open = True
        self.wants_ids = wants_ids
        self.frames = 0

    def send(self, frame: bytes) -> bool:
        self.frames += 1
        return True

    send_later = send

    def hold(self) -> None:
        pass

    def release(self, first: list[bytes], replayed: frozenset[str] = frozenset()) -> int:
        return len(first)

    def close(self, code: Any) -> None:
        self.is_open = False


def build(mode: str, connections: int) -> tuple[Any, list[SinkConnection]]:
    """A Delivery on an in-process roster and broker, with `connections` players seated."""
    from prometheus_client import CollectorRegistry

    from wsgateway.broker import InProcessBroker
    from wsgateway.delivery import Delivery
    from wsgateway.hub import Hub
    from wsgateway.metrics import GatewayMetrics
    from wsgateway.offline import MemoryOfflineQueue
    from wsgateway import roster as rosters

    hub = Hub()
    offline = MemoryOfflineQueue(100, 10)
    history = None
    if mode != "off":
        from wsgateway.history import MemoryHistory
        history = MemoryHistory(100, 120, 64 << 20)
    roster = rosters.LocalRoster(hub, offline, 0) if history is None \
        else rosters.HistoryLocalRoster(hub, offline, 0, history)
    options = {"history": history} if "history" in inspect.signature(Delivery).parameters else {}
    delivery = Delivery(hub, roster, InProcessBroker(), GatewayMetrics(CollectorRegistry()), **options)
    sinks = []
    for number in range(connections):
        sink = SinkConnection(str(number), wants_ids=mode == "ids")
        seat = roster.reserve(sink.player_id)
        if history is not None:
            delivery.connect(sink, seat, "" if mode == "ids" else None)
        else:
            delivery.connect(sink, seat)
        sinks.append(sink)
    return delivery, sinks


def scenario(name: str, mode: str, args: argparse.Namespace) -> tuple[Callable[[], None], int]:
    """The work to time, and how many messages (deliveries, for fanout) it handles."""
    from wsgateway.protocol import event_frame

    frames = [event_frame("score", {"points": number, "target": "web01"}) for number in range(1000)]
    if name == "publish":
        delivery, _ = build(mode, 1)

        def publish() -> None:
            for frame in frames:
                delivery.publish("0", frame)
        return publish, len(frames)
    if name == "fanout":
        delivery, sinks = build(mode, args.connections)

        def fanout() -> None:
            for frame in frames[:args.broadcasts]:
                delivery.broadcast(frame)
        return fanout, args.broadcasts * len(sinks)
    if name == "batch":
        delivery, sinks = build(mode, args.connections)
        players = [random.Random(number).randrange(len(sinks)) for number in range(len(frames))]

        def batch() -> None:
            for frame, player in zip(frames, players):
                delivery.publish(str(player), frame, batched=True)
        return batch, len(frames)
    raise SystemExit(f"unknown scenario {name}")


def timed(name: str, mode: str, args: argparse.Namespace) -> float:
    """CPU µs per message (per delivery for fanout), best of --repeat runs."""
    best = float("inf")
    for _ in range(args.repeat):
        work, count = scenario(name, mode, args)
        started = time.process_time()
        work()
        best = min(best, (time.process_time() - started) / count * 1e6)
    return best


def memory(mode: str, args: argparse.Namespace) -> tuple[float, float]:
    """Bytes per kept message (1,000 players x 20 messages) and per seated connection."""
    from wsgateway.protocol import event_frame

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    delivery, sinks = build(mode, args.connections)
    per_connection = (tracemalloc.get_traced_memory()[0] - before) / len(sinks)
    before = tracemalloc.get_traced_memory()[0]
    for number in range(20_000):
        delivery.publish(str(number % 1000), event_frame("score", {"points": number, "target": "web01"}))
    per_message = (tracemalloc.get_traced_memory()[0] - before) / 20_000
    tracemalloc.stop()
    return per_message, per_connection


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--broadcasts", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--modes", default="off,legacy,ids")
    parser.add_argument("--scenarios", default="publish,fanout,batch,memory")
    parser.add_argument("--once", metavar="SCENARIO:MODE[:TIMES]",
                        help="run one scenario (TIMES times, default 1) and nothing else, for callgrind: "
                             "the difference between two TIMES is the work alone, without start-up")
    parser.add_argument("--project", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout whose wsgateway is measured")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.project))
    if args.once:
        name, mode, *times = args.once.split(":")
        work, count = scenario(name, mode, args)
        for _ in range(int(times[0]) if times else 1):
            work()
        print(f"{name}:{mode} ran {count} messages x {times[0] if times else 1}")
        return 0
    modes = args.modes.split(",")
    for name in args.scenarios.split(","):
        if name == "memory":
            for mode in modes:
                per_message, per_connection = memory(mode, args)
                print(f"memory {mode:>6}: {per_message:7.0f} B per published message (kept or not), "
                      f"{per_connection:7.0f} B per connection", flush=True)
            continue
        figures = {mode: timed(name, mode, args) for mode in modes}
        print(f"{name:>7}: " + ", ".join(f"{mode} {value:.2f} µs" for mode, value in figures.items())
              + (" per delivery" if name == "fanout" else " per message"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
