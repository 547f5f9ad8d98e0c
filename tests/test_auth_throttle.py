"""wsgateway.auth_throttle: failed authentications per client address, pure, clock-injected."""
from __future__ import annotations

import pytest

from tests.support.fakes import FakeClock
from wsgateway import auth_throttle
from wsgateway.auth_throttle import FailedAuthThrottle

EPSILON_S = 1e-9


def throttle(limit: int = 6, trusted_ttl_s: float = 60.0, **options) -> tuple[FailedAuthThrottle, FakeClock]:
    clock = FakeClock()
    return FailedAuthThrottle(limit, trusted_ttl_s=trusted_ttl_s, clock=clock, **options), clock


def fail(limits: FailedAuthThrottle, address: str, times: int) -> None:
    for _ in range(times):
        assert limits.retry_after_s(address, "guess") == 0.0
        limits.failed(address)


def test_limit_failures_pass_then_refused_with_wait():
    """`limit` failures are let through; then the address waits for one failure to refill (60 s / limit)."""
    limits, _ = throttle(limit=6)
    fail(limits, "10.0.0.1", 6)
    assert limits.retry_after_s("10.0.0.1", "guess") == pytest.approx(10.0)


def test_waiting_the_returned_time_is_enough():
    """After the returned wait the address may try one more token."""
    limits, clock = throttle(limit=6)
    fail(limits, "10.0.0.1", 6)
    clock.now += limits.retry_after_s("10.0.0.1", "guess") + EPSILON_S
    fail(limits, "10.0.0.1", 1)
    assert limits.retry_after_s("10.0.0.1", "guess") > 0


def test_refills_continuously_to_the_limit():
    """A minute refills the whole budget, and never more than `limit`."""
    limits, clock = throttle(limit=6)
    fail(limits, "10.0.0.1", 6)
    clock.now += 3600
    fail(limits, "10.0.0.1", 6)
    assert limits.retry_after_s("10.0.0.1", "guess") > 0


def test_other_addresses_are_not_affected():
    """One address over its budget refuses nobody else."""
    limits, _ = throttle(limit=2)
    fail(limits, "10.0.0.1", 2)
    assert limits.retry_after_s("10.0.0.1", "guess") > 0
    assert limits.retry_after_s("10.0.0.2", "guess") == 0.0


def test_a_recently_valid_token_is_never_throttled():
    """A token that authenticated within the trusted period passes from a throttled address."""
    limits, clock = throttle(limit=2, trusted_ttl_s=60)
    limits.succeeded("valid-token")
    fail(limits, "10.0.0.1", 2)
    assert limits.retry_after_s("10.0.0.1", "valid-token") == 0.0
    assert limits.retry_after_s("10.0.0.1", "other") > 0
    clock.now += 30  # still trusted, budget partly refilled
    assert limits.retry_after_s("10.0.0.1", "valid-token") == 0.0


def test_trust_ends_after_its_period():
    """Past the trusted period a token is throttled like any other (its next success trusts it again)."""
    limits, clock = throttle(limit=1, trusted_ttl_s=10)
    limits.succeeded("valid-token")
    clock.now += 11
    fail(limits, "10.0.0.1", 1)
    assert limits.retry_after_s("10.0.0.1", "valid-token") > 0


def test_zero_limit_throttles_nothing_and_remembers_nothing():
    """`-auth-fail-limit 0`: never refused, no address or token kept."""
    limits, _ = throttle(limit=0)
    for _ in range(1000):
        limits.failed("10.0.0.1")
    limits.succeeded("t")
    assert limits.retry_after_s("10.0.0.1", "guess") == 0.0
    assert limits._buckets == {} and len(limits._trusted) == 0  # noqa: SLF001


def test_address_table_is_bounded():
    """A flood of distinct addresses never grows the table past `max_addresses`."""
    limits, clock = throttle(limit=3, max_addresses=100)
    for index in range(5000):
        limits.failed(f"10.{index // 65536}.{index // 256 % 256}.{index % 256}")
        clock.now += 0.001
    assert len(limits._buckets) <= 100  # noqa: SLF001


def test_refilled_addresses_are_forgotten_before_busy_ones():
    """At the cap, addresses whose budget has refilled go first; an address still over its budget stays."""
    limits, clock = throttle(limit=2, max_addresses=10)
    fail(limits, "attacker", 2)
    for index in range(9):
        limits.failed(f"once-{index}")
    clock.now += 30  # the single failures have refilled; the attacker's two have not
    limits.failed("newcomer")
    assert "attacker" in limits._buckets and "newcomer" in limits._buckets  # noqa: SLF001


def test_defaults_are_bounded():
    """The module's bounds are what the README says."""
    assert auth_throttle.MAX_ADDRESSES == 10_000
    assert auth_throttle.REFILL_PERIOD_S == 60.0
