"""Every error a client can see, in one place: the exception tree and the close-code catalogue.

Exception tree::

    GatewayError                 base of everything raised on purpose
    ├── ClientError              a request we refuse: HTTP status + JSON {"error": message}
    ├── StoreUnavailable         the token database cannot be reached (HTTP 503)
    └── BrokerUnavailable        the scale-out broker (Redis) cannot be reached (HTTP 503)
    ProtocolViolation            a client WebSocket frame breaks RFC 6455 or our limits;
                                 carries the close code the connection ends with

HTTP errors are answered as `{"error": "..."}` with the status of the `ClientError`.
WebSocket close codes sent by the gateway are the `CloseCode` members below; the
README's table is this catalogue.
"""
from __future__ import annotations

from enum import IntEnum


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
    PONG_TIMEOUT = 4001  # nothing heard from the client for -pong-wait

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


class StoreUnavailable(GatewayError):
    """The token database did not answer; callers answer 503 and keep running."""


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
