"""A gateway from sync Python: `GatewayClient` publishes (and asks presence and
disconnects, for operators), `PlayerListener` receives.

`GatewayClient` is standard library only (http.client), so it works in any process: plain
threads, or gevent-patched (its sockets then wait cooperatively). `PlayerListener` needs
websocket-client, imported only when it connects. Neither imports the rest of
`wsgateway`, so this module can be copied into a project on its own.

    from wsgateway.client import GatewayClient
    gateway = GatewayClient("http://127.0.0.1:8080", "SERVER_TOKEN")
    gateway.publish(21, "flag_captured", {"target": "web01"})  # PublishResult(delivered=1, queued=False)
    gateway.broadcast("round_over")                            # 1423 sockets reached
    gateway.presence()                                         # {"players": 980, "connections": 1423}
    gateway.disconnect(21)                                     # 2 connections closed (4002)

Retries: a connection error, a timeout or a 5xx answer is retried up to `retries` times,
after `backoff_s`, then twice that, and so on (at most `max_backoff_s`); a 429 is retried
after the `Retry-After` the gateway sent (never sooner), or given up at once when that is
longer than `max_backoff_s`. Other 4xx answers are never retried: sending the same
request again cannot succeed. A retried request may have been delivered the first time
(the answer was lost), so delivery is at least once: pass `idempotency_key=` to publish
and broadcast and every retry carries the same key, so a gateway that knows the
`Idempotency-Key` header delivers it once (one that does not ignores it).

Errors (the gateway's `{"error": ...}` message is the exception's message)::

    GatewayError            base: `status` (HTTP status, None when no answer) and `message`
    ├── BadRequest          400, 413: the request itself is wrong
    ├── AuthError           401, 403: missing, unknown, expired or non-server token
    ├── RateLimited         429 after the retries: `retry_after` seconds
    └── Unavailable         5xx after the retries, or no answer at all (refused, timeout)

Other statuses (404 for an endpoint the gateway does not have, 405) raise `GatewayError`.

Listening as a player (what `ws-gateway listen` runs)::

    from wsgateway.client import PlayerListener
    listener = PlayerListener("http://127.0.0.1:8080", "PLAYER_TOKEN")
    listener.run(print)  # each message's text, until listener.stop(); reconnects by itself

It reconnects after every loss with capped exponential backoff and jitter, and resumes:
every connection asks for ids (`/ws?token=T&last_event_id=<the last id it handed on>`,
empty at first), so a gateway that keeps a history (`-history-size`) replays what was
published while the listener was away, none twice, none skipped, and every message comes
with its `"id"` as the last key. A gateway without a history sends today's frames and
nothing is replayed. When the gateway cannot honour the id, the first message is its
`{"event": "gateway.missed", "payload": {"recovered": false, ...}}` notice (handed on
like any message, and reported to `on_status`); every kept message follows. It gives up
(raising) only when retrying cannot help: 401/403 at the handshake (`AuthError`) or
another refusal that is not 429 or 5xx (`GatewayError`). Every wait is bounded: the
connection and handshake by `timeout_s`, silence on an open socket by `idle_timeout_s`
(the gateway pings every 30 s by default), a pause by `max_backoff_s`.
"""
from __future__ import annotations

import http.client
import json
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import quote, urlencode, urlsplit

USER_AGENT = "ws-gateway-client/1"
WEBSOCKET_PATH = "/ws"
MISSED_EVENT = "gateway.missed"  # the gateway's notice (wsgateway/history.py; not imported: see above)
HISTORY_OFF = "history_off"  # its reason when the gateway keeps no history


class GatewayError(Exception):
    """The gateway refused the request, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message if self.status is None else f"{self.status}: {self.message}"


class BadRequest(GatewayError):
    """400 or 413: the gateway refuses this request as it is; retrying cannot help."""


class AuthError(GatewayError):
    """401 or 403: the server token is missing, unknown, expired or a player's."""


