#!/usr/bin/env python3
"""bin/ws-gateway for the soak: the same `wsgateway.cli.main`, plus a SIGUSR1 handler that
writes the process's resident memory, open file descriptors and live greenlets to the
JSON file named by $WS_SOAK_STATS. Greenlets cannot be counted from outside the process,
and a leak of them (a reader or writer that never ends) is what a soak must catch."""
import os
import sys

PROJECT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
VENV = os.path.join(PROJECT, ".venv")
if os.path.isdir(VENV) and os.path.realpath(sys.prefix) != os.path.realpath(VENV):
    python = os.path.join(VENV, "bin", "python")
    os.execv(python, [python, os.path.realpath(__file__), *sys.argv[1:]])

from gevent import monkey  # noqa: E402

monkey.patch_all()

import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import signal  # noqa: E402
import tracemalloc  # noqa: E402

import gevent  # noqa: E402
import greenlet  # noqa: E402

sys.path.insert(0, PROJECT)

from wsgateway.cli import main  # noqa: E402
from wsgateway.resident_pool import ResidentPool  # noqa: E402

_samples = 0
_PARKED_IN = ResidentPool._work.__code__  # noqa: SLF001
_libc = ctypes.CDLL("libc.so.6")


def resident_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pymalloc_arenas() -> int:
    """Python's small-object arenas (1 MiB each on 3.11) mapped now: memory Python holds from
    the OS whatever part of it live objects use, so fragmentation there shows up as a count
    that grows while allocated blocks stay flat. CPython prints it only to C stderr."""
    with tempfile.TemporaryFile(mode="w+") as capture:
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        match = re.search(r"# arenas allocated current\s*=\s*([\d,]+)", capture.read())
    return int(match.group(1).replace(",", "")) if match else -1


def write_stats() -> None:
    """Collect garbage first, so that only what is still referenced is counted."""
    global _samples
    gc.collect()
    if tracemalloc.is_tracing() and os.environ.get("WS_SOAK_TRACE_DIR"):
        tracemalloc.take_snapshot().dump(os.path.join(os.environ["WS_SOAK_TRACE_DIR"], f"{_samples + 1}.trace"))
    _samples += 1
    live = [item for item in gc.get_objects() if isinstance(item, greenlet.greenlet) and not item.dead]
    # parked: waiting in ResidentPool._work for a job (the pool itself is in the frozen
    # start-up heap, which gc.get_objects() does not list)
    parked = sum(1 for item in live if item.gr_frame is not None and item.gr_frame.f_code is _PARKED_IN)
    rss_kib = resident_kib()
    _libc.malloc_trim(0)  # hand free heap pages back: what stays resident after it is really in use
    stats = {
        "sample": _samples,
        "rss_kib": rss_kib,
        "rss_trimmed_kib": resident_kib(),
        "open_fds": len(os.listdir("/proc/self/fd")),
        # What Python holds, whatever the allocator keeps from the OS: grows round after round
        # if something leaks, where resident memory may also grow from fragmentation.
        "objects": len(gc.get_objects()),
        "allocated_blocks": sys.getallocatedblocks(),
        "pymalloc_arenas": pymalloc_arenas(),
        # with PYTHONTRACEMALLOC=1: every byte Python allocated and still holds, large objects included
        "traced_kib": tracemalloc.get_traced_memory()[0] // 1024 if tracemalloc.is_tracing() else None,
        # minus the greenlet running this handler, and those parked for the next connection
        # (the web server's ResidentPool keeps up to MOST_PARKED; they are bounded, not a leak)
        "greenlets": len(live) - 1 - parked,
        "parked_greenlets": parked,
    }
    path = os.environ["WS_SOAK_STATS"]
    with open(path + ".tmp", "w", encoding="ascii") as handle:
        json.dump(stats, handle)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    gevent.signal_handler(signal.SIGUSR1, write_stats)
    sys.exit(main())
