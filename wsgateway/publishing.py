"""The publishing API: `POST /publish`, `POST /publish/batch` and `POST /broadcast`.

One entry: `Publishing.answer(request)` answers every request to these paths, whatever
its method, version or framing. The web server (`web_server.WebHandler`) reads the
request whole under its deadline and limits, hands it over as a `PublishingRequest`,
and writes the answer in one send: these are the gateway's hot paths, and a Flask request
context, URL map, hooks and `Response` cost more than everything else a publish does.

What a client sees is the README's table: `{"error": "..."}` with the status of the
`ClientError`, 503 with `Retry-After: 1` when the token store does not answer, 500 for
a bug. Metrics: `ws_http_requests_total{endpoint, status}` (endpoint `publish`,
`publish_batch`, `broadcast`, or `unmatched` for a wrong method) and
`ws_publish_duration_seconds{endpoint}`.

Validation lives here once: a `/publish/batch` item is checked by the same function as
a `/publish` body, and its error names the item (`messages[3]: ...`). So does
idempotency: the `Idempotency-Key` header of a single call and the `idempotency_key` of
a batch item go through the same store (see `wsgateway.idempotency`).
"""
from __future__ import annotations

import json
import logging
import math
import time
from http import HTTPStatus
from typing import Any, Callable, Mapping, NamedTuple, Protocol

import orjson

from wsgateway.auth_throttle import FailedAuthThrottle
from wsgateway.config import Config
from wsgateway.delivery import Delivery, Outcome
from wsgateway.errors import BrokerUnavailable, ClientError, Refusal, StoreUnavailable
from wsgateway.idempotency import MAX_KEY_CHARS, Claim, ClaimState, IdempotencyStore, fingerprint
from wsgateway.metrics import GatewayMetrics
from wsgateway.protocol import event_frame
from wsgateway.ratelimit import Limiter
from wsgateway.scheduling import let_io_in
from wsgateway.tokens import TokenStore

log = logging.getLogger(__name__)

MAX_PLAYER_ID_CHARS = 64  # ws_token ids are an unsigned INT or 32 bytes; longer cannot exist
BATCH_SLICE = 256  # batch messages delivered between two yields to other greenlets

Answer = tuple[dict[str, Any], dict[str, str]]  # a 200's JSON body and extra headers
Response = tuple[int, bytes, list[tuple[str, str]]]  # status, body, headers
STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}


class PublishingRequest(NamedTuple):
    """A request to a publishing path, read whole by the web server."""

    method: str
    path: str  # percent-escapes decoded, no query
    headers: Mapping[str, str]  # lower-case name -> value
    body: bytes  # at most -max-body bytes
    remote: str  # the client's address


class PublishingServices(Protocol):
    """What the publishing API uses of the gateway (server.Gateway provides it)."""

    config: Config
    store: TokenStore
    delivery: Delivery
    limiter: Limiter
    idempotency: IdempotencyStore
    auth_throttle: FailedAuthThrottle
    metrics: GatewayMetrics
    draining: bool


