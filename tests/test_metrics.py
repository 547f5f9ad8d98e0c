"""What /metrics shows before anything happened, and the process metrics beside the gateway's own."""
from __future__ import annotations

import re
import resource
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from wsgateway.errors import CloseCode
from wsgateway.metrics import AUTH_FAILURE_KINDS, AUTH_FAILURE_REASONS, DROP_REASONS, REJECTION_REASONS

PACKAGE = Path(__file__).resolve().parent.parent / "wsgateway"


def scraped(gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from the gateway's /metrics."""
    reply = gateway.get("/metrics")
    assert reply.status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(reply.body.decode()) for sample in family.samples}


def test_labelled_counters_start_with_a_zero_series_for_every_known_value(gateway):
    """Before any traffic, each drop reason, refused-token kind and reason, refusal reason and close code
    has its series at 0, so panels show 0 instead of "No data"."""
    samples = scraped(gateway)
    expected = [("ws_messages_dropped_total", {"reason": reason}) for reason in DROP_REASONS]
    expected += [("ws_auth_failures_total", {"kind": kind, "reason": reason})
                 for kind in AUTH_FAILURE_KINDS for reason in AUTH_FAILURE_REASONS]
    expected += [("ws_auth_throttled_total", {"kind": kind}) for kind in AUTH_FAILURE_KINDS]
    expected += [("ws_connections_rejected_total", {"reason": reason}) for reason in REJECTION_REASONS]
    expected += [("ws_disconnects_total", {"code": str(int(code))}) for code in CloseCode]
    for name, labels in expected:
        assert samples.get((name, tuple(sorted(labels.items())))) == 0.0, (name, labels)


def test_known_label_values_are_the_ones_the_code_counts_under():
    """The label values started at 0 are exactly those the package's counting calls use, so a new reason
    cannot be added in one place only."""
    source = "\n".join(path.read_text() for path in PACKAGE.rglob("*.py") if path.name != "metrics.py")
    rejections = set(re.findall(r"rejected\.labels\(\"(\w+)\"\)", source))
    rejections |= set(re.findall(r"_unavailable\(\"(\w+)\"", source))
    auth = set(re.findall(r"auth_failures\.labels\(\"(\w+)\", \"(\w+)\"\)", source))
    assert rejections == set(REJECTION_REASONS), "wsgateway/metrics.py REJECTION_REASONS vs the calls"
    assert auth == {(kind, reason) for kind in AUTH_FAILURE_KINDS for reason in AUTH_FAILURE_REASONS}


def test_process_metrics_show_memory_and_descriptors_against_their_limit(gateway):
    """/metrics carries prometheus-client's process and platform metrics for the gateway's process."""
    samples = scraped(gateway)
    value = {name: sample_value for (name, labels), sample_value in samples.items() if not labels}
    assert value["process_resident_memory_bytes"] > 1024 * 1024
    assert value["process_max_fds"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert 0 < value["process_open_fds"] <= value["process_max_fds"]
    assert value["process_cpu_seconds_total"] > 0
    assert value["process_start_time_seconds"] > 0
    python = [dict(labels) for name, labels in samples if name == "python_info"]
    assert python and python[0]["implementation"] == "CPython"


def test_a_worker_value_file_not_yet_sized_is_left_out_of_the_host_totals(tmp_path, monkeypatch):
    """A worker that is starting has created its value file but not sized it yet: the
    scrape still answers, with every other worker's values (it used to raise struct.error,
    a 500 from /metrics whenever the supervisor started a worker)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    from wsgateway.metrics import GatewayMetrics

    running = MmapedDict(str(tmp_path / "counter_101.db"))
    running.write_value(mmap_key("ws_published_total", "ws_published_total", [], [], "published"), 7.0, 0.0)
    running.close()
    (tmp_path / "gauge_livesum_102.db").touch()  # the starting worker's, 0 bytes
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))

    text = GatewayMetrics(CollectorRegistry()).exposition().decode()

    assert "ws_published_total 7.0" in text
