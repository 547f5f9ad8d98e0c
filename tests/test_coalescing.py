"""wsgateway.coalescing: concurrent lookups gathered into batched fetches (greenlets, no sockets)."""
from __future__ import annotations

import gevent
import pytest
from gevent.event import Event

from tests.support import TIMEOUT_S
from wsgateway.coalescing import Coalescer


class Unavailable(Exception):
    pass


class SlowFetch:
    """A fetch that waits until released, recording each batch it was given."""

    def __init__(self, *, fail: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.release = Event()
        self.fail = fail

    def __call__(self, keys: list[str]) -> dict[str, str]:
        self.batches.append(keys)
        self.release.wait()
        if self.fail:
            raise Unavailable("down")
        return {key: key.upper() for key in keys if not key.startswith("missing")}


def coalescer(fetch: SlowFetch, *, max_batch: int = 100, max_in_flight: int = 1,
              wait_s: float = TIMEOUT_S) -> Coalescer[str, str]:
    return Coalescer(fetch, max_batch=max_batch, max_in_flight=max_in_flight, wait_s=wait_s,
                     timed_out=lambda: Unavailable("timed out"))


def ask(lookups: Coalescer[str, str], keys: list[str]) -> list[gevent.Greenlet]:
    greenlets = [gevent.spawn(lookups.get, key) for key in keys]
    gevent.sleep(0)  # every greenlet has asked
    return greenlets


def test_keys_asked_while_a_fetch_runs_go_into_the_next_one():
    """The first key is fetched alone at once; the keys asked meanwhile share the next fetch."""
    fetch = SlowFetch()
    lookups = coalescer(fetch)
    first = ask(lookups, ["a"])
    gevent.sleep(0)
    rest = ask(lookups, ["b", "c", "missing-d"])
    fetch.release.set()
    gevent.joinall(first + rest, timeout=TIMEOUT_S, raise_error=True)
    assert [greenlet.value for greenlet in first + rest] == ["A", "B", "C", None]
    assert fetch.batches == [["a"], ["b", "c", "missing-d"]]


def test_batches_are_at_most_max_batch_and_lanes_at_most_max_in_flight():
    """250 keys with batches of 100 and 2 lanes: 3 fetches, never more than 2 at once."""
    fetch = SlowFetch()
    fetch.release.set()
    lookups = coalescer(fetch, max_batch=100, max_in_flight=2)
    greenlets = ask(lookups, [f"k{index}" for index in range(250)])
    gevent.joinall(greenlets, timeout=TIMEOUT_S, raise_error=True)
    assert [len(batch) for batch in fetch.batches] == [100, 100, 50]
    assert [greenlet.value for greenlet in greenlets] == [f"K{index}" for index in range(250)]


def test_a_key_asked_twice_is_fetched_once():
    """Two callers waiting for the same key share one entry of the batch."""
    fetch = SlowFetch()
    fetch.release.set()
    lookups = coalescer(fetch)
    greenlets = ask(lookups, ["a", "a", "b"])
    gevent.joinall(greenlets, timeout=TIMEOUT_S, raise_error=True)
    assert fetch.batches == [["a", "b"]]
    assert [greenlet.value for greenlet in greenlets] == ["A", "A", "B"]


def test_a_failed_fetch_fails_every_caller_of_its_batch_only():
    """The fetch's exception reaches each of its callers; the next batch is fetched afresh."""
    fetch = SlowFetch(fail=True)
    lookups = coalescer(fetch)
    failed = ask(lookups, ["a", "b"])
    fetch.release.set()
    gevent.joinall(failed, timeout=TIMEOUT_S)
    assert all(isinstance(greenlet.exception, Unavailable) for greenlet in failed)
    fetch.fail = False
    assert lookups.get("c") == "C"


def test_a_caller_waits_at_most_wait_s():
    """A fetch that does not come back makes its callers raise `timed_out()` after `wait_s`."""
    fetch = SlowFetch()
    lookups = coalescer(fetch, wait_s=0.05)
    with pytest.raises(Unavailable, match="timed out"):
        lookups.get("a")
    fetch.release.set()
    gevent.sleep(0)
    assert lookups.get("b") == "B"
