"""`ws-gateway`: parse the configuration, set up logging, build the gateway, run it.

Exit status: 0 after a graceful shutdown; 2 for a configuration error, one line on stderr
naming it: a refused setting, and at start a database that refuses the settings (access
denied, unknown database, an sqlite file that cannot be opened, a `ws_token` table
without our columns); 1 when the database or Redis does not answer at start, or the
listen address cannot be bound. The systemd unit restarts on 1, never on 2
(RestartPreventExitStatus=2): retrying a configuration error cannot help.

A command word (`db`, `token`, `publish`, `broadcast`, `presence`, `disconnect`) anywhere
among the settings runs that operations command instead (`commands`); without one, the
gateway serves.

A gateway binds its address before it imports anything but the settings' parser: started
by `bin/ws-gateway` or `python -m wsgateway`, even before gevent (`listening`); called
directly, as soon as the settings are read, before the web stack and the database layer
(Flask, SQLAlchemy: most of its start-up time, and several seconds on a busy machine).
On a restart the players' reconnects then wait in the accept queue until it serves,
instead of being refused and retried seconds later.

Signals: SIGTERM and SIGINT drain (`server`, `workers`). SIGHUP reopens `-log-file` and
nothing else, from the moment logging is set up: the conventional meaning for a daemon
whose log logrotate moves (`postrotate kill -HUP`), while the gateway has no settings to
reload and a drain already has its signals. So a hang-up (a closed terminal, a stray
`kill -HUP`) no longer ends the process at once, without close frames and leaving its pid
file behind. The `-workers` supervisor passes it on to every worker.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Callable, Sequence

import gevent

from wsgateway import commands
from wsgateway.config import Config, ConfigError, load
from wsgateway.errors import BrokerUnavailable, StoreMisconfigured, StoreUnavailable
from wsgateway.logs import reopen_log_file, setup_logging
from wsgateway.listening import PORT_WAIT_S, bind_listener, take_early_listener
from wsgateway.workers import Supervisor, inherited_listener, watch_supervisor

log = logging.getLogger(__name__)


def _fail(message: str, status: int) -> int:
    print(f"ws-gateway: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    settings, command, command_arguments = commands.split_command(arguments)
    if command is not None:
        return commands.run(command, command_arguments, settings)
    try:
        config = load(arguments, epilog=commands.SUMMARY)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    try:
        setup_logging(config.log_level, config.log_file)
    except OSError as exc:
        return _fail(f"-log-file: cannot open {config.log_file!r}: {exc.strerror}", 2)

    if config.workers > 1:
        return _supervise(config, arguments)
    gevent.signal_handler(signal.SIGHUP, on_hangup)

    listener = inherited_listener()
    if listener is None:
        try:
            listener = take_early_listener() or bind_listener(config.listen_host, config.listen_port,
                                                              inheritable=False, wait_for_port_s=PORT_WAIT_S)
        except OSError as exc:
            return _fail(_cannot_listen(config, exc), 1)
    # Only now the web stack and the database layer (see the module docstring).
    from wsgateway.server import Gateway, freeze_startup_heap, remove_pid_file, write_pid_file

    try:
        gateway = Gateway(config, listener=listener)
    except ConfigError as exc:  # -tls-cert / -tls-key files unusable
        return _fail(str(exc), 2)
    except BrokerUnavailable as exc:  # a Redis Cluster's client asks for the slot map at once
        return _fail(f"-broker: redis unreachable at start: {exc}", 1)
    try:
        gateway.start()
    except StoreMisconfigured as exc:
        return _fail(f"-dsn: {exc}", 2)
    except StoreUnavailable as exc:
        return _fail(f"database unreachable at start ({config.db}): {exc}", 1)
    except BrokerUnavailable as exc:
        return _fail(f"-broker: redis unreachable at start: {exc}", 1)
    except ConfigError as exc:  # a -broker Redis that may evict the gateway's keys
        return _fail(str(exc), 2)
    except OSError as exc:
        return _fail(_cannot_listen(config, exc), 1)
    if config.pid_file:
        try:
            write_pid_file(config.pid_file)
        except OSError as exc:
            gateway.shutdown(0)
            return _fail(f"-pid-file: cannot write {config.pid_file!r}: {exc.strerror}", 2)
    watch_supervisor(gateway.shutdown)  # a worker drains when its supervisor is gone
    log.info("start-up heap frozen", extra={"event": "heap_frozen", "objects": freeze_startup_heap()})
    try:
        gateway.serve_forever()
    finally:
        if config.pid_file:
            remove_pid_file(config.pid_file)
    return 0


def on_hangup(then: Callable[[], None] | None = None) -> None:
    """SIGHUP: reopen -log-file, say so in the new file (or on standard output), then `then`."""
    path = reopen_log_file()
    log.info("SIGHUP received, log file reopened" if path else "SIGHUP received, logging to standard output",
             extra={"event": "log_reopened", "signal": "SIGHUP", "log_file": path or "", "pid": os.getpid()})
    if then is not None:
        then()


def _supervise(config: Config, argv: list[str]) -> int:
    """-workers N: this process only binds, supervises and relays signals."""
    from wsgateway.server import remove_pid_file, write_pid_file

    supervisor = Supervisor(config, argv)
    gevent.signal_handler(signal.SIGHUP, on_hangup, supervisor.hang_up)
    if config.pid_file:
        try:
            write_pid_file(config.pid_file)
        except OSError as exc:
            return _fail(f"-pid-file: cannot write {config.pid_file!r}: {exc.strerror}", 2)
    try:
        return supervisor.run()
    except OSError as exc:
        return _fail(_cannot_listen(config, exc), 1)
    finally:
        if config.pid_file:
            remove_pid_file(config.pid_file)


def _cannot_listen(config: Config, exc: OSError) -> str:
    """One line for an address that cannot be bound, naming it once, in -addr's form
    (gevent appends the address to the error's text; the bare reason is taken instead)."""
    host = f"[{config.listen_host}]" if ":" in config.listen_host else config.listen_host
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return f"-addr: cannot listen on {host}:{config.listen_port}: {reason}"
