"""The listening socket: the accept queue Go asks for, a retry while a previous process
lets go of the address, and, for a gateway that starts, the bind before anything else.

On a restart the players come back 1 s after their close frame (echoCTF.RED's client),
and every reconnect that finds the port closed is refused and waits 2 s more. Up to its
`bind` a starting process spent about 0.15 s of CPU importing gevent, patching, and the
commands' and metrics' modules: on a busy machine, past the players' first pause. So
`bin/ws-gateway` and `python -m wsgateway` call `bind_before_imports` first, with
nothing imported but the standard library and `wsgateway.config`: the reconnects then
wait in the accept queue while the rest is imported, and are served in turn.

Binding early narrows the window in which a restart refuses reconnects; socket
activation closes it. Under systemd with `etc/ws-gateway.socket` (sd_listen_fds(3):
`LISTEN_PID` is this process, `LISTEN_FDS` at least 1), the listening socket is systemd's
descriptor 3, open before the old process stops and after the new one starts: reconnects
wait in its accept queue through the whole restart, and none is refused, however busy
the machine. `-addr` is then the socket unit's `ListenStream=`, not the flag.

This module imports neither gevent nor anything that imports it: the socket is bound
with the standard library before gevent patches it, and `cli` takes it over as a
gevent socket (`take_early_listener`) once it has.
"""
from __future__ import annotations

import errno
import os
import socket
import time
from typing import Sequence

from wsgateway.config import ConfigError, load, setting_option

BIND_RETRY_INTERVAL_S = 0.02  # between two tries of an address still in use
PORT_WAIT_S = 2.0  # how long a starting gateway waits for its address to be let go of
LISTEN_FD_ENV = "WSGATEWAY_LISTEN_FD"  # set by the -workers supervisor for its workers only
SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): the first descriptor systemd passes
SOCKET_ACTIVATION_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

# What `bind_before_imports` bound (a descriptor) or the error binding gave, until
# `take_early_listener` takes it: one process, one listener.
_early: int | OSError | None = None


def listen_backlog() -> int:
    """The accept queue to ask the kernel for: all it allows (net.core.somaxconn, 4096 by
    default), as Go's net package asks. A restart sends every player back within a few
    milliseconds; with gevent's default of 128, the handshakes past the queue were dropped
    and the players' kernels sent them again 1, 3, 7 and 15 s later (a 10,000-player
    reconnect storm took 18 s)."""
    try:
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as handle:
            return max(socket.SOMAXCONN, int(handle.read()))
    except (OSError, ValueError):
        return socket.SOMAXCONN


def bind_listener(host: str, port: int, *, inheritable: bool = True,
                  wait_for_port_s: float = 0.0) -> socket.socket:
    """A listening socket on `host:port` (inheritable: for `-workers`' workers).

    `wait_for_port_s`: while the address is in use, try again for this long. A restart
    starts the new process at once, and the old one may not have closed its listener yet."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    give_up_at = time.monotonic() + wait_for_port_s
    while True:
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
            break
        except OSError as exc:
            listener.close()
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= give_up_at:
                raise
            time.sleep(BIND_RETRY_INTERVAL_S)
    listener.listen(listen_backlog())
    listener.set_inheritable(inheritable)
    return listener


def bind_before_imports(argv: Sequence[str]) -> None:
    """Bind the address of the gateway `argv` starts, if it starts one: every word a
    setting (no command, no --help or --version), settings that load, one process (a
    `-workers` supervisor binds for its workers, and a worker inherits that socket).
    Anything else is left to `cli`, which reports it as it always does. Call it before
    gevent is imported; `take_early_listener` hands the result over."""
    global _early
    if _early is not None or os.environ.get(LISTEN_FD_ENV) or not _only_settings(argv):
        return
    activated = activated_listener()
    if activated is not None:
        _early = activated
        return
    try:
        config = load(argv)
    except ConfigError:
        return
    if config.workers > 1:
        return
    try:
        _early = bind_listener(config.listen_host, config.listen_port, inheritable=False,
                               wait_for_port_s=PORT_WAIT_S).detach()
    except OSError as exc:
        _early = exc


def activated_listener() -> int | None:
    """The listening descriptor systemd passed this process (socket activation), made
    non-inheritable and its variables removed so that no child takes it for its own; None
    without one."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    for name in SOCKET_ACTIVATION_ENV:
        os.environ.pop(name, None)
    if count < 1:
        return None
    os.set_inheritable(SD_LISTEN_FDS_START, False)
    return SD_LISTEN_FDS_START


def take_early_listener() -> socket.socket | None:
    """What `bind_before_imports` bound, as a socket of the (by now patched) socket
    module; None if it bound nothing. Raises the OSError the bind failed with."""
    global _early
    early, _early = _early, None
    if isinstance(early, OSError):
        raise early
    return None if early is None else socket.socket(fileno=early)


def _only_settings(argv: Sequence[str]) -> bool:
    """Whether every word is a setting or a setting's value."""
    value_follows = False
    for word in argv:
        if value_follows:
            value_follows = False
            continue
        is_setting, value_follows = setting_option(word)
        if not is_setting:
            return False
    return True
