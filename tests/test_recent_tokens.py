"""wsgateway.recent_tokens: a bounded, expiring memory of token digests."""
from __future__ import annotations

import gc

from tests.support.fakes import FakeClock
from wsgateway.recent_tokens import RecentTokens


def memory(ttl_s: float = 10.0, max_entries: int = 100) -> tuple[RecentTokens, FakeClock]:
    clock = FakeClock()
    return RecentTokens(ttl_s, max_entries, clock=clock), clock


def test_remembers_for_its_ttl_then_forgets():
    """A token added is known until `ttl_s` has passed, then not."""
    tokens, clock = memory(ttl_s=10.0)
    tokens.add("abc")
    assert "abc" in tokens and "abd" not in tokens
    clock.now += 9.999
    assert "abc" in tokens
    clock.now += 0.002
    assert "abc" not in tokens


def test_adding_again_restarts_the_ttl():
    """Adding a remembered token again keeps it for a full `ttl_s` from then."""
    tokens, clock = memory(ttl_s=10.0)
    tokens.add("abc")
    clock.now += 8
    tokens.add("abc")
    clock.now += 8
    assert "abc" in tokens
    assert len(tokens) == 1


def test_never_holds_more_than_max_entries_oldest_forgotten_first():
    """Past `max_entries` the oldest is forgotten: a flood of tokens cannot grow it."""
    tokens, clock = memory(max_entries=3)
    for token in ("a", "b", "c", "d"):
        tokens.add(token)
        clock.now += 1
    assert len(tokens) == 3
    assert "a" not in tokens and all(token in tokens for token in "bcd")
    for index in range(10_000):
        tokens.add(f"flood-{index}")
    assert len(tokens) == 3


def test_expired_entries_are_dropped_when_adding():
    """Expired entries do not stay in memory: the next add drops them."""
    tokens, clock = memory(ttl_s=1.0)
    for index in range(50):
        tokens.add(f"t{index}")
    clock.now += 2
    tokens.add("fresh")
    assert len(tokens) == 1


def test_zero_ttl_remembers_nothing():
    """`ttl_s == 0` (a store that must not cache) remembers nothing."""
    tokens, _ = memory(ttl_s=0.0)
    tokens.add("a")
    assert "a" not in tokens and len(tokens) == 0


def test_holds_no_token_text():
    """What is kept is a digest: no object the memory refers to contains the token."""
    tokens, _ = memory()
    secret = "s3cr3t-token-value-0123456789ab"
    tokens.add(secret)
    held = gc.get_referents(tokens._expiry)  # noqa: SLF001 - inspecting what is stored
    assert all(secret.encode() not in item and item != secret for item in held if isinstance(item, (bytes, str)))
    assert all(len(item) == 16 for item in tokens._expiry)  # noqa: SLF001


def test_lone_surrogates_and_other_objects():
    """A token with a lone surrogate can be remembered; a non-string is never "in" it."""
    tokens, _ = memory()
    tokens.add("a\ud800")
    assert "a\ud800" in tokens
    assert 5 not in tokens
