"""A bounded memory of tokens seen recently, that holds no token.

What the gateway remembers about tokens for a short while (the tokens a lookup found
unknown, the tokens that recently authenticated) is kept as keyed BLAKE2b digests: a
memory dump, a core file or a debugger shows no token, and the key is random per
process, so a digest cannot be checked against guesses elsewhere either. Each entry
lives `ttl_s` from when it was last added, and at most `max_entries` are kept, the
oldest forgotten first, so whatever a client sends, the memory stays bounded
(about 150 bytes an entry). Pure and clock-injected: tests need no sleeps.
"""
from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from typing import Callable

DIGEST_BYTES = 16


class RecentTokens:
    """Tokens added within the last `ttl_s` seconds, at most `max_entries` of them.
    `ttl_s == 0` remembers nothing."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._key = secrets.token_bytes(16)
        self._expiry: OrderedDict[bytes, float] = OrderedDict()  # digest -> monotonic expiry, oldest first

    def add(self, token: str) -> None:
        """Remember `token` for `ttl_s` from now (again, if it was remembered already)."""
        if not self.ttl_s or not self.max_entries:
            return
        digest = self._digest(token)
        now = self._clock()
        self._forget_expired(now)
        self._expiry.pop(digest, None)  # re-added at the young end: the order stays expiry order
        while len(self._expiry) >= self.max_entries:
            self._expiry.popitem(last=False)
        self._expiry[digest] = now + self.ttl_s

    def __contains__(self, token: object) -> bool:
        if not self._expiry or not isinstance(token, str):
            return False
        expiry = self._expiry.get(self._digest(token))
        return expiry is not None and expiry > self._clock()

    def __len__(self) -> int:
        return len(self._expiry)

    def _digest(self, token: str) -> bytes:
        return hashlib.blake2b(token.encode("utf-8", "surrogatepass"), key=self._key,
                               digest_size=DIGEST_BYTES).digest()

    def _forget_expired(self, now: float) -> None:
        while self._expiry:
            digest, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                return
            del self._expiry[digest]
