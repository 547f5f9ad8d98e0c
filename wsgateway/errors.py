"""Every error a client can see, in one place: the exception tree, the close-code
catalogue and the catalogue of HTTP refusals.

Exception tree::

    GatewayError                 base of everything raised on purpose
    ├── ClientError              a request we refuse: HTTP status + JSON {"error": message}
    ├── StoreUnavailable         the token database cannot be reached (HTTP 503)
    │   └── StoreMisconfigured   it answers but refuses these settings: retrying cannot help
    └── BrokerUnavailable        the scale-out broker (Redis) cannot be reached (HTTP 503)
    ProtocolViolation            a client WebSocket frame breaks RFC 6455 or our limits;
                                 carries the close code the connection ends with

HTTP errors are answered as `{"error": "..."}` with the status of the `ClientError`;
`ClientError` builds that answer (its body, its headers, or the whole response), and
nothing else does. Every refusal is a `Refusal` member below (a body's validation
errors too, their messages templates); a refusal about one part of a request is
`Refusal.X(...).within("messages[3]")`. WebSocket close codes sent by the gateway are
the `CloseCode` members. The README's tables are these catalogues
(`tests/test_errors.py` checks it).
"""
from __future__ import annotations

from enum import Enum, IntEnum
from http import HTTPStatus

import orjson

CAPACITY_RETRY_AFTER_S = 5  # Retry-After at -max-total-conns: spreads the reconnect wave


class CloseCode(IntEnum):
    """Close codes the gateway sends, and the pseudo-codes it records in metrics."""

    NORMAL = 1000  # the client closed, or we answered its close
    GOING_AWAY = 1001  # gateway shutting down
    PROTOCOL_ERROR = 1002  # malformed or unmasked frame, reserved bits or opcodes
    NO_STATUS = 1005  # metrics only: the client's close frame carried no code
    ABNORMAL = 1006  # metrics only: the TCP connection ended without a close frame
    INVALID_PAYLOAD = 1007  # text that is not UTF-8
    POLICY_VIOLATION = 1008  # the player's token was revoked or expired
    MESSAGE_TOO_BIG = 1009  # client message over -max-message-size
    INTERNAL_ERROR = 1011  # a bug in the gateway
    TRY_AGAIN_LATER = 1013  # the shared broker was unreachable while the connection was set up
    SLOW_CONSUMER = 4000  # the socket's outbox overflowed: the client reads too slowly
    PONG_TIMEOUT = 4001  # a ping went unanswered (nothing heard from the client) for -pong-wait
    DISCONNECTED = 4002  # an operator cut the player off (POST /disconnect)

    @property
    def reason(self) -> str:
        return _REASONS[self]


_REASONS = {
    CloseCode.NORMAL: "",
    CloseCode.GOING_AWAY: "server shutting down",
    CloseCode.PROTOCOL_ERROR: "protocol error",
    CloseCode.NO_STATUS: "",
    CloseCode.ABNORMAL: "",
    CloseCode.INVALID_PAYLOAD: "invalid UTF-8",
    CloseCode.POLICY_VIOLATION: "token revoked or expired",
    CloseCode.MESSAGE_TOO_BIG: "message too big",
    CloseCode.INTERNAL_ERROR: "internal error",
    CloseCode.TRY_AGAIN_LATER: "broker unavailable, retry later",
    CloseCode.SLOW_CONSUMER: "client too slow: outbox overflowed",
    CloseCode.PONG_TIMEOUT: "ping timeout",
    CloseCode.DISCONNECTED: "disconnected by the server",
}


class GatewayError(Exception):
    """Base of the errors the gateway raises on purpose."""


class ClientError(GatewayError):
    """A request refused with an HTTP status and a JSON `{"error": message}` body, plus
    `details` (e.g. what part of a batch was accepted before it stopped)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.details = details or {}

    def within(self, prefix: str = "", suffix: str = "", details: dict[str, object] | None = None) -> ClientError:
        """The same refusal said of a part of the request (`messages[3]: ...`), or of
        what it left undone (`...: messages[3:] not delivered`), with `details` added."""
        message = f"{prefix}: {self.message}" if prefix else self.message
        return ClientError(self.status, f"{message}: {suffix}" if suffix else message, self.headers,
                           {**self.details, **(details or {})})

    def body(self) -> bytes:
        """The JSON body: `{"error": message, **details}`."""
        return orjson.dumps({"error": self.message, **self.details})

    def response_headers(self, body: bytes | None = None) -> list[tuple[str, str]]:
        """The answer's headers for `body` (by default `self.body()`)."""
        length = len(self.body() if body is None else body)
        return [("Content-Type", "application/json"), ("Content-Length", str(length)), *self.headers.items()]

    def response_bytes(self, *, close: bool = True) -> bytes:
        """The whole HTTP/1.1 response, for refusals sent before any application runs."""
        body = self.body()
        lines = "".join(f"{name}: {value}\r\n" for name, value in self.response_headers(body))
        if close:
            lines += "Connection: close\r\n"
        status = HTTPStatus(self.status)
        return f"HTTP/1.1 {status.value} {status.phrase}\r\n{lines}\r\n".encode("latin-1") + body


