"""Debian's headless Chromium driven by a node script in tests/browser (playwright-core): JSON step
reports in, lines out. CI installs the tools (`make install-test-tools`) and then requires them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import gevent
import pytest

from tests.support import TIMEOUT_S

BROWSER_DIR = Path(__file__).resolve().parent.parent / "browser"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
# CI sets this once it has installed the test tools: then a missing piece fails the test.
BROWSER_REQUIRED = os.environ.get("WS_GATEWAY_TEST_TOOLS") == "required"
BROWSER_STEP_TIMEOUT_S = 6 * TIMEOUT_S  # a cold Chromium start is slow on a loaded 2-core machine


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; `make install-test-tools` does it)"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed in tests/browser (`make install-test-tools`)"
    return None


def require_browser() -> None:
    """Skip the calling test when the browser cannot run here (fail instead where CI requires it)."""
    missing = browser_missing()
    if missing:
        if BROWSER_REQUIRED:
            pytest.fail(f"the browser test is required here but cannot run: {missing}")
        pytest.skip(missing)


class BrowserScript:
    """A script of tests/browser as a child process: JSON step reports in, commands out."""

    def __init__(self, options: dict[str, Any], script: str = "console_check.mjs") -> None:
        self.process = subprocess.Popen(
            ["node", script, json.dumps(options)], cwd=BROWSER_DIR, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "CHROMIUM_PATH": CHROMIUM, "STEP_TIMEOUT_MS": str(int(BROWSER_STEP_TIMEOUT_S * 1000))})

    def step(self, name: str) -> dict[str, Any]:
        """The next report, which must be step `name`."""
        with gevent.Timeout(BROWSER_STEP_TIMEOUT_S + TIMEOUT_S, AssertionError(f"no '{name}' step from the browser")):
            line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=TIMEOUT_S)
            raise AssertionError(f"browser script ended before '{name}': {self.process.stderr.read()}")
        report = json.loads(line)
        assert report["step"] == name, report
        return report

    def tell(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def finish(self) -> int:
        return self.process.wait(timeout=BROWSER_STEP_TIMEOUT_S)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=TIMEOUT_S)
