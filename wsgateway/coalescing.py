"""Lookups asked for at the same time, answered by one query.

When thousands of players connect within a second (a reconnect storm after a restart),
a query per token queues behind the database's connection pool, and the connects at
the end of the queue time out (503). A `Coalescer` gathers the keys asked for while its
queries are in flight and looks them all up in the next one: the first key after a
quiet spell is looked up at once, and a storm of N keys costs about N / max_batch
queries, or one per query time, whichever is more, instead of N.

Each caller waits for its own key; every caller of a batch sees that batch's outcome,
the exception included. A key asked for twice while it waits is looked up once. The
wait is bounded (`wait_s`), so a lane that never comes back cannot hold a caller. The
lanes are greenlets: `fetch` must yield while it waits for its answer (gevent's I/O,
or a thread pool), and bound its own duration.
"""
from __future__ import annotations

import itertools
from typing import Callable, Generic, Hashable, TypeVar

import gevent
from gevent.event import AsyncResult

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """`get(key)` through batched `fetch(keys) -> {key: value}`; a key missing from the
    answer gets None. At most `max_in_flight` fetches run at once, each of at most
    `max_batch` keys."""

    def __init__(self, fetch: Callable[[list[K]], dict[K, V]], *, max_batch: int, max_in_flight: int,
                 wait_s: float, timed_out: Callable[[], Exception]) -> None:
        self._fetch = fetch
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._wait_s = wait_s
        self._timed_out = timed_out
        self._pending: dict[K, AsyncResult] = {}  # asked for, not yet in a fetch; oldest first
        self._in_flight = 0  # lanes running

    def get(self, key: K) -> V | None:
        """The value for `key`, or None; raises what the fetch raised, or `timed_out()`
        when no answer came within `wait_s`."""
        waiter = self._pending.get(key)
        if waiter is None:
            waiter = self._pending[key] = AsyncResult()
            if self._in_flight < self._max_in_flight:
                self._in_flight += 1
                gevent.spawn(self._lane)
        try:
            return waiter.get(timeout=self._wait_s)
        except gevent.Timeout:
            raise self._timed_out() from None

    def _lane(self) -> None:
        """Fetch batches of pending keys until none is left."""
        try:
            while self._pending:
                batch = {key: self._pending[key] for key in itertools.islice(self._pending, self._max_batch)}
                for key in batch:
                    del self._pending[key]
                try:
                    found = self._fetch(list(batch))
                except Exception as error:  # every caller of the batch raises it in its own greenlet
                    for waiter in batch.values():
                        waiter.set_exception(error)
                    continue
                for key, waiter in batch.items():
                    waiter.set(found.get(key))
        finally:
            self._in_flight -= 1
