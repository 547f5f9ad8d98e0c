"""wsgateway.idempotency.MemoryIdempotencyStore: what is remembered, for how long, and twins."""
from __future__ import annotations

import gevent

from tests.support.fakes import FakeClock
from wsgateway.idempotency import ClaimState, MemoryIdempotencyStore, fingerprint


def store(window_s: float = 60.0, max_keys: int = 100) -> tuple[MemoryIdempotencyStore, FakeClock]:
    clock = FakeClock()
    return MemoryIdempotencyStore(window_s, max_keys, clock=clock), clock


def test_first_claim_is_fresh_and_a_completed_key_replays():
    """The first call does the work; a repeat within the window gets its answer."""
    memory, _ = store()
    assert memory.claim("srv", "k", "fp").state is ClaimState.FRESH
    memory.complete("srv", "k", {"delivered": 1})
    replay = memory.claim("srv", "k", "fp")
    assert replay.state is ClaimState.REPLAY and replay.result == {"delivered": 1}


def test_subjects_have_separate_keys():
    """The same key from another server subject is a different request."""
    memory, _ = store()
    memory.claim("srv", "k", "fp")
    memory.complete("srv", "k", {"delivered": 1})
    assert memory.claim("other", "k", "fp").state is ClaimState.FRESH


def test_same_key_for_a_different_request_is_a_mismatch():
    """Reusing a key with another body is refused, not replayed."""
    memory, _ = store()
    memory.claim("srv", "k", "fp-1")
    memory.complete("srv", "k", {"delivered": 1})
    assert memory.claim("srv", "k", "fp-2").state is ClaimState.MISMATCH


def test_keys_expire_with_the_window():
    """After the window the key is forgotten and the request runs again."""
    memory, clock = store(window_s=10.0)
    memory.claim("srv", "k", "fp")
    memory.complete("srv", "k", {"delivered": 1})
    clock.now += 10.0
    assert memory.claim("srv", "k", "fp").state is ClaimState.FRESH


def test_released_key_can_be_claimed_again():
    """A refused call releases its key, so the retry really runs."""
    memory, _ = store()
    memory.claim("srv", "k", "fp")
    memory.release("srv", "k")
    assert memory.claim("srv", "k", "fp").state is ClaimState.FRESH


def test_cap_forgets_the_oldest_key_and_says_so():
    """Past max_keys the oldest key is forgotten and the claim reports the eviction."""
    memory, _ = store(max_keys=2)
    for key in ("a", "b"):
        memory.claim("srv", key, "fp")
        memory.complete("srv", key, {})
    claim = memory.claim("srv", "c", "fp")
    assert claim.state is ClaimState.FRESH and claim.evicted == 1
    assert len(memory) == 2
    assert memory.claim("srv", "a", "fp").state is ClaimState.FRESH


def test_twin_waits_for_the_first_calls_answer():
    """A twin arriving while the first call runs waits and replays its answer."""
    memory = MemoryIdempotencyStore(60.0, 100)
    assert memory.claim("srv", "k", "fp").state is ClaimState.FRESH
    twin = gevent.spawn(memory.claim, "srv", "k", "fp")
    gevent.sleep(0)  # let the twin start waiting
    memory.complete("srv", "k", {"delivered": 2})
    assert twin.get(timeout=1).result == {"delivered": 2}


def test_twin_takes_over_when_the_first_call_is_refused():
    """If the first call releases its key, the waiting twin gets to run the request itself."""
    memory = MemoryIdempotencyStore(60.0, 100)
    memory.claim("srv", "k", "fp")
    twin = gevent.spawn(memory.claim, "srv", "k", "fp")
    gevent.sleep(0)
    memory.release("srv", "k")
    assert twin.get(timeout=1).state is ClaimState.FRESH


def test_fingerprint_separates_parts():
    """Fingerprints differ when the bytes move between parts."""
    assert fingerprint(b"/publish", b"ab") != fingerprint(b"/publishab", b"")
    assert fingerprint(b"/publish", b"ab") == fingerprint(b"/publish", b"ab")
