"""The operator's endpoints on players: who is online, and cutting a player off.

    GET  /presence                   {"players": P, "connections": C}
    GET  /presence?player_id=X       {"player_id": "X", "connections": N}
    POST /disconnect {"player_id": X}  {"disconnected": N}

With `-broker` every answer is the cluster's: presence and the census come from the
shared roster (`Roster.presence`, `Roster.census`, which never walk the players), and a
disconnect reaches every gateway holding the player through the broker, as a message
would (`Delivery.close_player`). Each connection is closed with 4002 "disconnected by
the server". `disconnected` counts the connections the roster knew at that moment;
each gateway starts their closing handshakes when the request reaches it, and presence
drops as each handshake ends (at most `connection.CLOSE_HANDSHAKE_TIMEOUT_S` later).

Admission is the publishing API's, written once in `publishing`: a server token (401,
403), one message from the subject's rate limit (429), 503 while shutting down or when
the token store or the broker does not answer; refusals come from the catalogue
(`errors.Refusal`). These are Flask views (not the hot publishing path): `ws_http_requests_total{endpoint="presence"|"disconnect"}` counts
them, and every closed connection counts in `ws_disconnects_total{code="4002"}`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

import orjson
from flask import Flask, Response, request

from wsgateway.errors import BrokerUnavailable, ClientError, CloseCode, Refusal, StoreUnavailable
from wsgateway.publishing import (PublishingRequest, PublishingServices, authenticate_server, json_object,
                                  player_id_of, refuse_while_draining, take_rate)
from wsgateway.roster import Roster

log = logging.getLogger(__name__)

PRESENCE_PARAMETERS = frozenset({"player_id"})


class PlayerServices(PublishingServices, Protocol):
    """What these endpoints use of the gateway (server.Gateway provides it): the
    publishing API's admission, and the roster."""

    roster: Roster


def add_player_routes(app: Flask, services: PlayerServices) -> None:
    """Register `GET /presence` and `POST /disconnect` on the app."""

    def presence() -> Response:
        def look_up(subject_id: str) -> dict[str, Any]:
            player_id = _presence_query()
            admit(subject_id)
            if player_id is None:
                census = services.roster.census()
                return {"players": census.players, "connections": census.connections}
            return {"player_id": player_id, "connections": services.roster.presence(player_id)}
        return _answer(services, look_up)

    def disconnect() -> Response:
        def cut_off(subject_id: str) -> dict[str, Any]:
            body = json_object(request.get_data())  # read whole, at most -max-body, by the web server
            player_id = player_id_of(body.get("player_id"), required=True)
            assert player_id is not None
            admit(subject_id)
            closed = services.delivery.close_player(player_id, CloseCode.DISCONNECTED)
            log.info("player disconnected by the server", extra={
                "event": "player_disconnected", "player_id": player_id, "subject_id": subject_id,
                "connections": closed})
            return {"disconnected": closed}
        return _answer(services, cut_off)

    def admit(subject_id: str) -> None:
        take_rate(services, subject_id)
        refuse_while_draining(services)

    app.add_url_rule("/presence", "presence", presence, methods=["GET"])
    app.add_url_rule("/disconnect", "disconnect", disconnect, methods=["POST"])


def _presence_query() -> str | None:
    """The `player_id` of `GET /presence`, None for the census; 400 for anything else."""
    unknown = sorted(set(request.args) - PRESENCE_PARAMETERS)
    if unknown:
        raise Refusal.UNKNOWN_QUERY_PARAMETER(name=repr(unknown[0]))
    values = request.args.getlist("player_id")
    if len(values) > 1:
        raise Refusal.PLAYER_ID_REPEATED()
    if not values:
        return None
    return player_id_of(values[0], required=True)


def _answer(services: PlayerServices, handle: Callable[[str], dict[str, Any]]) -> Response:
    """Authenticate, run `handle(subject_id)`, and answer its JSON or the refusal."""
    try:
        answer = handle(authenticate_server(services, _as_publishing_request()))
    except ClientError as error:
        return _refusal(error)
    except StoreUnavailable as error:
        log.warning("token store unavailable", extra={"event": "store_unavailable", "detail": str(error)})
        return _refusal(Refusal.STORE_UNAVAILABLE())
    except BrokerUnavailable as error:
        log.warning("broker unavailable", extra={"event": "broker_unavailable", "detail": str(error)})
        return _refusal(Refusal.DEPENDENCY_UNAVAILABLE(what="broker"))
    return Response(orjson.dumps(answer), content_type="application/json")


def _as_publishing_request() -> PublishingRequest:
    """The Flask request as the publishing API's admission reads one."""
    return PublishingRequest(request.method, request.path, {name.lower(): value for name, value in request.headers},
                             request.get_data(), request.remote_addr or "")


def _refusal(error: ClientError) -> Response:
    body = error.body()
    return Response(body, status=error.status, headers=error.response_headers(body))
