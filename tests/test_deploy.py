"""Deployment files in etc/ and the Dockerfile, checked against the real gateway: the Grafana
dashboard's metrics exist on /metrics, the systemd unit and nginx site agree with the gateway's
timeouts, systemd's own tools rate the unit and create its user, the nginx site proxies wss://
and publishing for real and logs no token (also with the gateway down), and the Dockerfile uses
real settings, CI's own commands and a health check that finds the gateway however it was set up."""
from __future__ import annotations

import configparser
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import websocket
from prometheus_client.parser import text_string_to_metric_families

from tests.certificates import make_tls_files
from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import receive_event
from tests.support.event_streams import EventStreamClient
from tests.support.processes import GATEWAY_BIN, PROCESS_START_TIMEOUT_S, free_port, gateway_environment
from wsgateway.client import GatewayClient, Unavailable
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
    """Each metric a dashboard query uses is exported by a running gateway, with the labels the query groups by,
    and every metric the gateway exports (its own, process_* and python_info) has a panel."""
    exported = exercised_metrics(start_gateway("-max-queued", "1"))
    used: set[str] = set()
    for query in dashboard_queries():
        names = set(re.findall(r"\b(?:ws|process|python)_[a-z_]+\b", query))  # ours, and the process's
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
def read_unit() -> configparser.ConfigParser:
    """etc/ws-gateway.service by section; of a key given more than once (as systemd allows), the last."""
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((ETC / "ws-gateway.service").read_text())
    return unit


def test_systemd_unit_runs_the_gateway_and_outlasts_its_shutdown():
    """The unit starts bin/ws-gateway -c /etc/ws-gateway/gateway.ini, raises the fd limit, and waits past the drain."""
    unit = read_unit()
    service = unit["Service"]
    assert service["ExecStart"].endswith("bin/ws-gateway -c /etc/ws-gateway/gateway.ini")
    assert int(service["LimitNOFILE"]) >= 65536
    assert (service["KillSignal"], service["Restart"]) == ("SIGTERM", "on-failure")
    assert service["RestartPreventExitStatus"] == "2"  # a refused setting is not retried in a loop
    assert parse_duration(service["TimeoutStopSec"]) > DEFAULTS.shutdown_timeout_s
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def systemd_tool(name: str) -> str:
    """The path of a systemd program (`make install-test-tools` installs Debian's systemd), or a skip."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not available (`make install-test-tools` installs Debian's systemd package)"
        if TOOLS_REQUIRED:
            pytest.fail(f"required here but cannot run: {reason}")
        pytest.skip(reason)
    return path


def test_systemd_unit_is_hardened_to_at_most_2_5():
    """`systemd-analyze security` rates the unit at most 2.5, and its files are private to it (UMask=0077)."""
    unit = read_unit()
    assert unit["Service"]["UMask"] == "0077"
    analyzed = subprocess.run([systemd_tool("systemd-analyze"), "security", "--offline=true", "--no-pager",
                               str(ETC / "ws-gateway.service")], capture_output=True, text=True, timeout=TIMEOUT_S * 6)
    rating = re.search(r"Overall exposure level for ws-gateway\.service: ([0-9.]+)", analyzed.stdout)
    assert rating, analyzed.stdout + analyzed.stderr
    assert float(rating.group(1)) <= 2.5, analyzed.stdout


def test_sysusers_entry_creates_the_units_user(tmp_path):
    """etc/ws-gateway.sysusers, applied by systemd-sysusers to an empty root, creates the unit's User and Group."""
    unit = read_unit()
    service = unit["Service"]
    (tmp_path / "etc" / "sysusers.d").mkdir(parents=True)
    shutil.copy(ETC / "ws-gateway.sysusers", tmp_path / "etc" / "sysusers.d" / "ws-gateway.conf")
    subprocess.run([systemd_tool("systemd-sysusers"), f"--root={tmp_path}"], check=True, capture_output=True,
                   timeout=TIMEOUT_S * 6)
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0] for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    user = users[service["User"]]
    assert service["Group"] in groups
    assert user[5] == f"/var/lib/{service['StateDirectory']}" and user[6] == "/usr/sbin/nologin"


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