class Publishing:
    """The publishing endpoints: `answer(request)` for every request to a path it `serves`."""

    def __init__(self, services: PublishingServices) -> None:
        self._services = services
        self._max_batch = services.config.max_batch
        self._routes: dict[str, tuple[str, Callable[[PublishingRequest], Answer]]] = {
            "/publish": ("publish", self._publish),
            "/publish/batch": ("publish_batch", self._publish_batch),
            "/broadcast": ("broadcast", self._broadcast),
        }
        metrics = services.metrics
        # prometheus-client's labels() takes a lock and builds a key; the children are reused.
        self._request_counters: dict[tuple[str, int], Any] = {}
        self._durations = {endpoint: metrics.publish_duration.labels(endpoint)
                           for endpoint, _ in self._routes.values()}

    def serves(self, path: str) -> bool:
        return path in self._routes

    def answer(self, request: PublishingRequest) -> Response:
        """The answer (status, body, headers) to a request for a path it `serves`."""
        endpoint, handle = self._routes[request.path]
        if request.method != "POST":
            return self._refused("unmatched", Refusal.METHOD_NOT_ALLOWED(allow="POST"))
        started = time.perf_counter()
        try:
            body, headers = handle(request)
        except ClientError as error:
            answer = self._refused(endpoint, error)
        except StoreUnavailable as error:
            log.warning("token store unavailable", extra={"event": "store_unavailable", "detail": str(error)})
            answer = self._refused(endpoint, Refusal.STORE_UNAVAILABLE())
        except BrokerUnavailable as error:
            log.warning("broker unavailable", extra={"event": "broker_unavailable", "detail": str(error)})
            answer = self._refused(endpoint, Refusal.BROKER_UNAVAILABLE())
        except Exception as error:  # the request's top level: answered 500 and logged, never a traceback
            log.error("unhandled error", exc_info=error, extra={"event": "internal_error", "path": request.path})
            answer = self._refused(endpoint, Refusal.INTERNAL_ERROR())
        else:
            data = orjson.dumps(body)  # our own answers: counts, flags and ASCII messages
            answer = self._counted(endpoint, 200, data, [("Content-Type", "application/json"),
                                                          ("Content-Length", str(len(data))), *headers.items()])
        self._durations[endpoint].observe(time.perf_counter() - started)
        return answer

    def _refused(self, endpoint: str, error: ClientError) -> Response:
        body = error.body()
        return self._counted(endpoint, error.status, body, error.response_headers(body))

    def _counted(self, endpoint: str, status: int, body: bytes, headers: list[tuple[str, str]]) -> Response:
        counter = self._request_counters.get((endpoint, status))
        if counter is None:
            counter = self._request_counters[(endpoint, status)] = \
                self._services.metrics.http_requests.labels(endpoint, str(status))
        counter.inc()
        return status, body, headers

    # --- the endpoints --------------------------------------------------------------------
    def _publish(self, request: PublishingRequest) -> Answer:
        services = self._services
        subject_id = authenticate_server(services, request)
        body = json_object(request.body)
        player_id, frame = publish_message(body)

        def deliver() -> dict[str, Any]:
            take_rate(services, subject_id)
            refuse_while_draining(services)
            return publish_answer(services.delivery.publish(player_id, frame))
        return self._once(request, subject_id, lambda: fingerprint(b"/publish", canonical(body)), deliver)

    def _publish_batch(self, request: PublishingRequest) -> Answer:
        services = self._services
        subject_id = authenticate_server(services, request)
        body = json_object(request.body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Refusal.BATCH_NOT_ARRAY()
        if len(messages) > self._max_batch:
            raise Refusal.BATCH_TOO_LONG(count=len(messages), limit=self._max_batch)
        validated = [_batch_item(index, message) for index, message in enumerate(messages)]
        _refuse_repeated_keys(validated)
        limit = services.limiter.limit
        if limit and len(validated) > limit:
            raise Refusal.BATCH_OVER_RATE_LIMIT(count=len(validated), limit=limit,
                                                period=f"{services.config.rate_period_s:g}s")
        claims = self._claim_batch(subject_id, validated)
        try:
            fresh = sum(1 for claim in claims if claim is None or claim.state is ClaimState.FRESH)
            if fresh:
                take_rate(services, subject_id, fresh)
            return {"results": self._deliver_batch(subject_id, validated, claims)}, {}
        finally:
            self._release_unanswered(subject_id, validated, claims)

    def _claim_batch(self, subject_id: str, items: list[_BatchItem]) -> list[Claim | None]:
        """Each keyed item's claim, in order; on a refusal, what was claimed is released."""
        claims: list[Claim | None] = []
        try:
            for index, item in enumerate(items):
                if item.key is None:
                    claims.append(None)
                    continue
                try:
                    claims.append(self._claim(subject_id, item.key, item.fingerprint))
                except ClientError as error:
                    raise error.within(f"messages[{index}]") from None
        except BaseException:
            self._release_unanswered(subject_id, items, claims)
            raise
        return claims

    def _deliver_batch(self, subject_id: str, items: list[_BatchItem],
                       claims: list[Claim | None]) -> list[dict[str, Any]]:
        """Deliver in order, answering replays from the store. If the broker fails midway,
        the 503 says which messages were accepted before it did (`results`)."""
        publish = self._services.delivery.publish
        store = self._services.idempotency
        results: list[dict[str, Any]] = []
        for index, (item, claim) in enumerate(zip(items, claims)):
            if index and not index % BATCH_SLICE:
                let_io_in()  # let other publishers in; this batch's order is kept
            if not index or not index % BATCH_SLICE:
                try:
                    refuse_while_draining(self._services)
                except ClientError as error:
                    raise error.within(suffix=f"messages[{index}:] not delivered",
                                       details={"results": results}) from None
            if claim is not None and claim.state is ClaimState.REPLAY:
                results.append(self._replay(claim))
                continue
            try:
                result = publish_answer(publish(item.player_id, item.frame, batched=True))
            except BrokerUnavailable:
                raise Refusal.BATCH_BROKER_UNAVAILABLE(index=index).within(details={"results": results}) from None
            if item.key is not None:
                store.complete(subject_id, item.key, result)
            results.append(result)
        return results

    def _release_unanswered(self, subject_id: str, items: list[_BatchItem], claims: list[Claim | None]) -> None:
        """Release fresh claims whose message was not delivered (completed ones stay)."""
        store = self._services.idempotency
        for item, claim in zip(items, claims):
            if claim is not None and claim.state is ClaimState.FRESH and item.key is not None:
                try:
                    store.release(subject_id, item.key)  # a no-op once completed
                except BrokerUnavailable:
                    pass

    def _broadcast(self, request: PublishingRequest) -> Answer:
        services = self._services
        subject_id = authenticate_server(services, request)
        body = json_object(request.body)
        player_id = player_id_of(body.get("player_id"), required=False)
        frame = frame_of(body)

        def deliver() -> dict[str, Any]:
            take_rate(services, subject_id)
            refuse_while_draining(services)
            outcome = services.delivery.broadcast(frame, player_id)
            return with_scope(outcome, {"delivered": outcome.delivered})
        return self._once(request, subject_id, lambda: fingerprint(b"/broadcast", canonical(body)), deliver)

    def _once(self, request: PublishingRequest, subject_id: str, request_fingerprint: Callable[[], str],
              deliver: Callable[[], dict[str, Any]]) -> Answer:
        """Run `deliver` unless the request's Idempotency-Key was answered already (the
        fingerprint is computed only for keyed requests: it costs a JSON dump and a hash)."""
        key = request.headers.get("idempotency-key")
        if key is None:
            return deliver(), {}
        check_idempotency_key(key)
        claim = self._claim(subject_id, key, request_fingerprint())
        if claim.state is ClaimState.REPLAY:
            return self._replay(claim), {"Idempotent-Replayed": "true"}
        return self._remembered(subject_id, key, deliver), {}

    def _claim(self, subject_id: str, key: str, request_fingerprint: str) -> Claim:
        """Claim a key; a mismatch is 422 and an unfinished twin 409 (messages say which)."""
        claim = self._services.idempotency.claim(subject_id, key, request_fingerprint)
        if claim.evicted:
            self._services.metrics.idempotency_keys_evicted.inc(claim.evicted)
        if claim.state is ClaimState.MISMATCH:
            raise Refusal.IDEMPOTENCY_MISMATCH()
        if claim.state is ClaimState.IN_PROGRESS:
            raise Refusal.IDEMPOTENCY_IN_PROGRESS()
        return claim

    def _replay(self, claim: Claim) -> dict[str, Any]:
        self._services.metrics.idempotent_replays.inc()
        return {**(claim.result or {}), "replayed": True}

    def _remembered(self, subject_id: str, key: str, deliver: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """`deliver` for a claimed key: its answer is remembered; a refused call (an
        exception) releases the key so that the retry really runs."""
        store = self._services.idempotency
        try:
            result = deliver()
        except BaseException:
            try:
                store.release(subject_id, key)
            except BrokerUnavailable:
                pass  # the pending key expires with the window
            raise
        store.complete(subject_id, key, result)
        return result


class _BatchItem(NamedTuple):
    player_id: str
    frame: bytes
    key: str | None  # the item's idempotency_key
    fingerprint: str  # "" without a key


def _batch_item(index: int, message: Any) -> _BatchItem:
    """One batch message checked like a /publish body; errors name the item."""
    try:
        if not isinstance(message, dict):
            raise Refusal.BATCH_ITEM_NOT_OBJECT()
        key = message.get("idempotency_key")
        if key is not None:
            if not isinstance(key, str):
                raise Refusal.BATCH_KEY_NOT_STRING()
            check_idempotency_key(key, name="idempotency_key")
        player_id, frame = publish_message(message)
        if key is None:
            return _BatchItem(player_id, frame, None, "")
        unkeyed = {name: value for name, value in message.items() if name != "idempotency_key"}
        return _BatchItem(player_id, frame, key, fingerprint(b"/publish", canonical(unkeyed)))
    except ClientError as error:
        raise error.within(f"messages[{index}]") from None


def _refuse_repeated_keys(items: list[_BatchItem]) -> None:
    first_use: dict[str, int] = {}
    for index, item in enumerate(items):
        if item.key is None:
            continue
        if item.key in first_use:
            raise Refusal.BATCH_KEY_REPEATED(first=first_use[item.key]).within(f"messages[{index}]")
        first_use[item.key] = index


# --- validation: each check written once -------------------------------------------------------
def check_idempotency_key(key: str, name: str = "Idempotency-Key") -> None:
    if not 0 < len(key) <= MAX_KEY_CHARS or not (key.isascii() and key.isprintable()):
        raise Refusal.IDEMPOTENCY_KEY_INVALID(name=name, limit=MAX_KEY_CHARS)


def canonical(body: dict[str, Any]) -> bytes:
    """A body's identity for idempotency: the same JSON however it was spaced or ordered,
    so a /publish and a batch item carrying the same message match.

    The encoder recurses once per nesting level, and it runs deeper in the stack than
    the parser did: a body parsed just under the interpreter's recursion limit can
    exceed it here, which is the client's nesting, answered 400 like the parser's."""
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    except RecursionError:
        raise Refusal.NESTED_TOO_DEEPLY() from None


def publish_answer(outcome: Outcome) -> dict[str, Any]:
    return with_scope(outcome, {"delivered": outcome.delivered, "queued": outcome.queued})


def with_scope(outcome: Outcome, body: dict[str, Any]) -> dict[str, Any]:
    """`scope: local` tells a publisher that the broker was down and only this gateway's
    connections got the message."""
    if outcome.local_only:
        body["scope"] = "local"
    return body

def authenticate_server(services: PublishingServices, request: PublishingRequest) -> str:
    """The subject id of the request's server token, or 401/403."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        services.metrics.auth_failures.labels("server", "missing").inc()
        raise Refusal.MISSING_BEARER()
    refuse_if_throttled(services.auth_throttle, services.metrics, request.remote, token, "server")
    subject_id = services.store.authenticate_server(token)
    if subject_id is None:
        services.auth_throttle.failed(request.remote)
        services.metrics.auth_failures.labels("server", "invalid").inc()
        raise Refusal.INVALID_SERVER_TOKEN()
    services.auth_throttle.succeeded(token)
    return subject_id


def refuse_if_throttled(throttle: FailedAuthThrottle, metrics: GatewayMetrics, address: str, token: str,
                        kind: str) -> None:
    """429 when the client address has passed -auth-fail-limit and `token` has not
    authenticated recently: refused before the token costs a lookup (`auth_throttle`).
    `kind` ("player" or "server") labels the count; admission uses it too."""
    wait_s = throttle.retry_after_s(address, token)
    if wait_s:
        metrics.auth_throttled.labels(kind).inc()
        raise Refusal.AUTH_THROTTLED(retry_after_s=max(1, math.ceil(wait_s)))


def refuse_while_draining(services: PublishingServices) -> None:
    """Once shutdown has begun every socket is closing, so a publish would only reach the
    offline queue, which dies with the process: answer 503 so the publisher knows it was
    not delivered. Nothing yields between this check and an in-process delivery, so a
    publish that passes it reaches live sockets before their 1001 close frame."""
    if services.draining:
        raise Refusal.SHUTTING_DOWN()


def take_rate(services: PublishingServices, subject_id: str, count: int = 1) -> None:
    """Take `count` messages from the subject's budget, all or nothing, or 429."""
    wait_s = services.limiter.acquire(subject_id, count)
    if wait_s:
        services.metrics.rate_limited.inc()
        raise Refusal.RATE_LIMITED(retry_after_s=max(1, math.ceil(wait_s)))


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"number {text[:20]} is out of range")
    return number


# json.loads builds a new decoder whenever it is given options; this one is built once.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        body = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))  # as json.loads does
    except RecursionError:
        raise Refusal.BODY_NOT_JSON(detail="nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, our checks
        raise Refusal.BODY_NOT_JSON(detail=exc) from None
    if not isinstance(body, dict):
        raise Refusal.BODY_NOT_OBJECT()
    return body


def publish_message(body: dict[str, Any]) -> tuple[str, bytes]:
    """A `/publish` body (or one batch item) checked: its player id and encoded frame."""
    player_id = player_id_of(body.get("player_id"), required=True)
    assert player_id is not None
    return player_id, frame_of(body)


def player_id_of(value: Any, *, required: bool) -> str | None:
    """`player_id` as a string: a non-empty string, or a non-negative integer.

    JSON may carry a lone surrogate (`"\\ud800"`), which is no Unicode text: such an id
    has no UTF-8 form, so no player can have it and a Redis key cannot name it."""
    if value is None and not required:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)  # then held to the same length as a string id
    if isinstance(value, str) and 0 < len(value) <= MAX_PLAYER_ID_CHARS:
        if not value.isascii() and not _is_unicode(value):
            raise Refusal.PLAYER_ID_NOT_UNICODE()
        return value
    if value is None:
        raise Refusal.PLAYER_ID_REQUIRED()
    raise Refusal.PLAYER_ID_INVALID(limit=MAX_PLAYER_ID_CHARS)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def frame_of(body: dict[str, Any]) -> bytes:
    """The frame for the body's `event` and `payload`, or 400."""
    event = body.get("event")
    if not isinstance(event, str) or not event:
        raise Refusal.EVENT_INVALID()
    try:
        return event_frame(event, body.get("payload"))
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") parses but has no UTF-8 form
        raise Refusal.EVENT_NOT_UNICODE() from None
    except RecursionError:  # parsed near the depth limit, but encoding needs a few frames more
        raise Refusal.NESTED_TOO_DEEPLY() from None
