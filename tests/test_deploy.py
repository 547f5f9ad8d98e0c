"""Deployment files in etc/ and the Dockerfile, checked against the real gateway: the Grafana
dashboard's metrics exist on /metrics, the systemd unit and nginx site agree with the gateway's
timeouts, the nginx site proxies wss:// and publishing for real, and the Dockerfile uses real
settings and CI's own commands."""
from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
from pathlib import Path

import pytest
import websocket
from prometheus_client.parser import text_string_to_metric_families

from tests.certificates import make_tls_files
from tests.helpers import TIMEOUT_S, free_port, receive_event, wait_for
from wsgateway.client import GatewayClient
from wsgateway.config import FLAGS, load, parse_duration

PROJECT = Path(__file__).resolve().parent.parent
ETC = PROJECT / "etc"
NGINX_UNPACKED = PROJECT / "tests" / ".tools" / "nginx" / "usr" / "sbin" / "nginx"
TOOLS_REQUIRED = os.environ.get("WS_GATEWAY_TEST_TOOLS") == "required"
DEFAULTS = load([], env={})
TARGET_LABELS = {"instance", "job"}  # added by Prometheus, not by the gateway


# --- Grafana dashboard ---------------------------------------------------------------------------
def dashboard_queries() -> list[str]:
    dashboard = json.loads((ETC / "grafana-dashboard.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    return queries


def exercised_metrics(gateway) -> dict[str, set[str]]:
    """Sample name -> label names, from /metrics after traffic that gives every labelled metric a sample."""
    tokens = gateway.tokens
    server = tokens.server()
    client = gateway.connect(tokens.player(21))
    gateway.publish(server, 21, "e")
    receive_event(client)
    gateway.publish(server, 99, "queued")
    gateway.publish(server, 99, "drops the first")  # -max-queued 1: offline_queue_full
    gateway.publish("unknown-token", 21, "e")  # auth failure
    gateway.refused("?token=unknown")  # connection rejected
    client.close()
    wait_for(lambda: gateway.metric("ws_disconnects_total", code="1000"), what="disconnect counted")
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(gateway.get("/metrics").body.decode()):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def test_every_dashboard_metric_and_label_exists_on_a_running_gateway(start_gateway):
    """Each metric a dashboard query uses is exported by a running gateway, with the labels the query groups by."""
    exported = exercised_metrics(start_gateway("-max-queued", "1"))
    used: set[str] = set()
    for query in dashboard_queries():
        names = set(re.findall(r"\bws_[a-z_]+\b", query))
        assert names, query
        used |= names
        for name in names:
            assert name in exported, f"{name} (in {query!r}) is not on /metrics"
        grouped = {label.strip() for group in re.findall(r"by \(([^)]*)\)", query) for label in group.split(",")}
        selected = set(re.findall(r"(\w+)\s*=~?", query.split("{", 1)[1])) if "{" in query else set()
        for label in (grouped | selected) - TARGET_LABELS:
            assert any(label in exported[name] for name in names), f"label {label!r} of {query!r} exists on none"
    families = {name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for name in exported}
    shown = {name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for name in used}
    assert families == shown, f"metrics without a dashboard panel: {sorted(families - shown)}"


# --- systemd unit -------------------------------------------------------------------------------------
def test_systemd_unit_runs_the_gateway_and_outlasts_its_shutdown():
    """The unit starts bin/ws-gateway -c /etc/ws-gateway/gateway.ini, raises the fd limit, and waits past the drain."""
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((ETC / "ws-gateway.service").read_text())
    service = unit["Service"]
    assert service["ExecStart"].endswith("bin/ws-gateway -c /etc/ws-gateway/gateway.ini")
    assert int(service["LimitNOFILE"]) >= 65536
    assert (service["KillSignal"], service["Restart"]) == ("SIGTERM", "on-failure")
    assert service["RestartPreventExitStatus"] == "2"  # a refused setting is not retried in a loop
    assert parse_duration(service["TimeoutStopSec"]) > DEFAULTS.shutdown_timeout_s
    assert unit["Install"]["WantedBy"] == "multi-user.target"


# --- nginx site ------------------------------------------------------------------------------------------
def test_nginx_site_timeouts_outlast_the_gateways_keepalive():
    """The nginx site upgrades /ws over HTTP/1.1 and waits longer than -ping-period and -pong-wait."""
    site = (ETC / "nginx-ws-gateway.conf").read_text()
    websocket_location = site.split("location = /ws {", 1)[1].split("}", 1)[0]
    assert "proxy_http_version 1.1;" in websocket_location
    assert "proxy_set_header Upgrade $http_upgrade;" in websocket_location
    assert "proxy_set_header Connection $ws_gateway_connection;" in websocket_location
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        timeout_s = parse_duration(re.search(rf"{directive} (\w+);", websocket_location).group(1))
        assert timeout_s > DEFAULTS.pong_wait_s > DEFAULTS.ping_period_s
    assert re.search(r"client_max_body_size 1m;", site) and DEFAULTS.max_body_bytes == 1024 * 1024


def nginx_binary() -> str | None:
    if NGINX_UNPACKED.exists():
        return str(NGINX_UNPACKED)
    return shutil.which("nginx")


def substituted(text: str, replacements: list[tuple[str, str]]) -> str:
    """`text` with each (old, new) replaced; every old must occur, so a reshaped file fails loudly."""
    for old, new in replacements:
        assert old in text, f"etc/nginx-ws-gateway.conf no longer contains {old!r}"
        text = text.replace(old, new)
    return text


@pytest.fixture
def nginx_in_front(start_gateway, tmp_path):
    """etc/nginx-ws-gateway.conf run by a real nginx in front of a gateway, on free ports and test certificates."""
    binary = nginx_binary()
    if binary is None:
        reason = "nginx is not available (`make install-test-tools` unpacks it under tests/.tools)"
        if TOOLS_REQUIRED:
            pytest.fail(f"required here but cannot run: {reason}")
        pytest.skip(reason)
    gateway = start_gateway()
    tls = make_tls_files(tmp_path)
    https_port, http_port = free_port(), free_port()
    site = substituted((ETC / "nginx-ws-gateway.conf").read_text(), [
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{gateway.port};"),
        ("    listen 443 ssl;\n    listen [::]:443 ssl;\n", f"    listen 127.0.0.1:{https_port} ssl;\n"),
        ("    listen 80;\n    listen [::]:80;\n", f"    listen 127.0.0.1:{http_port};\n"),
        ("/etc/letsencrypt/live/ws.example.org/fullchain.pem", str(tls.cert)),
        ("/etc/letsencrypt/live/ws.example.org/privkey.pem", str(tls.key)),
        ("/var/log/nginx/ws-gateway.access.log", str(tmp_path / "access.log")),
    ])
    (tmp_path / "site.conf").write_text(site)
    temp_paths = "".join(f"{kind}_temp_path {tmp_path / kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp_path / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\nworker_processes 1;\npid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'};\n"
        + "events { worker_connections 256; }\n"
        + f"http {{\naccess_log off;\n{temp_paths}include {tmp_path / 'site.conf'};\n}}\n")
    process = subprocess.Popen([binary, "-e", str(tmp_path / "error.log"), "-p", str(tmp_path),
                                "-c", str(tmp_path / "nginx.conf")],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    trust = ssl.create_default_context(cafile=str(tls.ca_cert))

    def answering() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"nginx exited: {process.stderr.read()} {(tmp_path / 'error.log').read_text()}")
        try:
            import http.client
            connection = http.client.HTTPSConnection("localhost", https_port, timeout=TIMEOUT_S, context=trust)
            connection.request("GET", "/healthz")
            return connection.getresponse().status == 200
        except OSError:
            return False
    try:
        wait_for(answering, 3 * TIMEOUT_S, what="nginx answering /healthz")
        yield gateway, https_port, http_port, trust, tmp_path / "access.log"
    finally:
        process.send_signal(signal.SIGQUIT)  # graceful: lets the open WebSocket end
        try:
            process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=TIMEOUT_S)


def test_nginx_site_terminates_tls_for_wss_and_publishing(nginx_in_front):
    """Through the nginx site: wss:// upgrades, https publishing delivers, http redirects, /metrics is hidden,
    and the access log never holds the player's token."""
    import http.client
    gateway, https_port, http_port, trust, access_log = nginx_in_front
    player_token = gateway.tokens.player(21)
    client = websocket.create_connection(f"wss://localhost:{https_port}/ws?token={player_token}",
                                         timeout=TIMEOUT_S, sslopt={"context": trust})
    gateway.clients.append(client)
    wait_for(lambda: gateway.gateway.hub.connection_count() == 1, what="connection through nginx")
    publisher = GatewayClient(f"https://localhost:{https_port}", gateway.tokens.server(), ssl_context=trust)
    assert publisher.publish(21, "via-nginx", {"tls": "terminated"}).delivered == 1
    assert receive_event(client) == {"event": "via-nginx", "payload": {"tls": "terminated"}}
    client.close()

    plain = http.client.HTTPConnection("127.0.0.1", http_port, timeout=TIMEOUT_S)
    plain.request("GET", "/healthz", headers={"Host": "ws.example.org"})
    redirect = plain.getresponse()
    assert (redirect.status, redirect.getheader("Location")) == (301, "https://ws.example.org/healthz")
    hidden = http.client.HTTPSConnection("localhost", https_port, timeout=TIMEOUT_S, context=trust)
    hidden.request("GET", "/metrics")
    assert hidden.getresponse().status == 404

    wait_for(lambda: "GET /ws " in access_log.read_text(), what="the /ws line in nginx's access log")
    assert player_token not in access_log.read_text()


# --- Prometheus and Docker ---------------------------------------------------------------------------------
def test_prometheus_example_scrapes_the_gateways_metrics_path():
    """The scrape example targets the gateway's /metrics on its default address."""
    scrape = (ETC / "prometheus.yml").read_text()
    assert "job_name: ws-gateway" in scrape and "metrics_path: /metrics" in scrape
    assert f"127.0.0.1:{DEFAULTS.listen_port}" in scrape


def test_dockerfile_uses_ci_commands_and_real_settings():
    """The Dockerfile installs with `make install`, starts bin/ws-gateway, and sets only real WS_GATEWAY_* settings."""
    dockerfile = (PROJECT / "Dockerfile").read_text()
    assert re.search(r"^RUN make install$", dockerfile, re.MULTILINE)
    assert 'ENTRYPOINT ["/opt/ws-gateway/bin/ws-gateway"]' in dockerfile
    settings = {f"WS_GATEWAY_{flag.name.upper().replace('-', '_')}" for flag in FLAGS}
    instructions = dockerfile.replace("\\\n", " ").splitlines()
    environment = dict(pair.split("=", 1) for line in instructions if line.startswith("ENV ")
                       for pair in line.split()[1:])
    assert environment and set(environment) <= settings
    assert load([], env=environment).listen_port == 8080
    makefile = (PROJECT / "Makefile").read_text()
    assert re.search(r"^test: install-test$", makefile, re.MULTILINE)
    assert re.search(r"^install-test: \$\(VENV\)/\.installed-test$", makefile, re.MULTILINE)
    assert re.search(r"^\$\(VENV\)/\.installed-test: \$\(VENV\)/\.installed ", makefile, re.MULTILINE)
