"""Greenlets that stay: the web server runs each accepted connection in a greenlet that,
once the connection has ended, waits for the next one instead of exiting.

Why: a new greenlet per connection cost 16-21 µs of CPU here (the Greenlet object, the
callback that starts it, a first switch that maps a new 16 KiB Python frame stack, the
pool's bookkeeping and the links run when it exits); handing a connection to a parked
greenlet costs 2-4 µs. A `/publish` on a new connection costs about 180 µs in all, and
a reconnect storm pays it 10,000 times at once.

What it promises (the part of gevent's `Pool` the server and the shutdown use):
`spawn(func, *args)` runs `func(*args)` soon, in a pool greenlet, never in the caller's;
`greenlets` holds the greenlets running a job, so `join(timeout)` waits until no job runs;
`kill()` kills those and the parked ones. At most `most_parked`
greenlets wait for work: past that, a greenlet whose job ended exits.

Each job runs in an empty `contextvars` context, as in a new greenlet, so no context
variable set by one connection is seen by the next. A job must leave no timer running,
as any gevent job already must: a parked greenlet woken by anything but a job (a
forgotten `gevent.Timeout` firing) ends instead of running one.
"""
from __future__ import annotations

from contextvars import Context
from typing import Any, Callable

from gevent import get_hub, getcurrent
from gevent.greenlet import Greenlet
from gevent.pool import Pool

MOST_PARKED = 256  # greenlets kept waiting for a connection: about 5 KiB of memory each (measured)


class ResidentPool(Pool):
    """An unbounded `gevent.pool.Pool` whose greenlets run job after job."""

    def __init__(self, most_parked: int = MOST_PARKED) -> None:
        super().__init__()
        self._most_parked = most_parked
        self._parked: list[Greenlet] = []  # each waiting in the hub for its next job
        self._closed = False  # set by kill(): nobody parks any more

    def spawn(self, func: Callable[..., Any], *args: Any) -> Greenlet:
        if self._parked:
            worker = self._parked.pop()
            self._started(worker)
            get_hub().loop.run_callback(self._resume, worker, func, args)
            return worker
        worker = Greenlet(self._work, func, args)
        worker.rawlink(self._ended)
        self._started(worker)
        worker.start()
        return worker

    def kill(self, *args: Any, **kwargs: Any) -> None:
        """gevent's, after ending the parked greenlets; none parks afterwards."""
        self._closed = True
        parked, self._parked = self._parked, []
        for worker in parked:
            worker.kill(block=False)
        super().kill(*args, **kwargs)

    def _resume(self, worker: Greenlet, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if worker.dead:  # it exited meanwhile (see the module's last paragraph): a new one runs the job
            self.spawn(func, *args)
        else:
            worker.switch((func, args))

    def _work(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        me = getcurrent()
        hub = get_hub()
        while True:
            Context().run(func, *args)  # an empty context each time, as a new greenlet's
            func = args = None  # nothing of the last job is kept alive while parked
            self._finished(me)
            if self._closed or len(self._parked) >= self._most_parked:
                return
            self._parked.append(me)
            try:
                job = hub.switch()
            except BaseException:  # killed while parked, or a stray throw: this greenlet ends
                return
            if type(job) is not tuple:
                return
            func, args = job

    def _started(self, worker: Greenlet) -> None:
        self.greenlets.add(worker)
        self._empty_event.clear()

    def _finished(self, worker: Greenlet) -> None:
        self.greenlets.discard(worker)
        self.dying.discard(worker)
        if not self.greenlets:
            self._empty_event.set()

    def _ended(self, worker: Greenlet) -> None:
        """The greenlet exited: its job raised, it was killed, it had no place to park,
        or it was woken by something else than a job."""
        self._finished(worker)
        if worker in self._parked:
            self._parked.remove(worker)
