"""wsgateway.errors: the README's error tables are the catalogues, and every refusal's answer is built there."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from wsgateway.errors import ClientError, CloseCode, Refusal

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
PACKAGE = Path(__file__).resolve().parent.parent / "wsgateway"


def table_after(heading: str) -> list[str]:
    """The first column of the first Markdown table after `heading`."""
    section = README.split(heading, 1)[1]
    rows = re.findall(r"^\| ([^|]+?) \|", section.split("\n\n|", 1)[1].split("\n\n", 1)[0], re.M)
    return [row for row in rows if row not in ("status", "code") and not row.startswith("---")]


def test_readme_http_table_is_the_refusal_catalogue():
    """Each status in the README's error table has a catalogue entry, and each entry a row."""
    readme = {int(status) for row in table_after("## Errors") for status in row.split(" / ")}
    assert readme == {refusal.status for refusal in Refusal}


def test_readme_close_code_table_is_the_close_code_catalogue():
    """The README lists every close code the gateway sends (1005 and 1006 are metrics only)."""
    section = README.split("WebSocket close codes the gateway sends:", 1)[1]
    codes = {int(code) for code in re.findall(r"^\| (\d{4}) \|", section.split("\n\n", 2)[1], re.M)}
    assert codes == {int(code) for code in CloseCode} - {CloseCode.NO_STATUS, CloseCode.ABNORMAL}


@pytest.mark.parametrize("refusal", list(Refusal), ids=[refusal.name for refusal in Refusal])
def test_every_refusal_builds_a_json_answer(refusal):
    """Filled in, each entry is a ClientError whose answer is `{"error": ...}` with matching headers."""
    error = refusal(limit=5, allow="POST", retry_after_s=2, what="broker", detail="bad", name="key", count=9,
                    period="1s", first=0, index=3)
    assert isinstance(error, ClientError) and error.status == refusal.status
    body = error.body()
    assert json.loads(body) == {"error": error.message} and "{" not in error.message
    headers = dict(error.response_headers(body))
    assert headers["Content-Type"] == "application/json" and headers["Content-Length"] == str(len(body))
    response = error.response_bytes(close=True)
    assert response.startswith(f"HTTP/1.1 {refusal.status} ".encode()) and response.endswith(body)
    assert b"\r\nConnection: close\r\n" in response


def test_no_other_module_builds_an_error_body():
    """`{"error": ...}` bodies are built by ClientError only (the client only reads them)."""
    builders = [path.name for path in PACKAGE.rglob("*.py")
                if path.name not in ("errors.py", "client.py") and re.search(r"""(?<!`)\{\s*["']error["']\s*:""", path.read_text())]
    assert builders == []


def test_refusals_are_built_from_the_catalogue_only():
    """No module but errors.py makes up a ClientError (app.py only translates Werkzeug's own errors)."""
    builders = [path.name for path in PACKAGE.rglob("*.py")
                if path.name not in ("errors.py", "app.py") and "ClientError(" in path.read_text()]
    assert builders == []


def test_a_refusal_within_a_part_of_the_request_keeps_status_headers_and_details():
    """within() names the part and what was left undone, keeping status and headers and adding details."""
    error = Refusal.SHUTTING_DOWN().within("batch", "messages[3:] not delivered", {"results": []})
    assert (error.status, error.message) == (503, "batch: server shutting down: messages[3:] not delivered")
    assert error.headers == {"Retry-After": "1"} and json.loads(error.body())["results"] == []
