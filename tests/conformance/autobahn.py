"""Running the Autobahn testsuite (`wstest -m fuzzingclient`) and reading its report.

`autobahntestsuite` runs only under Python 2.7 (its Python 3 wheel has Python 2 syntax).
`ensure_wstest()` builds a Python 2.7 virtualenv for it once, outside the repository
(`~/.cache/ws-gateway/autobahn-py27`, or `$WS_GATEWAY_AUTOBAHN_VENV`), with `virtualenv`
pinned to the last release that can still create 2.7 environments. Where no Python 2.7
exists it raises `Python27Missing`, whose message is the reason the caller skips with.

Used by tests/conformance/test_autobahn.py (CI: sections 1-7 and 10) and by
bench/autobahn.py (the full run with section 9, timed).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

AUTOBAHN_VERSION = "25.10.1"
VIRTUALENV_VERSION = "20.21.1"  # the last virtualenv that creates Python 2.7 environments
CACHE_DIR = Path(os.environ.get("WS_GATEWAY_AUTOBAHN_VENV",
                                Path.home() / ".cache" / "ws-gateway" / "autobahn-py27"))
CI_CASES = ("1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "10.*")
FULL_CASES = ("1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*")
GOOD_BEHAVIORS = ("OK", "INFORMATIONAL")


class Python27Missing(RuntimeError):
    """No Python 2.7 interpreter on this machine: the conformance run cannot happen."""


def find_python27() -> str:
    """Path of a Python 2.7 interpreter: `$WS_GATEWAY_PYTHON27`, pyenv's, or `python2.7` on PATH."""
    candidates = [os.environ.get("WS_GATEWAY_PYTHON27", "")]
    pyenv = shutil.which("pyenv") or str(Path.home() / ".pyenv" / "bin" / "pyenv")
    if os.access(pyenv, os.X_OK):
        versions = subprocess.run([pyenv, "versions", "--bare"], capture_output=True, text=True).stdout.split()
        for version in sorted((v for v in versions if v.startswith("2.7")), reverse=True):
            prefix = subprocess.run([pyenv, "prefix", version], capture_output=True, text=True).stdout.strip()
            candidates.append(os.path.join(prefix, "bin", "python2.7"))
    candidates += sorted(glob.glob(str(Path.home() / ".pyenv" / "versions" / "2.7*" / "bin" / "python2.7")))
    candidates.append(shutil.which("python2.7") or "")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise Python27Missing("autobahntestsuite needs Python 2.7 and none was found "
                          "(pyenv 2.7.x, python2.7 on PATH, or $WS_GATEWAY_PYTHON27)")


def ensure_wstest(cache_dir: Path = CACHE_DIR) -> Path:
    """The `wstest` executable, building its Python 2.7 virtualenv first if needed."""
    wstest = cache_dir / "bin" / "wstest"
    marker = cache_dir / f".autobahntestsuite-{AUTOBAHN_VERSION}"
    if marker.exists() and os.access(wstest, os.X_OK):
        return wstest
    python27 = find_python27()
    shutil.rmtree(cache_dir, ignore_errors=True)
    builder = cache_dir.with_name(cache_dir.name + "-builder")  # a Python 3 venv holding virtualenv
    if not (builder / "bin" / "virtualenv").exists():
        shutil.rmtree(builder, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(builder)])
        _run([str(builder / "bin" / "pip"), "install", "-q", f"virtualenv=={VIRTUALENV_VERSION}"])
    _run([str(builder / "bin" / "virtualenv"), "-q", "-p", python27, str(cache_dir)])
    _run([str(cache_dir / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
          f"autobahntestsuite=={AUTOBAHN_VERSION}"])
    marker.touch()
    return wstest


def _run(command: list[str]) -> None:
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({finished.returncode}):\n{finished.stderr[-3000:]}")


@dataclass
class Report:
    """Autobahn's verdicts for one agent: case id -> (behavior, close behavior, duration ms)."""

    cases: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the wstest run

    def count(self, key: str = "behavior") -> Counter:
        return Counter(case[key] for case in self.cases.values())

    def not_good(self) -> dict[str, str]:
        """Cases whose behavior is not OK/INFORMATIONAL or whose close was not clean."""
        return {case_id: f"{case['behavior']}/{case['behaviorClose']}"
                for case_id, case in sorted(self.cases.items(), key=lambda item: _case_key(item[0]))
                if case["behavior"] not in GOOD_BEHAVIORS or case["behaviorClose"] not in GOOD_BEHAVIORS}

    def section_ms(self, section: str) -> int:
        return sum(case.get("duration", 0) for case_id, case in self.cases.items()
                   if case_id.split(".")[0] == section)

    def summary(self) -> str:
        behaviors = ", ".join(f"{count} {name}" for name, count in sorted(self.count().items()))
        closes = ", ".join(f"{count} {name}" for name, count in sorted(self.count("behaviorClose").items()))
        return f"{len(self.cases)} cases: {behaviors}; close: {closes}; wstest ran {self.seconds:.1f} s"


def _case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case_id.split("."))


def run_fuzzingclient(wstest: Path, url: str, cases: tuple[str, ...], outdir: Path,
                      agent: str = "ws-gateway", timeout_s: float = 900) -> Report:
    """Run wstest against `url` and return the agent's verdicts from `outdir/index.json`."""
    outdir.mkdir(parents=True, exist_ok=True)
    spec = {"outdir": str(outdir), "servers": [{"agent": agent, "url": url}],
            "cases": list(cases), "exclude-cases": [], "exclude-agent-cases": {}}
    spec_path = outdir / "fuzzingclient.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    started = time.monotonic()
    finished = subprocess.run([str(wstest), "-m", "fuzzingclient", "-s", str(spec_path)], cwd=outdir,
                              capture_output=True, text=True, timeout=timeout_s)
    seconds = time.monotonic() - started
    (outdir / "wstest.log").write_text(finished.stdout + finished.stderr)
    index = outdir / "index.json"
    if finished.returncode or not index.exists():
        raise RuntimeError(f"wstest failed ({finished.returncode}); see {outdir / 'wstest.log'}:\n"
                           f"{(finished.stdout + finished.stderr)[-3000:]}")
    return Report(json.loads(index.read_text())[agent], seconds)
