"""Closing the sockets of players whose token was revoked or expired.

Every `-revalidate-period`, the tokens of all live connections are checked in batched
queries (never one query per socket); connections whose token is no longer valid are
closed with 1008. The queries yield to other greenlets while they wait, so publishing
goes on meanwhile. If the database fails, nothing is closed: a database outage must not
disconnect every player.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Protocol

from wsgateway.errors import CloseCode, StoreUnavailable
from wsgateway.tokens import TokenStore

log = logging.getLogger(__name__)


class Closable(Protocol):
    player_id: str
    token: str

    def close(self, code: CloseCode) -> None: ...


class Revalidator:
    def __init__(self, store: TokenStore, connections: Callable[[], Iterable[Closable]]) -> None:
        self._store = store
        self._connections = connections

    def run_once(self) -> int:
        """Check every live connection's token once; return how many were closed."""
        connections = list(self._connections())
        if not connections:
            return 0
        try:
            valid = self._store.valid_player_tokens({connection.token for connection in connections})
        except StoreUnavailable as exc:
            log.warning("revalidation skipped: token store unavailable",
                        extra={"event": "revalidation_failed", "detail": str(exc)})
            return 0
        closed = 0
        for connection in connections:
            if connection.token not in valid:
                log.info("token no longer valid, closing", extra={
                    "event": "token_revoked", "player_id": connection.player_id})
                connection.close(CloseCode.POLICY_VIOLATION)
                closed += 1
        return closed
