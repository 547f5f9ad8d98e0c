"""RFC 6455 conformance of the gateway's WebSocket layer, judged by the Autobahn testsuite.

CI runs sections 1-7 and 10 (about 10 s); `WS_GATEWAY_AUTOBAHN=full` adds section 9
(16 MiB messages, a minute or so). Without Python 2.7 the test is skipped, saying why.
"""
from __future__ import annotations

import os

import pytest

from tests.conformance.autobahn import CI_CASES, FULL_CASES, Python27Missing, ensure_wstest, run_fuzzingclient
from tests.conformance.echo_server import start_echo_server
from tests.support import TIMEOUT_S

CASE_COUNTS = {CI_CASES: 247, FULL_CASES: 301}  # what wstest 25.10.1 runs for these patterns


@pytest.fixture(scope="module")
def wstest():
    try:
        return ensure_wstest()
    except Python27Missing as missing:
        pytest.skip(str(missing))


def test_autobahn_cases_all_ok_with_clean_closes(wstest, tmp_path):
    """Every Autobahn case is OK or INFORMATIONAL (none NON-STRICT or FAILED) and every close is clean."""
    cases = FULL_CASES if os.environ.get("WS_GATEWAY_AUTOBAHN") == "full" else CI_CASES
    server = start_echo_server()
    try:
        report = run_fuzzingclient(wstest, f"ws://127.0.0.1:{server.server_port}", cases, tmp_path / "autobahn")
    finally:
        server.stop(timeout=TIMEOUT_S)
    assert report.not_good() == {}, report.summary()
    assert len(report.cases) == CASE_COUNTS[cases], report.summary()
