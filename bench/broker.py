#!/usr/bin/env python3
"""What one envelope costs over the Redis broker: publishers on one gateway's broker, one
reader on another's, the real Redis in between (no sockets to players, no HTTP).

    .venv/bin/python bench/broker.py                       # 20,000 envelopes, 16 publishers
    .venv/bin/python bench/broker.py --envelopes 5000 --publishers 1 --redis redis://127.0.0.1:6379/0
    .venv/bin/python bench/broker.py --redis redis+cluster://127.0.0.1:7000,127.0.0.1:7001   # a Redis Cluster

Prints envelopes/s from the first publish to the last delivery, this process's CPU per
envelope (both brokers: publishing and reading) and Redis's CPU per envelope (from INFO
cpu, summed over a cluster's masters; other clients of the same Redis count too). Its keys live under a fresh prefix and
are deleted at the end.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import redis  # noqa: E402
import redis.cluster  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wsgateway.broker import Envelope  # noqa: E402
from wsgateway.broker_redis import RedisBroker  # noqa: E402
from wsgateway.redis_link import RedisKeys, create_client, is_cluster_url  # noqa: E402

FRAME = b"\x81\x7e\x00\x96" + b"x" * 150  # a text frame of about the bench's event size


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envelopes", type=int, default=20_000)
    parser.add_argument("--publishers", type=int, default=16, help="greenlets publishing at once")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()

    prefix = f"wsgw-bench-broker-{uuid.uuid4().hex[:8]}"
    keys = RedisKeys(prefix, cluster=is_cluster_url(args.redis))
    received = 0
    all_in = gevent.event.Event()

    def deliver(_envelope: Envelope) -> None:
        nonlocal received
        received += 1
        if received == args.envelopes:
            all_in.set()

    reader = RedisBroker(create_client(args.redis, 5.0), keys, "reader")
    reader.start(deliver)
    if not reader.wait_subscribed(5.0):
        raise SystemExit(f"no answer from {args.redis}")
    publisher = RedisBroker(create_client(args.redis, 5.0), keys, "publisher")
    stats = create_client(args.redis, 5.0)

    def redis_cpu_s() -> float:
        if is_cluster_url(args.redis):
            nodes = stats.info("cpu", target_nodes=redis.cluster.RedisCluster.PRIMARIES).values()
        else:
            nodes = [stats.info("cpu")]
        return sum(float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]) for cpu in nodes)

    def publish_share(first: int) -> None:
        for number in range(first, args.envelopes, args.publishers):
            publisher.publish(Envelope(FRAME, f"player-{number % 100}", frozenset(("reader",))))

    redis_before, own_before, started = redis_cpu_s(), own_cpu_s(), time.monotonic()
    gevent.joinall([gevent.spawn(publish_share, first) for first in range(args.publishers)])
    if not all_in.wait(60):
        raise SystemExit(f"only {received} of {args.envelopes} envelopes arrived")
    elapsed_s = time.monotonic() - started
    own_s, redis_s = own_cpu_s() - own_before, redis_cpu_s() - redis_before
    print(f"{args.envelopes:,} envelopes, {args.publishers} publishers: {args.envelopes / elapsed_s:,.0f}/s; "
          f"gateway CPU {own_s / args.envelopes * 1e6:.1f} µs/envelope, Redis CPU "
          f"{redis_s / args.envelopes * 1e6:.1f} µs/envelope   [load {' '.join(f'{value:.2f}' for value in os.getloadavg())}]")
    reader.close()
    publisher.close()
    for leftover in stats.scan_iter(f"*{prefix}*"):  # one by one: a cluster's keys are in many slots
        stats.delete(leftover)


if __name__ == "__main__":
    main()
