#!/usr/bin/env python3
"""Run the Autobahn testsuite against the gateway's WebSocket layer and print the figures.

    .venv/bin/python bench/autobahn.py            # sections 1-7, 9, 10 (the full run, a few minutes)
    .venv/bin/python bench/autobahn.py --ci       # sections 1-7, 10 (what CI runs, about 10 s)
    .venv/bin/python bench/autobahn.py 9.1.6 9.7.*  # any case patterns

The echo server (tests/conformance/echo_server.py: the gateway's Connection behind the
gateway's handler) runs in this process; wstest runs in its Python 2.7 virtualenv, built
on first use. The HTML report is written to bench/results/autobahn/. Exit status 1 when
any case is not OK/INFORMATIONAL or any close is not clean.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from tests.conformance.autobahn import CI_CASES, FULL_CASES, ensure_wstest, run_fuzzingclient  # noqa: E402
from tests.conformance.echo_server import start_echo_server  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help="case patterns (default: sections 1-7, 9, 10)")
    parser.add_argument("--ci", action="store_true", help="only the sections CI runs (1-7, 10)")
    parser.add_argument("--outdir", default=str(PROJECT / "bench" / "results" / "autobahn"))
    options = parser.parse_args()
    cases = tuple(options.cases) or (CI_CASES if options.ci else FULL_CASES)
    wstest = ensure_wstest()
    server = start_echo_server()
    try:
        report = run_fuzzingclient(wstest, f"ws://127.0.0.1:{server.server_port}", cases, Path(options.outdir))
    finally:
        server.stop(timeout=5)
    load = os.getloadavg()
    print(report.summary())
    for section in sorted({case_id.split(".")[0] for case_id in report.cases}, key=int):
        print(f"  section {section}: {report.section_ms(section) / 1000:.1f} s")
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    bad = report.not_good()
    for case_id, verdict in bad.items():
        print(f"  {case_id}: {verdict}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
