"""Yielding inside long jobs so that requests arriving meanwhile are served.

`gevent.sleep(0)` only switches to greenlets that are already runnable: the event loop
polls sockets again only after about 50 such yields or 5 ms, so a flush of thousands of
sockets that yields with it keeps the next publish unread until it is done (measured:
every broadcast of the fan-out benchmark then got a flush pass of its own). A timer of
zero seconds makes the loop go round once: it polls every socket without waiting, and,
the timer's priority being below theirs, runs the greenlets whose data arrived before it
resumes the job.
"""
from __future__ import annotations

import gevent


def let_io_in() -> None:
    """Pause the calling greenlet for one turn of the event loop, sockets polled."""
    hub = gevent.get_hub()
    with hub.loop.timer(0, priority=-1) as turn:
        hub.wait(turn)
