"""The Flask app: `/metrics`, `/healthz`, `/readyz`, `/presence` and `/disconnect`
(`players`), `/console` (with `-console`), the 426 for a plain GET on `/ws`, and the
JSON 404/405/500 for everything else.

The web server (`web_server`) answers `/ws` upgrades and `/events` (`admission`) and the
publishing paths (`publishing`) before a request reaches Flask, and the app is built (and
Flask imported) only when the first request for it arrives (`server.Gateway`). Every refusal comes from the
catalogue in `wsgateway.errors`.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Protocol

from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException

from wsgateway.admission import WEBSOCKET_PATH
from wsgateway.config import Config
from wsgateway.console import console_blueprint
from wsgateway.delivery import Delivery
from wsgateway.errors import ClientError, Refusal
from wsgateway.hub import Hub
from wsgateway.idempotency import IdempotencyStore
from wsgateway.metrics import GatewayMetrics
from wsgateway.players import add_player_routes
from wsgateway.ratelimit import Limiter
from wsgateway.roster import Roster
from wsgateway.tokens import TokenStore

log = logging.getLogger(__name__)


class Services(Protocol):
    """What the web face uses of the gateway (server.Gateway provides it)."""

    config: Config
    store: TokenStore
    hub: Hub
    roster: Roster
    delivery: Delivery
    limiter: Limiter
    idempotency: IdempotencyStore
    metrics: GatewayMetrics
    draining: bool

    def is_ready(self) -> dict[str, str]:
        """Component name -> "ok" or what is wrong; ready when all are "ok"."""

    def warnings(self) -> dict[str, str]:
        """What /readyz reports besides, without failing: a promise at risk (name -> why)."""


# --- HTTP --------------------------------------------------------------------------------
def create_app(services: Services) -> Flask:
    """The Flask application for every HTTP endpoint."""
    # no /static/ route: nothing is served from a folder; bodies arrive read whole, at most
    # -max-body bytes (web_server)
    app = Flask(__name__, static_folder=None)
    metrics = services.metrics

    if services.config.console:
        app.register_blueprint(console_blueprint())
    add_player_routes(app, services)

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), content_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        checks = services.is_ready()
        ready = all(state == "ok" for state in checks.values())
        body = {"status": "ready" if ready else "not ready", **checks}
        warnings = services.warnings()
        if warnings:
            body["warnings"] = warnings
        return _json(body, 200 if ready else 503)

    @app.get(WEBSOCKET_PATH)
    def websocket_without_upgrade() -> Response:
        return _refusal(Refusal.UPGRADE_REQUIRED())

    @app.after_request
    def count_request(response: Response) -> Response:
        endpoint = request.url_rule.endpoint if request.url_rule is not None else "unmatched"
        metrics.http_requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        if error.code == 405:
            allow = ", ".join(error.valid_methods or [])  # type: ignore[attr-defined]
            return _refusal(Refusal.METHOD_NOT_ALLOWED(allow=allow))
        if error.code == 404:
            return _refusal(Refusal.NOT_FOUND())
        return _refusal(ClientError(error.code or 500, error.description or "error"))

    @app.errorhandler(Exception)
    def internal_error(error: Exception) -> Response:
        log.error("unhandled error", exc_info=error, extra={"event": "internal_error", "path": request.path})
        return _refusal(Refusal.INTERNAL_ERROR())

    return app


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def _refusal(error: ClientError) -> Response:
    """A catalogue refusal as a Flask response (its body and headers built by the error)."""
    body = error.body()
    return Response(body, status=error.status, headers=error.response_headers(body))
