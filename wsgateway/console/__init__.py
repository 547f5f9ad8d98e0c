"""The browser console (`-console`): watch one player's events arrive live, and publish
test events with a server token, from any browser, with nothing to install. With the
server token it is also the operator's page: live counts (connections and players from
`GET /presence`, publishes and drops per second from this gateway's `/metrics`), a
presence look-up and a disconnect button (`POST /disconnect`). It resumes after every
reconnect from the id of the last event shown (`last_event_id`, with a gateway that keeps a
history) and says whether the resume recovered everything.

Two static files, `index.html` and `console.js` (plain HTML and JavaScript, no build
step), served at `/console` and `/console/console.js` only when `-console` is set; without
it both paths are 404, so a production gateway exposes nothing new. The page finds the
gateway's endpoints relative to its own URL, so it works behind a proxy under a path
prefix. Tokens typed into it stay in the page's memory: never in its URL or storage;
the server token is sent only in Authorization headers.
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response

DIRECTORY = Path(__file__).resolve().parent

# The page loads only its own script; it talks to this gateway over fetch and WebSocket.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
                           "connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")


def console_blueprint() -> Blueprint:
    """The console's routes; the files are read once, here."""
    blueprint = Blueprint("console", __name__)
    page = (DIRECTORY / "index.html").read_bytes()
    script = (DIRECTORY / "console.js").read_bytes()

    @blueprint.get("/console")
    def console_page() -> Response:
        return _static(page, "text/html; charset=utf-8")

    @blueprint.get("/console/console.js")
    def console_script() -> Response:
        return _static(script, "text/javascript; charset=utf-8")

    return blueprint


def _static(body: bytes, content_type: str) -> Response:
    response = Response(body, content_type=content_type)
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-cache"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