def test_nginx_site_streams_events_unbuffered_past_the_keepalive():
    """/events has its own location: unbuffered, uncached, waiting longer than -ping-period and -pong-wait."""
    site = (ETC / "nginx-ws-gateway.conf").read_text()
    events_location = site.split("location = /events {", 1)[1].split("}", 1)[0]
    for directive in ("proxy_http_version 1.1;", "proxy_buffering off;", "proxy_cache off;", " emerg;"):
        assert directive in events_location
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        timeout_s = parse_duration(re.search(rf"{directive} (\w+);", events_location).group(1))
        assert timeout_s > DEFAULTS.pong_wait_s > DEFAULTS.ping_period_s


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


@dataclass
class RunningSite:
    """etc/nginx-ws-gateway.conf running in a real nginx: its ports, the test CA, and every log it writes."""
    https_port: int
    http_port: int
    trust: ssl.SSLContext
    access_log: Path
    logs: list[Path]  # the site's access and error logs, nginx's own error log, and the http-wide access log

    def logged(self) -> str:
        return "".join(log.read_text() for log in self.logs if log.exists())


@contextlib.contextmanager
def nginx_site(tmp_path: Path, upstream_port: int, ready_status: int) -> Iterator[RunningSite]:
    """The site on free ports and test certificates, proxying to 127.0.0.1:`upstream_port`; ready once
    /healthz through it answers `ready_status` (200 with a gateway behind it, 502 without)."""
    binary = nginx_binary()
    if binary is None:
        reason = "nginx is not available (`make install-test-tools` unpacks it under tests/.tools)"
        if TOOLS_REQUIRED:
            pytest.fail(f"required here but cannot run: {reason}")
        pytest.skip(reason)
    tls = make_tls_files(tmp_path)
    https_port, http_port = free_port(), free_port()
    site_access, site_errors = tmp_path / "access.log", tmp_path / "site-error.log"
    site = substituted((ETC / "nginx-ws-gateway.conf").read_text(), [
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream_port};"),
        ("    listen 443 ssl;\n    listen [::]:443 ssl;\n", f"    listen 127.0.0.1:{https_port} ssl;\n"),
        ("    listen 80;\n    listen [::]:80;\n", f"    listen 127.0.0.1:{http_port};\n"),
        ("/etc/letsencrypt/live/ws.example.org/fullchain.pem", str(tls.cert)),
        ("/etc/letsencrypt/live/ws.example.org/privkey.pem", str(tls.key)),
        ("/var/log/nginx/ws-gateway.access.log", str(site_access)),
        ("/var/log/nginx/ws-gateway.error.log", str(site_errors)),
    ])
    (tmp_path / "site.conf").write_text(site)
    temp_paths = "".join(f"{kind}_temp_path {tmp_path / kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # As a distribution's nginx.conf has it: an http-wide access log in the "combined" format,
    # which holds whole request lines, for any server that does not set its own.
    (tmp_path / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\nworker_processes 1;\npid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'};\n"
        + "events { worker_connections 256; }\n"
        + f"http {{\naccess_log {tmp_path / 'default-access.log'} combined;\n{temp_paths}"
        + f"include {tmp_path / 'site.conf'};\n}}\n")
    process = subprocess.Popen([binary, "-e", str(tmp_path / "error.log"), "-p", str(tmp_path),
                                "-c", str(tmp_path / "nginx.conf")],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    running = RunningSite(https_port, http_port, ssl.create_default_context(cafile=str(tls.ca_cert)), site_access,
                          [site_access, site_errors, tmp_path / "error.log", tmp_path / "default-access.log"])

    def answering() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"nginx exited: {process.stderr.read()} {(tmp_path / 'error.log').read_text()}")
        try:
            return https_get(running, "/healthz").status == ready_status
        except OSError:
            return False
    try:
        wait_for(answering, 3 * TIMEOUT_S, what=f"nginx answering /healthz with {ready_status}")
        yield running
    finally:
        process.send_signal(signal.SIGQUIT)  # graceful: lets the open WebSocket end
        try:
            process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=TIMEOUT_S)


