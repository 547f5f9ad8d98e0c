"""Turns for admissions: at most `places` player connections are being admitted at once
(token looked up, seat reserved, 101 or stream head written); the others wait for their
turn in arrival order.

Why: in a reconnect storm thousands of upgrade requests arrive within a second. Admitted
all at once, each waits for its token lookup (coalesced with the others, see
`coalescing`), and the process's CPU is shared among all of them, so an answer reaches
its caller only after every other connect has had its share. On MariaDB with a busy
machine the callers at the end waited past `-db-timeout` and were answered 503 after
their request had been read, parsed and looked up: work wasted, and the player retried.
Taken a few hundred at a time in order, an admission ends soon after its lookup, the
lookups in flight stay a batch or two, and a connect waiting for its turn costs nothing.

While `crowded_at` connects wait (as many as there are places unless told), the queue
is crowded and says so (`on_crowded(True)`, then `on_crowded(False)` once half of them
have had their turn): the
web server stops accepting meanwhile, so that the rush waits in the kernel's accept queue
(in order, at no cost) instead of being accepted and read by a process that has no CPU to
spare for the admissions already under way. Without it, on a saturated process, reading
the newcomers delayed the lookups in flight past -db-timeout.

A wait is bounded by progress, not by its place in the line: a waiter gives up
(`AdmissionStalled`) only when no admission ahead of it was answered for `stall_s` (an
admission whose database or broker failed does not count: that is the stall). However
long the line, a connect is served while the line moves, and refused within `stall_s`
when it does not.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable

from gevent.event import Event


class AdmissionStalled(Exception):
    """No admission was answered for `stall_s` while this one waited for its turn."""


class AdmissionQueue:
    """`enter()` waits for a place (FIFO); every `enter()` that returned is paired with
    one `leave(answered)`, which hands the place to the oldest waiter. Greenlets only; never
    blocks the caller of `leave`."""

    def __init__(self, places: int, stall_s: float, on_crowded: Callable[[bool], None] | None = None,
                 crowded_at: int | None = None) -> None:
        self._free = places
        self._crowded_at = places if crowded_at is None else crowded_at
        self._stall_s = stall_s
        self._on_crowded = on_crowded
        self._crowded = False  # as last told to on_crowded
        self._waiting: deque[Event] = deque()  # oldest first; set: the place is its
        self._answered_at = time.monotonic()  # when an admission was last answered

    @property
    def waiting(self) -> int:
        """Connects waiting for their turn now."""
        return len(self._waiting)

    def enter(self) -> None:
        """Return once this admission has a place; raise `AdmissionStalled` when none ahead
        was answered for `stall_s`."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        turn = Event()
        self._waiting.append(turn)
        if not self._crowded and len(self._waiting) >= self._crowded_at:
            self._tell_crowded(True)
        started = time.monotonic()
        try:
            while not turn.wait(max(0.0, max(self._answered_at, started) + self._stall_s - time.monotonic())):
                if time.monotonic() - max(self._answered_at, started) >= self._stall_s:
                    raise AdmissionStalled()
        except BaseException:
            if turn.is_set():  # the place came as it gave up: it goes to the next
                self.leave(answered=False)
            else:
                self._waiting.remove(turn)
                self._uncrowd()
            raise

    def leave(self, answered: bool) -> None:
        """Give the place back. `answered`: the admission got its answer (admitted, or
        refused for its token or its seat), so the line moved; False for one whose database
        or broker failed."""
        if answered:
            self._answered_at = time.monotonic()
        if self._waiting:
            self._waiting.popleft().set()  # the place passes on, never free meanwhile
            self._uncrowd()
        else:
            self._free += 1

    def _uncrowd(self) -> None:
        if self._crowded and len(self._waiting) <= self._crowded_at // 2:
            self._tell_crowded(False)

    def _tell_crowded(self, crowded: bool) -> None:
        self._crowded = crowded
        if self._on_crowded is not None:
            self._on_crowded(crowded)
