"""JSON-line logging with stable keys, and a last line of defence against leaking tokens.

Each line is one JSON object: `time`, `level`, `logger`, `event` (a stable snake_case
name), `message`, plus the context given in `extra=` (`player_id`, `subject_id`,
`remote`, `code`, ...). The gateway never passes a token to a log call; the formatter
still masks anything shaped like `token=...` (percent-encoded letters included, since
the query parser decodes them) or `Bearer ...`, so a library that logs a request line or
a header cannot leak one either.

SIGHUP reopens `-log-file` (`reopen_log_file`), so that logrotate can move the file away
and have the gateway write to a new one at the same path without losing a line.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone
from typing import Any

import gevent

_STANDARD_ATTRIBUTES = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# "token=" in any spelling a query parser decodes to it: each letter (and the "=") may be
# percent-encoded, as in "?%74oken=SECRET".
_TOKEN_KEY = "".join(f"(?:{letter}|%{ord(letter):02x}|%{ord(letter.upper()):02x})" for letter in "token") + "(?:=|%3d)"
_SECRETS = re.compile(rf"(?i)({_TOKEN_KEY}|bearer\s+)[^\s&\"'\\]+")


def redact(text: str) -> str:
    """`text` with token values replaced by `[REDACTED]`."""
    return _SECRETS.sub(r"\1[REDACTED]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and key != "event":
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(line, default=str, ensure_ascii=False))


def setup_logging(level: str, log_file: str = "") -> None:
    """Send every logger's records, as JSON lines, to `log_file` or standard output."""
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # gevent-websocket logs every request ("Initializing WebSocket") and every finaliser at
    # debug; our handler logs what matters.
    logging.getLogger("geventwebsocket").setLevel(logging.WARNING)
    route_gevent_errors()


def route_gevent_errors() -> None:
    """gevent's hub prints an error that ends a greenlet, or one raised in an event-loop
    callback, as a multi-line traceback on standard error; make it one JSON line of our
    log stream instead (the traceback in its `exception` field)."""
    gevent.get_hub().print_exception = _log_greenlet_error  # type: ignore[method-assign]


_hub_log = logging.getLogger("wsgateway.hub")


def _log_greenlet_error(context: Any, kind: Any, value: Any, traceback: Any) -> None:
    exc_info = (kind, value, traceback) if isinstance(value, BaseException) else None
    _hub_log.error("greenlet failed", exc_info=exc_info, extra={
        "event": "internal_error", "context": repr(context)[:200], "error_type": getattr(kind, "__name__", str(kind))})


def reopen_log_file() -> str | None:
    """Write from now on to the file that is at the `-log-file` path now (after logrotate
    moved the old one away); return that path, or None when logging to standard output.
    Lines written before the call are in the old file, lines after in the new one."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            fresh = open(handler.baseFilename, handler.mode, encoding=handler.encoding, errors=handler.errors)
            old = handler.setStream(fresh)
            if old is not None:
                old.close()
            return handler.baseFilename
    return None