def https_get(site: RunningSite, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    connection = http.client.HTTPSConnection("localhost", site.https_port, timeout=TIMEOUT_S, context=site.trust)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


@pytest.fixture
def nginx_in_front(start_gateway, tmp_path):
    """The nginx site in front of a running gateway."""
    gateway = start_gateway()
    with nginx_site(tmp_path, gateway.port, ready_status=200) as site:
        yield gateway, site


def test_nginx_site_terminates_tls_for_wss_and_publishing(nginx_in_front):
    """Through the nginx site: wss:// upgrades, https publishing delivers, http redirects, /metrics is hidden,
    and no log holds the player's token."""
    gateway, site = nginx_in_front
    player_token = gateway.tokens.player(21)
    client = websocket.create_connection(f"wss://localhost:{site.https_port}/ws?token={player_token}",
                                         timeout=TIMEOUT_S, sslopt={"context": site.trust})
    gateway.clients.append(client)
    wait_for(lambda: gateway.gateway.hub.connection_count() == 1, what="connection through nginx")
    publisher = GatewayClient(f"https://localhost:{site.https_port}", gateway.tokens.server(), ssl_context=site.trust)
    assert publisher.publish(21, "via-nginx", {"tls": "terminated"}).delivered == 1
    assert receive_event(client) == {"event": "via-nginx", "payload": {"tls": "terminated"}}
    client.close()

    plain = http.client.HTTPConnection("127.0.0.1", site.http_port, timeout=TIMEOUT_S)
    plain.request("GET", f"/ws?token={player_token}", headers={"Host": "ws.example.org"})
    redirect = plain.getresponse()
    assert (redirect.status, redirect.getheader("Location")) == (301, f"https://ws.example.org/ws?token={player_token}")
    assert https_get(site, "/metrics").status == 404

    wait_for(lambda: "GET /ws " in site.access_log.read_text(), what="the /ws line in nginx's access log")
    assert player_token not in site.logged()


def test_nginx_site_streams_events_as_they_are_published(nginx_in_front):
    """Through the nginx site over https: /events is the gateway's event stream, each event arrives as it is
    published (nothing buffered), and no log holds the player's token."""
    gateway, site = nginx_in_front
    player_token = gateway.tokens.player(21)
    stream = EventStreamClient("localhost", site.https_port, f"?token={player_token}", tls=site.trust)
    gateway.clients.append(stream)
    assert stream.status == 200 and stream.headers["content-type"] == "text/event-stream"
    assert stream.next_block().get("retry") is not None
    wait_for(lambda: gateway.gateway.hub.connection_count() == 1, what="stream through nginx")
    for number in range(3):  # each one read before the next is published: nothing waits in a buffer
        assert gateway.publish(gateway.tokens.server(), 21, "via-nginx", number).status == 200
        block = stream.next_block()
        assert (block.event, block.data) == ("via-nginx", number)
    stream.close()
    wait_for(lambda: "GET /events " in site.access_log.read_text(), what="the /events line in nginx's access log")
    assert player_token not in site.logged()


def test_nginx_site_logs_no_token_while_the_gateway_is_down(tmp_path):
    """With nothing listening behind the site, players and publishers get 502, the site's access log says
    so with the upstream's address, and no log nginx writes holds a token."""
    down_port = free_port()
    player_token, server_token = "PlayerTokenThatMustNotBeLogged", "ServerTokenThatMustNotBeLogged"
    with nginx_site(tmp_path, down_port, ready_status=502) as site:
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(f"wss://localhost:{site.https_port}/ws?token={player_token}",
                                        timeout=TIMEOUT_S, sslopt={"context": site.trust})
        assert refused.value.status_code == 502
        assert https_get(site, f"/ws/?token={player_token}").status == 502  # a mistyped path: location /
        assert https_get(site, f"/ws?%74oken={player_token}").status == 502
        assert https_get(site, f"/events?token={player_token}").status == 502
        publisher = GatewayClient(f"https://localhost:{site.https_port}", server_token, ssl_context=site.trust,
                                  retries=0)
        with pytest.raises(Unavailable):
            publisher.publish(21, "e")
        plain = http.client.HTTPConnection("127.0.0.1", site.http_port, timeout=TIMEOUT_S)
        plain.request("GET", f"/ws?token={player_token}", headers={"Host": "ws.example.org"})
        assert plain.getresponse().status == 301
        wait_for(lambda: site.access_log.read_text().count(f"upstream=127.0.0.1:{down_port} (502)") >= 6,
                 what="each failed request in the access log, with its upstream")
    logged = site.logged()
    assert "GET /ws " in logged and "POST /publish " in logged and "GET /events " in logged
    assert player_token not in logged and server_token not in logged


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
    docker_stop_default_s = 10  # `docker stop` kills after this unless given --stop-timeout
    assert load([], env=environment).shutdown_timeout_s < docker_stop_default_s
    assert re.search(r"^STOPSIGNAL SIGTERM$", dockerfile, re.MULTILINE)
    healthcheck = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", dockerfile.replace("\\\n", " "), re.MULTILINE)
    assert json.loads(healthcheck.group(1)) == ["/opt/ws-gateway/.venv/bin/python",
                                               "/opt/ws-gateway/bin/ws-gateway-healthcheck"]
    makefile = (PROJECT / "Makefile").read_text()
    assert re.search(r"^test: install-test$", makefile, re.MULTILINE)
    assert re.search(r"^install-test: \$\(VENV\)/\.installed-test$", makefile, re.MULTILINE)
    assert re.search(r"^\$\(VENV\)/\.installed-test: \$\(VENV\)/\.installed ", makefile, re.MULTILINE)


# --- the container's health check ------------------------------------------------------------------------------
HEALTHCHECK_BIN = PROJECT / "bin" / "ws-gateway-healthcheck"


def health_of(pid: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK_BIN), str(pid)], capture_output=True, text=True,
                          timeout=PROCESS_START_TIMEOUT_S)


