"""wsgateway.ratelimit: continuously refilled token buckets per server subject."""
from __future__ import annotations

import math

import pytest

from tests.support.fakes import FakeClock
from wsgateway import ratelimit
from wsgateway.ratelimit import RateLimiter

EPSILON_S = 1e-9  # float slack when the clock is moved by exactly a returned wait


def limiter(limit: int = 10, period_s: float = 1.0) -> tuple[RateLimiter, FakeClock]:
    clock = FakeClock()
    return RateLimiter(limit, period_s, clock=clock), clock


def test_burst_then_refused_with_wait():
    """`limit` messages pass at once; the next is refused with the time one token takes to refill."""
    limits, _ = limiter(limit=10, period_s=1.0)
    assert [limits.acquire("s") for _ in range(10)] == [0.0] * 10
    assert limits.acquire("s") == pytest.approx(0.1)


def test_waiting_the_returned_time_is_enough():
    """After waiting the returned time the request is granted; a refusal takes no tokens."""
    limits, clock = limiter(limit=10, period_s=1.0)
    for _ in range(10):
        limits.acquire("s")
    clock.now += 0.05  # half a token back
    wait = limits.acquire("s")
    assert wait == pytest.approx(0.05)
    clock.now += wait + EPSILON_S
    assert limits.acquire("s") == 0.0


def test_continuous_refill():
    """Half a period refills half the bucket, not one token per period."""
    limits, clock = limiter(limit=10, period_s=1.0)
    for _ in range(10):
        limits.acquire("s")
    clock.now += 0.5
    assert [limits.acquire("s") for _ in range(5)] == [0.0] * 5
    assert limits.acquire("s") > 0


def test_refill_stops_at_limit():
    """A long idle time refills the bucket only up to `limit`."""
    limits, clock = limiter(limit=3, period_s=1.0)
    limits.acquire("s")
    clock.now += 3600
    assert [limits.acquire("s") for _ in range(3)] == [0.0] * 3
    assert limits.acquire("s") > 0


def test_subjects_are_independent():
    """One subject's spending does not affect another's bucket."""
    limits, _ = limiter(limit=2)
    limits.acquire("a")
    limits.acquire("a")
    assert limits.acquire("a") > 0
    assert limits.acquire("b") == 0.0


def test_zero_limit_is_unlimited():
    """limit 0 grants every request."""
    limits, _ = limiter(limit=0)
    assert all(limits.acquire("s", 1000) == 0.0 for _ in range(1000))


def test_count_above_limit_never_granted():
    """A request for more than `limit` tokens returns inf and takes nothing."""
    limits, _ = limiter(limit=5)
    assert limits.acquire("s", 6) == math.inf
    assert limits.acquire("s", 5) == 0.0


def test_multi_token_wait():
    """A request for several tokens waits for the missing ones only."""
    limits, _ = limiter(limit=10, period_s=2.0)  # 5 tokens per second
    limits.acquire("s", 7)
    assert limits.acquire("s", 5) == pytest.approx(0.4)  # 2 missing at 5/s


def test_idle_bucket_pruning_keeps_behaviour(monkeypatch):
    """Forgetting full (idle) buckets bounds memory without giving a throttled subject a fresh burst."""
    monkeypatch.setattr(ratelimit, "IDLE_BUCKETS_KEPT", 3)
    limits, clock = limiter(limit=2, period_s=1.0)
    limits.acquire("busy")
    limits.acquire("busy")
    for subject in ("idle-1", "idle-2"):
        limits.acquire(subject)
    clock.now += 0.5  # idle subjects are full again, "busy" has 1 of 2 tokens
    limits.acquire("newcomer")  # the table is at its bound: full buckets are forgotten
    assert len(limits._buckets) == 2  # "busy" and "newcomer"
    assert limits.acquire("busy") == 0.0
    assert limits.acquire("busy") == pytest.approx(0.5)
    assert limits.acquire("idle-1") == 0.0 and limits.acquire("idle-1") == 0.0  # a full burst, as before