class RateLimited(GatewayError):
    """429: this server token's rate limit is exhausted; try again after `retry_after` s."""

    def __init__(self, message: str, status: int | None = 429, retry_after: float = 1.0) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class Unavailable(GatewayError):
    """5xx, or no answer (connection refused or reset, timeout): the gateway or its
    database is down or overloaded. `status` is None when nothing answered;
    `retry_after` is the gateway's `Retry-After` in seconds, if it sent one."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


@dataclass(frozen=True)
class PublishResult:
    """How one published message went: handed to `delivered` sockets, or `queued` for
    an offline player."""

    delivered: int
    queued: bool


class GatewayClient:
    """A publisher for one gateway and one server token. Safe to share between threads
    and greenlets: every call opens its own connection."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 5.0, retries: int = 3,
                 backoff_s: float = 0.2, max_backoff_s: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """`url`: the gateway's base URL (`http://host:port`, `https://host/prefix`).
        `timeout_s`: for connecting and for each read. `retries`: extra attempts after the
        first. `ssl_context`: for https (default: the system's trusted CAs). `sleep` waits
        between attempts (tests pass one that records instead)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"gateway URL must be http://HOST[:PORT] or https://..., not {url!r}")
        if not token:
            raise ValueError("a server token is required")
        if retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0, timeout_s > 0")
        self.url = url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._ssl_context = ssl_context
        self._sleep = sleep

    # --- the gateway's publishing endpoints -----------------------------------------------
    def publish(self, player_id: int | str, event: str, payload: Any = None, *,
                idempotency_key: str | None = None) -> PublishResult:
        """Send `event` with `payload` to one player; queued by the gateway while the
        player is offline. A payload that is not JSON (NaN, a set) raises ValueError or
        TypeError before anything is sent."""
        answer = self._post("/publish", {"player_id": player_id, "event": event, "payload": payload},
                            idempotency_key)
        return _publish_result(answer)

    def broadcast(self, event: str, payload: Any = None, player_id: int | str | None = None, *,
                  idempotency_key: str | None = None) -> int:
        """Send `event` to every connected player (or only to `player_id`'s live
        connections, never queued); returns the number of sockets it was handed to."""
        body: dict[str, Any] = {"event": event, "payload": payload}
        if player_id is not None:
            body["player_id"] = player_id
        return int(self._post("/broadcast", body, idempotency_key)["delivered"])

    def publish_batch(self, messages: Iterable[Mapping[str, Any]]) -> list[PublishResult]:
        """Publish several messages in one request (`POST /publish/batch`); each message
        is `{"player_id": ..., "event": ..., "payload": ...}`. Results are in the same
        order. The whole batch is refused (400 naming `messages[i]`, 429) or accepted.
        Retries resend the whole batch: give each message an `idempotency_key` so that a
        retry never delivers one twice."""
        answer = self._post("/publish/batch", {"messages": [dict(message) for message in messages]}, None)
        return [_publish_result(result) for result in answer["results"]]

    # --- the operator's endpoints ------------------------------------------------------------
    def presence(self, player_id: int | str | None = None) -> dict[str, Any]:
        """Who is online (every gateway of a cluster): `{"players": P, "connections": C}`,
        or for one player `{"player_id": "21", "connections": N}`."""
        query = "" if player_id is None else "?" + urlencode({"player_id": player_id})
        return self._send("GET", "/presence" + query, None, {})

    def disconnect(self, player_id: int | str) -> int:
        """Close every connection of the player, on every gateway, with 4002; returns how
        many there were. The player may reconnect: revoke its token first to keep it out."""
        return int(self._post("/disconnect", {"player_id": player_id}, None)["disconnected"])

    # --- HTTP with retries ----------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any], idempotency_key: str | None) -> dict[str, Any]:
        data = json.dumps(body, allow_nan=False, separators=(",", ":")).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key  # the same on every retry
        return self._send("POST", path, data, headers)

    def _send(self, method: str, path: str, data: bytes | None, extra_headers: dict[str, str]) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json",
                   "User-Agent": USER_AGENT, **extra_headers}
        attempt = 0
        while True:
            try:
                return self._send_once(method, self._prefix + path, data, headers)
            except (Unavailable, RateLimited) as failure:
                wait_s = self._wait_before_retry(failure, attempt)
                if wait_s is None:
                    raise
            attempt += 1
            self._sleep(wait_s)

    def _wait_before_retry(self, failure: Unavailable | RateLimited, attempt: int) -> float | None:
        """Seconds to wait before retrying after `failure`, or None to give up. Never
        sooner than the gateway's Retry-After; never longer than `max_backoff_s`."""
        if attempt >= self.retries:
            return None
        asked_s = failure.retry_after
        if asked_s is not None and asked_s > self.max_backoff_s:
            return None
        if isinstance(failure, RateLimited):
            return asked_s
        backoff_s = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
        return backoff_s if asked_s is None else max(backoff_s, asked_s)

    def _send_once(self, method: str, path: str, data: bytes | None, headers: dict[str, str]) -> dict[str, Any]:
        connection = self._connection()
        try:
            connection.request(method, path or "/", body=data, headers=headers)
            response = connection.getresponse()
            status, retry_after, raw = response.status, response.getheader("Retry-After"), response.read()
        except ssl.SSLCertVerificationError as exc:  # not transient: never retried
            raise GatewayError(f"the TLS certificate of {self.url} is not trusted: {exc.verify_message}") from exc
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timeout, bad answer
            raise Unavailable(f"no answer from {self.url}: {_describe(exc)}") from exc
        finally:
            connection.close()
        answer = _json_or_none(raw)
        if 200 <= status < 300:
            if not isinstance(answer, dict):
                raise GatewayError(f"answer is not a JSON object: {raw[:200]!r}", status)
            return answer
        message = answer.get("error") if isinstance(answer, dict) and isinstance(answer.get("error"), str) \
            else (raw[:200].decode("utf-8", "replace").strip() or http.client.responses.get(status, "error"))
        raise _error_for(status, message, _seconds(retry_after))

    def _connection(self) -> http.client.HTTPConnection:
        if self._https:
            context = self._ssl_context or ssl.create_default_context()
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout_s, context=context)
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)


