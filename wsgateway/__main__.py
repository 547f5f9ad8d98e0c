"""`python -m wsgateway` and the installed `ws-gateway` command (pyproject's entry point).

gevent must patch the standard library before anything else imports it, so importing
this module binds the gateway's address (`wsgateway.listening`: before gevent, so that a
restarted gateway listens within the players' first 1 s pause), patches, then loads the
command line (`cli.main`). bin/ws-gateway, for a checkout, does the same after finding
the project and its .venv.
"""
from __future__ import annotations

import signal

# SIGHUP's meaning (reopen -log-file) is installed once logging is set up; until then a
# hang-up must not end the process, which it would by default (a -workers worker that is
# still importing when the supervisor passes one on, for instance).
signal.signal(signal.SIGHUP, signal.SIG_IGN)

import sys  # noqa: E402

from wsgateway.listening import bind_before_imports  # noqa: E402  (the standard library and the settings only)

bind_before_imports(sys.argv[1:])  # run as `-m` or imported by the console script: either way it starts

import gevent  # noqa: E402
from gevent import monkey  # noqa: E402

gevent.config.track_greenlet_tree = False  # no spawning stacks: cheaper spawns, fewer objects per socket
monkey.patch_all()

from wsgateway.cli import main as cli_main  # noqa: E402


def main() -> int:
    """The console script's entry: `ws-gateway ARGS...`, exit status returned."""
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