class Refusal(Enum):
    """Every refusal a client can get: status, message (a template for `str.format`),
    headers. `Refusal.X(**values)` is the `ClientError` to raise."""

    # Reading the request (web_server): the connection is closed after these.
    MALFORMED_REQUEST = (400, "malformed HTTP request")
    INCOMPLETE_BODY = (400, "incomplete or malformed request body")
    REQUEST_TIMEOUT = (408, "request not received in time")
    BODY_TOO_LARGE = (413, "body larger than {limit} bytes")
    URI_TOO_LONG = (414, "request line too long")
    TOO_MANY_HEADERS = (431, "more than {limit} request headers")
    HEADERS_TOO_LARGE = (431, "request headers larger than {limit} bytes")
    AT_CAPACITY = (503, "gateway at its limit of {limit} connections, retry later",
                   {"Retry-After": str(CAPACITY_RETRY_AFTER_S)})
    # Routing (app)
    NOT_FOUND = (404, "not found")
    METHOD_NOT_ALLOWED = (405, "method not allowed", {"Allow": "{allow}"})
    INTERNAL_ERROR = (500, "internal error")
    # Publishing
    MISSING_BEARER = (401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
    INVALID_SERVER_TOKEN = (403, "invalid, expired or non-server token")
    IDEMPOTENCY_IN_PROGRESS = (409, "a request with this Idempotency-Key is still in progress", {"Retry-After": "1"})
    IDEMPOTENCY_MISMATCH = (422, "Idempotency-Key was already used for a different request")
    RATE_LIMITED = (429, "rate limit exceeded", {"Retry-After": "{retry_after_s}"})
    AUTH_THROTTLED = (429, "too many refused tokens from this address, retry later",
                      {"Retry-After": "{retry_after_s}"})  # publishing and /ws: -auth-fail-limit
    STORE_UNAVAILABLE = (503, "token store unavailable, retry later", {"Retry-After": "1"})
    BROKER_UNAVAILABLE = (503, "broker unavailable: message not accepted, retry later", {"Retry-After": "1"})
    BATCH_BROKER_UNAVAILABLE = (503, "broker unavailable: messages[{index}:] not accepted, retry them later",
                                {"Retry-After": "1"})
    SHUTTING_DOWN = (503, "server shutting down", {"Retry-After": "1"})
    # A publishing body's validation (publishing): the message says what is wrong
    BODY_NOT_JSON = (400, "body is not valid JSON: {detail}")
    BODY_NOT_OBJECT = (400, "body must be a JSON object")
    NESTED_TOO_DEEPLY = (400, "payload is nested too deeply")
    PLAYER_ID_REQUIRED = (400, "player_id is required")
    PLAYER_ID_INVALID = (400, "player_id must be a non-empty string of at most {limit} characters "
                              "or a non-negative integer")
    PLAYER_ID_NOT_UNICODE = (400, "player_id must be valid Unicode: lone surrogate")
    EVENT_INVALID = (400, "event must be a non-empty string")
    EVENT_NOT_UNICODE = (400, "event and payload must be valid Unicode: lone surrogate")
    IDEMPOTENCY_KEY_INVALID = (400, "{name} must be 1-{limit} printable ASCII characters")
    BATCH_NOT_ARRAY = (400, "messages must be a non-empty array")
    BATCH_TOO_LONG = (400, "messages: {count} messages, at most {limit} per batch")
    BATCH_OVER_RATE_LIMIT = (400, "a batch of {count} messages can never pass the rate limit of {limit} "
                                  "messages per {period}: send smaller batches")
    BATCH_ITEM_NOT_OBJECT = (400, "must be a JSON object")
    BATCH_KEY_NOT_STRING = (400, "idempotency_key must be a string")
    BATCH_KEY_REPEATED = (400, "idempotency_key repeats that of messages[{first}]")
    # GET /presence's query (players)
    UNKNOWN_QUERY_PARAMETER = (400, "unknown query parameter {name}: only player_id is accepted")
    PLAYER_ID_REPEATED = (400, "player_id given more than once")
    # WebSocket admission (admission, web_server)
    WEBSOCKET_NEEDS_HTTP11 = (400, "WebSocket upgrade requires HTTP/1.1")
    WEBSOCKET_KEY_MISSING = (400, "missing Sec-WebSocket-Key")
    WEBSOCKET_KEY_INVALID = (400, "Sec-WebSocket-Key is not 16 bytes in base64")
    MISSING_PLAYER_TOKEN = (401, "missing token")
    INVALID_PLAYER_TOKEN = (401, "invalid or expired token")
    ORIGIN_NOT_ALLOWED = (403, "origin not allowed")
    UPGRADE_REQUIRED = (426, "WebSocket upgrade required", {"Upgrade": "websocket"})
    WEBSOCKET_VERSION = (426, "missing or unsupported Sec-WebSocket-Version", {"Sec-WebSocket-Version": "13"})
    TOO_MANY_PLAYER_CONNECTIONS = (429, "player already has {limit} connections")
    DEPENDENCY_UNAVAILABLE = (503, "{what} unavailable, retry later", {"Retry-After": "1"})

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.message = message
        self.headers = headers or {}

    def __call__(self, **values: object) -> ClientError:
        """This refusal as the `ClientError` to raise, its templates filled from `values`."""
        return ClientError(self.status, self.message.format(**values),
                           {name: value.format(**values) for name, value in self.headers.items()})


class StoreUnavailable(GatewayError):
    """The token database did not answer; callers answer 503 and keep running."""


class StoreMisconfigured(StoreUnavailable):
    """The database answered, and refuses what the settings ask of it: access denied, an
    unknown database, an sqlite file that cannot be opened, a `ws_token` table without the
    expected columns. At start that is a configuration error (exit 2, not restarted);
    while serving it is answered 503 like any database failure."""


class BrokerUnavailable(GatewayError):
    """The shared broker did not answer; what needs it is refused (503), the rest goes on."""


class ProtocolViolation(Exception):
    """A client frame we refuse; the connection is closed with `code`.

    `events` holds what the same read completed before the bad frame: those messages are
    the client's and are handled before the connection is failed (Autobahn 3.2, 5.15)."""

    def __init__(self, code: CloseCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.events: list = []
