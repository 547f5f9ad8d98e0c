"""`-workers N`: N gateway processes accepting on one listening socket, supervised.

The supervisor binds `-addr` itself, then starts each worker as a fresh `bin/ws-gateway`
process with the same settings (and `-workers 1`) that inherits the socket; the kernel
spreads new connections among them. Workers are separate processes, so they share
players only through the Redis broker, which is why `-workers` needs `-broker`.

A worker that dies is replaced (after a growing pause if it keeps dying at once). A
worker that fails at its very first start (bad settings, database down) stops the
supervisor with the same status instead of looping. SIGTERM/SIGINT go to every worker,
which drains as a single gateway does; the supervisor exits 0 when all are done. SIGHUP
is passed on to every worker (each reopens its log file, as the supervisor does).

No way of ending the supervisor leaves its workers serving unsupervised: each worker
holds the read end of a pipe whose only write end is the supervisor's, so when the
supervisor exits, however (SIGKILL included), the kernel closes that end, the worker
reads EOF and drains as on SIGTERM. A pipe rather than PR_SET_PDEATHSIG: it is plain
POSIX, fires on the death of the process rather than of the thread that forked, and
needs no polling.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import gevent
import gevent.os
from prometheus_client.multiprocess import mark_process_dead

from wsgateway.config import Config
from wsgateway.listening import LISTEN_FD_ENV, bind_listener

log = logging.getLogger(__name__)

SUPERVISOR_FD_ENV = "WSGATEWAY_SUPERVISOR_FD"  # a pipe's read end; EOF = the supervisor is gone
QUICK_DEATH_S = 2.0  # a worker that dies sooner than this after starting counts as crash-looping
RESPAWN_MAX_DELAY_S = 10.0
STOP_GRACE_S = 2.0  # beyond -shutdown-timeout, before stragglers are killed
# A worker is `python -m wsgateway` (which patches with gevent first, as bin/ws-gateway
# does), run by this interpreter: the same from a checkout and from `pip install`. -P keeps
# the working directory out of its import path; PYTHONPATH leads it to this package.
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def inherited_listener() -> socket.socket | None:
    """In a worker, the supervisor's listening socket; None in a standalone gateway."""
    fd = os.environ.get(LISTEN_FD_ENV)
    return socket.socket(fileno=int(fd)) if fd else None


def watch_supervisor(on_gone: Callable[[], object]) -> gevent.Greenlet | None:
    """In a worker: call `on_gone` (in a greenlet of its own) once the supervisor has
    exited, however it ended. None in a standalone gateway."""
    fd = os.environ.get(SUPERVISOR_FD_ENV)
    if not fd:
        return None
    descriptor = int(fd)
    os.set_blocking(descriptor, False)

    def watch() -> None:
        while gevent.os.nb_read(descriptor, 64):  # nothing is ever written: this waits for EOF
            pass
        os.close(descriptor)
        log.warning("supervisor gone, draining", extra={"event": "supervisor_gone", "ppid": os.getppid()})
        on_gone()
    return gevent.spawn(watch)


class Supervisor:
    """Runs `config.workers` gateway processes on one socket until told to stop."""

    def __init__(self, config: Config, argv: Sequence[str]) -> None:
        self.config = config
        self._argv = list(argv)
        self._workers: dict[int, subprocess.Popen] = {}
        self._stopping = False
        self._exit_status = 0
        self._metrics_dir = ""
        self._lifeline_fd = -1  # the read end of the pipe whose write end only this process holds

    def run(self) -> int:
        listener = bind_listener(self.config.listen_host, self.config.listen_port)
        self._metrics_dir = tempfile.mkdtemp(prefix="ws-gateway-metrics-")
        self._lifeline_fd, lifeline_write_fd = os.pipe()  # neither inheritable: pass_fds hands on the read end
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, self.stop)
        gevent.signal_handler(signal.SIGHUP, self.hang_up)
        log.info("supervisor listening", extra={
            "event": "supervisor_started", "workers": self.config.workers,
            "address": f"{self.config.listen_host}:{listener.getsockname()[1]}"})
        try:
            gevent.joinall([gevent.spawn(self._keep_running, slot, listener.fileno())
                            for slot in range(self.config.workers)])
        finally:
            listener.close()
            os.close(self._lifeline_fd)
            os.close(lifeline_write_fd)
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        log.info("supervisor stopped", extra={"event": "supervisor_stopped"})
        return self._exit_status

    def stop(self, status: int = 0) -> None:
        """Drain every worker, then let `run` return `status`."""
        if self._stopping:
            return
        self._stopping = True
        self._exit_status = status
        for worker in self._workers.values():
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        gevent.spawn_later(self.config.shutdown_timeout_s + STOP_GRACE_S, self._kill_stragglers)

    def hang_up(self) -> None:
        """Pass SIGHUP on to every worker (which reopens its log file, as `cli` has this
        process do)."""
        for worker in self._workers.values():
            if worker.poll() is None:
                worker.send_signal(signal.SIGHUP)

    def _keep_running(self, slot: int, listen_fd: int) -> None:
        quick_deaths = 0
        first_start = True
        while not self._stopping:
            started = time.monotonic()
            worker = self._spawn(listen_fd)
            self._workers[slot] = worker
            status = worker.wait()
            mark_process_dead(worker.pid, self._metrics_dir)
            if self._stopping:
                return
            lived_s = time.monotonic() - started
            if first_start and lived_s < QUICK_DEATH_S and status in (1, 2):
                log.error("worker failed at start, stopping", extra={
                    "event": "worker_failed_at_start", "pid": worker.pid, "status": status})
                self.stop(status)
                return
            first_start = False
            quick_deaths = quick_deaths + 1 if lived_s < QUICK_DEATH_S else 0
            delay_s = min(RESPAWN_MAX_DELAY_S, 0.1 * 2 ** quick_deaths) if quick_deaths else 0.0
            log.error("worker died, replacing it", extra={
                "event": "worker_died", "pid": worker.pid, "status": status, "slot": slot, "delay_s": delay_s})
            gevent.sleep(delay_s)

    def _spawn(self, listen_fd: int) -> subprocess.Popen:
        environment = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self._metrics_dir,
                           **{LISTEN_FD_ENV: str(listen_fd), SUPERVISOR_FD_ENV: str(self._lifeline_fd)})
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, (PACKAGE_ROOT, os.environ.get("PYTHONPATH"))))
        command = [sys.executable, "-P", "-m", "wsgateway", *self._argv, "-workers", "1", "-pid-file", ""]
        worker = subprocess.Popen(command, env=environment, pass_fds=(listen_fd, self._lifeline_fd))
        log.info("worker started", extra={"event": "worker_started", "pid": worker.pid})
        return worker

    def _kill_stragglers(self) -> None:
        for worker in self._workers.values():
            if worker.poll() is None:
                log.warning("worker did not stop in time, killing it", extra={"event": "worker_killed",
                                                                              "pid": worker.pid})
                worker.kill()
