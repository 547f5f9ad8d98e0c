"""A real HTTP server on port 0 that answers from a script and records what it was sent:
the peer for client behaviour a healthy gateway cannot be made to show on demand
(a 502 from a proxy in front of it, a 429 with a short Retry-After, an answer that
is not JSON)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gevent.pywsgi import WSGIServer


@dataclass
class Answer:
    status: int
    body: Any = None  # JSON-encoded unless bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class ScriptedServer:
    """Answers each request with the next `Answer` of the script (the last one repeats)."""

    def __init__(self, *script: Answer) -> None:
        self.script = list(script)
        self.received: list[Received] = []
        self.server = WSGIServer(("127.0.0.1", 0), self._application, log=None, error_log=None)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def _application(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items()
                   if key.startswith("HTTP_")}
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = environ["CONTENT_TYPE"]
        self.received.append(Received(environ["REQUEST_METHOD"], environ["PATH_INFO"], headers,
                                      environ["wsgi.input"].read(length)))
        answer = self.script[min(len(self.received), len(self.script)) - 1]
        body = answer.body if isinstance(answer.body, bytes) else json.dumps(answer.body).encode()
        start_response(f"{answer.status} Scripted", [("Content-Type", "application/json"),
                                                     *answer.headers.items()])
        return [body]

    def stop(self) -> None:
        self.server.stop(timeout=1)