@pytest.fixture
def serving(tmp_path):
    """Start bin/ws-gateway with `args` and `env` from tmp_path/run; wait until `url`/healthz answers."""
    started: list[subprocess.Popen] = []
    (tmp_path / "run").mkdir()

    def start(url: str, *args: str, env: dict[str, str] | None = None,
              context: ssl.SSLContext | None = None) -> subprocess.Popen:
        process = subprocess.Popen([GATEWAY_BIN, "-dsn", f"file:{tmp_path / 'tokens.db'}?cache=shared", *args],
                                   cwd=tmp_path / "run", env=gateway_environment(**(env or {})),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append(process)

        def healthy() -> bool:
            assert process.poll() is None, process.stderr.read()
            try:
                return urllib.request.urlopen(f"{url}/healthz", timeout=TIMEOUT_S, context=context).status == 200
            except OSError:
                return False
        wait_for(healthy, PROCESS_START_TIMEOUT_S, what=f"ws-gateway answering {url}/healthz")
        return process

    yield start
    for process in started:
        process.kill()
        process.wait(timeout=TIMEOUT_S)


def test_healthcheck_follows_addr_from_a_flag_a_variable_or_the_config_file(serving, tmp_path):
    """The health check finds the port wherever -addr was given, and says healthy."""
    by_flag, by_variable, by_file = free_port(), free_port(), free_port()
    (tmp_path / "run" / "gateway.ini").write_text(f"[gateway]\naddr = 127.0.0.1:{by_file}\n")
    processes = [
        serving(f"http://127.0.0.1:{by_flag}", "-addr", f"127.0.0.1:{by_flag}",
                env={"WS_GATEWAY_ADDR": "127.0.0.1:1"}),  # the flag wins, and the check knows it
        serving(f"http://127.0.0.1:{by_variable}", env={"WS_GATEWAY_ADDR": f"127.0.0.1:{by_variable}"}),
        serving(f"http://127.0.0.1:{by_file}", "-c", "gateway.ini"),  # relative to the gateway's directory
    ]
    for process in processes:
        checked = health_of(process.pid)
        assert (checked.returncode, checked.stderr) == (0, "")


def test_healthcheck_speaks_tls_when_the_gateway_does(serving, tmp_path):
    """With -tls-cert the health check asks https:// (plain http to a TLS port would fail it)."""
    tls = make_tls_files(tmp_path)
    port = free_port()
    process = serving(f"https://localhost:{port}", "-addr", f":{port}",
                      env={"WS_GATEWAY_TLS_CERT": str(tls.cert), "WS_GATEWAY_TLS_KEY": str(tls.key)},
                      context=ssl.create_default_context(cafile=str(tls.ca_cert)))
    checked = health_of(process.pid)
    assert (checked.returncode, checked.stderr) == (0, "")


def test_healthcheck_fails_with_one_line_when_nothing_serves(serving):
    """A gateway that stopped answering, or a process that is no gateway, is unhealthy: exit 1, one line."""
    port = free_port()
    process = serving(f"http://127.0.0.1:{port}", "-addr", f"127.0.0.1:{port}")
    process.send_signal(signal.SIGSTOP)  # alive, its port open, but answering nothing
    try:
        stalled = health_of(process.pid)
    finally:
        process.send_signal(signal.SIGCONT)
    assert stalled.returncode == 1
    assert stalled.stderr.startswith(f"ws-gateway-healthcheck: no answer from http://127.0.0.1:{port}/healthz")
    assert stalled.stderr.count("\n") == 1
    stranger = health_of(os.getpid())
    assert stranger.returncode == 1 and "is not bin/ws-gateway" in stranger.stderr
    assert stranger.stderr.count("\n") == 1