class PlayerListener:
    """One player's connection to a gateway's `/ws`, kept open: every text message the
    player receives goes to `on_message`, in order, until `stop()`.

    Every connection resumes from `last_event_id`, the id of the last message handed to
    `on_message` (updated only once `on_message` returned). A message published while the
    listener is between connections reaches it through the gateway's history when the
    gateway keeps one (`-history-size`, within its size and age); without one, only
    through the offline queue (when the player has no other connection)."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 5.0, idle_timeout_s: float = 90.0,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0, stable_s: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None, last_event_id: str = "",
                 jitter: Callable[[], float] = random.random) -> None:
        """`url`: the gateway's base URL (`http(s)://host[:port][/prefix]`, or `ws(s)://`).
        `timeout_s`: for connecting and the handshake. `idle_timeout_s`: an open socket
        that brings nothing, not even a ping, for this long counts as lost. The pause
        before attempt n is between half and all of `min(max_backoff_s, backoff_s * 2**n)`;
        n starts again at 0 once a connection stayed up `stable_s` or brought a message.
        `last_event_id`: where the first connection resumes (the `"id"` of the last message
        an earlier listener handed on); empty: no position yet."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
            raise ValueError(f"gateway URL must be http(s)://HOST[:PORT] or ws(s)://..., not {url!r}")
        if not token:
            raise ValueError("a player token is required")
        if timeout_s <= 0 or idle_timeout_s <= 0 or backoff_s <= 0 or max_backoff_s < backoff_s:
            raise ValueError("timeouts and backoff_s must be > 0, max_backoff_s >= backoff_s")
        secure = parts.scheme in ("https", "wss")
        port = f":{parts.port}" if parts.port else ""
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self.url = f"{'wss' if secure else 'ws'}://{host}{port}{parts.path.rstrip('/')}{WEBSOCKET_PATH}"
        self._token = token
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_s = stable_s
        self._ssl_context = ssl_context
        self._jitter = jitter
        self._stopped = threading.Event()
        self._socket: Any = None
        self.last_event_id = last_event_id  # the next connection resumes after it; "": none yet

    def run(self, on_message: Callable[[str], None], *,
            on_status: Callable[[str], None] = lambda line: None) -> None:
        """Listen until `stop()`. `on_status` gets one line per connect and loss (never
        the token). Raises `AuthError` for 401/403 at the handshake, `GatewayError` for
        another refusal that retrying cannot help."""
        attempt = 0
        while not self._stopped.is_set():
            started = time.monotonic()
            try:
                lost, received = self._listen_once(on_message, on_status)
            except Unavailable as exc:
                lost, received = exc.message, False
            if self._stopped.is_set():
                return
            if received or time.monotonic() - started >= self.stable_s:
                attempt = 0
            delay_s = self._backoff(attempt)
            attempt += 1
            on_status(f"{lost}; reconnecting in {delay_s:.1f} s")
            self._stopped.wait(delay_s)

    def stop(self) -> None:
        """End `run` soon: from a signal handler, another thread or a greenlet."""
        self._stopped.set()
        connection = self._socket
        if connection is not None and connection.sock is not None:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)  # wakes the waiting receive
            except OSError:
                pass

    def _backoff(self, attempt: int) -> float:
        ceiling_s = min(self.max_backoff_s, self.backoff_s * 2 ** min(attempt, 32))
        return ceiling_s / 2 + self._jitter() * ceiling_s / 2

    def _connect_url(self) -> str:
        """The handshake's URL: the one place a query parameter goes (the token, and the
        position to resume from, always present so that every frame carries its id)."""
        return (f"{self.url}?token={quote(self._token, safe='')}"
                f"&last_event_id={quote(self.last_event_id, safe='')}")

    def _handed_on(self, text: str, on_status: Callable[[str], None]) -> None:
        """Bookkeeping after `on_message` returned: the message's id becomes the position
        to resume from; a `gateway.missed` notice that the resume failed is reported.
        After a notice the old id is kept (asking with it again costs one more notice,
        never a message), except when the gateway keeps no history at all: then ids will
        not come, and asking with none gets today's frames without a notice."""
        message = _json_or_none(text)
        if not isinstance(message, dict):
            return
        event_id = message.get("id")
        if isinstance(event_id, str) and event_id:
            self.last_event_id = event_id
            return
        payload = message.get("payload")
        if message.get("event") == MISSED_EVENT and isinstance(payload, dict) and payload.get("recovered") is False:
            reason = payload.get("reason")
            on_status(f"could not resume after {self.last_event_id}: {reason}; "
                      f"{payload.get('kept')} kept message(s) follow")
            if reason == HISTORY_OFF:
                self.last_event_id = ""

    def _listen_once(self, on_message: Callable[[str], None],
                     on_status: Callable[[str], None]) -> tuple[str, bool]:
        """One connection, until it ends: (why it ended, whether it brought a message).
        Raises what `run` documents, or `Unavailable` when it could not be opened."""
        import websocket  # websocket-client: only listening needs it

        try:
            connection = websocket.create_connection(
                self._connect_url(), timeout=self.timeout_s, suppress_origin=True,
                header=[f"User-Agent: {USER_AGENT}"],
                sslopt={"context": self._ssl_context or ssl.create_default_context()})
        except websocket.WebSocketBadStatusException as exc:
            raise self._refusal(exc) from None
        except (OSError, websocket.WebSocketException) as exc:
            raise Unavailable(f"no answer from {self.url}: {_describe(exc)}") from None
        self._socket = connection
        on_status(f"connected to {self.url}" + (f", resuming after {self.last_event_id}" if self.last_event_id else ""))
        received = False
        try:
            connection.settimeout(self.idle_timeout_s)
            while not self._stopped.is_set():
                opcode, frame = connection.recv_data_frame(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    received = True
                    text = frame.data.decode("utf-8", "replace")
                    on_message(text)
                    self._handed_on(text, on_status)
                elif opcode == websocket.ABNF.OPCODE_CLOSE:
                    code = int.from_bytes(frame.data[:2], "big") if len(frame.data) >= 2 else 1005
                    reason = frame.data[2:].decode("utf-8", "replace")
                    return f"closed by the gateway: {code}" + (f" {reason}" if reason else ""), received
            return "stopped", received
        except websocket.WebSocketTimeoutException:
            return f"nothing heard for {self.idle_timeout_s:g} s", received
        except (OSError, websocket.WebSocketException) as exc:
            return f"connection lost: {_describe(exc)}", received
        finally:
            self._socket = None
            connection.close(timeout=1)

    def _refusal(self, exc: Any) -> GatewayError:
        """The handshake's answer as the error `run` raises, or `Unavailable` (retried)."""
        status = int(exc.status_code)
        answer = _json_or_none(exc.resp_body or b"")
        message = answer["error"] if isinstance(answer, dict) and isinstance(answer.get("error"), str) \
            else http.client.responses.get(status, "refused")
        error = _error_for(status, message, None)
        if isinstance(error, (RateLimited, Unavailable)):  # too many connections, or down: retried
            return Unavailable(f"the gateway answered {status}: {message}", status)
        return error


def _error_for(status: int, message: str, retry_after_s: float | None) -> GatewayError:
    if status in (400, 413):
        return BadRequest(message, status)
    if status in (401, 403):
        return AuthError(message, status)
    if status == 429:
        return RateLimited(message, status, 1.0 if retry_after_s is None else retry_after_s)
    if status >= 500:
        return Unavailable(message, status, retry_after_s)
    return GatewayError(message, status)


def _publish_result(answer: Mapping[str, Any]) -> PublishResult:
    return PublishResult(delivered=int(answer["delivered"]), queued=bool(answer.get("queued", False)))


def _json_or_none(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _seconds(retry_after: str | None) -> float | None:
    """`Retry-After` in seconds; the HTTP-date form is not used by the gateway."""
    try:
        return max(0.0, float(retry_after)) if retry_after is not None else None
    except ValueError:
        return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    return str(exc) or type(exc).__name__
