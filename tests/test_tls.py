"""-tls-cert / -tls-key: https:// and wss:// served directly, with a certificate made by the test
and clients that verify it against its CA; refused TLS settings."""
from __future__ import annotations

import http.client
import logging
import socket
import ssl

import gevent
import pytest
import websocket

from tests.certificates import TlsFiles, make_tls_files
from tests.support import TIMEOUT_S, wait_for
from tests.support.clients import receive_close, receive_event
from tests.support.event_streams import EventStreamClient
from tests.support.gateways import GatewayUnderTest
from tests.support.processes import run_gateway_cli
from wsgateway.client import GatewayClient, GatewayError
from wsgateway.protocol import event_frame


@pytest.fixture
def tls_files(tmp_path) -> TlsFiles:
    return make_tls_files(tmp_path)


@pytest.fixture
def tls_gateway(start_gateway, tls_files) -> GatewayUnderTest:
    return start_gateway("-tls-cert", str(tls_files.cert), "-tls-key", str(tls_files.key))


def trusting(tls_files: TlsFiles) -> ssl.SSLContext:
    """A client context that trusts only the test's CA, and checks the host name."""
    return ssl.create_default_context(cafile=str(tls_files.ca_cert))


def wss_connect(gateway: GatewayUnderTest, tls_files: TlsFiles, token: str) -> websocket.WebSocket:
    before = gateway.gateway.hub.connection_count()
    client = websocket.create_connection(f"wss://localhost:{gateway.port}/ws?token={token}", timeout=TIMEOUT_S,
                                         sslopt={"context": trusting(tls_files)})
    gateway.clients.append(client)
    wait_for(lambda: gateway.gateway.hub.connection_count() > before, what="wss connection registered")
    return client


def test_https_and_wss_carry_events_with_a_verified_certificate(tls_gateway, tls_files):
    """With -tls-cert/-tls-key, a CA-verifying client publishes over https and a player receives over wss."""
    assert tls_gateway.gateway.scheme == "https"
    client = wss_connect(tls_gateway, tls_files, tls_gateway.tokens.player(21))
    publisher = GatewayClient(f"https://localhost:{tls_gateway.port}", tls_gateway.tokens.server(),
                              ssl_context=trusting(tls_files))
    result = publisher.publish(21, "secure", {"over": "tls"})
    assert (result.delivered, result.queued) == (1, False)
    assert receive_event(client) == {"event": "secure", "payload": {"over": "tls"}}
    assert publisher.broadcast("everyone") == 1
    assert receive_event(client) == {"event": "everyone", "payload": None}


def test_large_and_many_frames_arrive_intact_over_wss(tls_gateway, tls_files):
    """Over TLS every frame goes through the socket's writer: a 512 KiB event and a burst of 300 arrive whole."""
    client = wss_connect(tls_gateway, tls_files, tls_gateway.tokens.player(21))
    publisher = GatewayClient(f"https://localhost:{tls_gateway.port}", tls_gateway.tokens.server(),
                              ssl_context=trusting(tls_files))
    big = "x" * (512 * 1024)
    publisher.publish(21, "big", big)
    for number in range(300):
        tls_gateway.gateway.delivery.publish("21", event_frame("n", number))
    assert receive_event(client) == {"event": "big", "payload": big}
    assert [receive_event(client)["payload"] for _ in range(300)] == list(range(300))


def test_shutdown_closes_wss_sockets_with_1001(tls_gateway, tls_files):
    """Shutdown sends the 1001 close frame through TLS, readable by the client."""
    client = wss_connect(tls_gateway, tls_files, tls_gateway.tokens.player(21))
    stopper = gevent.spawn(tls_gateway.gateway.shutdown, TIMEOUT_S)
    assert receive_close(client) == (1001, "server shutting down")
    client.send_close(1001)  # answer the close, so shutdown need not wait for its handshake timeout
    stopper.join(TIMEOUT_S)
    assert stopper.successful() and tls_gateway.gateway.hub.connection_count() == 0


def test_an_event_stream_over_https_carries_events_and_ends_with_gateway_close(tls_gateway, tls_files):
    """Over TLS a stream's bytes all go through its writer: the head, a 512 KiB event, a burst, and at the
    operator's disconnect gateway.close 4002 and the end of the response, drained before it."""
    gateway = tls_gateway
    stream = EventStreamClient("localhost", gateway.port, f"?token={gateway.tokens.player(21)}",
                               tls=trusting(tls_files))
    gateway.clients.append(stream)
    assert stream.status == 200 and stream.headers["content-type"] == "text/event-stream"
    assert stream.next_block().get("retry") is not None
    wait_for(lambda: gateway.gateway.hub.connection_count() == 1, what="stream over TLS registered")
    big = "x" * (512 * 1024)
    gateway.gateway.delivery.publish("21", event_frame("big", big))
    for number in range(300):
        gateway.gateway.delivery.publish("21", event_frame("n", number))
    operator = GatewayClient(f"https://localhost:{gateway.port}", gateway.tokens.server(),
                             ssl_context=trusting(tls_files))
    assert operator.disconnect(21) == 1
    blocks = [stream.next_block() for _ in range(301)]
    assert blocks[0].data == big and [block.data for block in blocks[1:]] == list(range(300))
    (last,) = stream.blocks_until_closed()
    assert (last.event, last.data) == ("gateway.close", {"code": 4002, "reason": "disconnected by the server"})


def test_plain_http_to_a_tls_port_fails_without_harming_the_gateway(tls_gateway, tls_files, caplog):
    """A plain-HTTP client and a client that does not trust the certificate fail, each logged as one
    tls_handshake_failed line; the gateway keeps serving."""
    caplog.set_level(logging.INFO, logger="wsgateway.web_server")
    plain = http.client.HTTPConnection("127.0.0.1", tls_gateway.port, timeout=TIMEOUT_S)
    with pytest.raises((http.client.HTTPException, OSError)):
        plain.request("GET", "/healthz")
        plain.getresponse()
    plain.close()
    untrusting = GatewayClient(f"https://localhost:{tls_gateway.port}", "token", retries=0)
    with pytest.raises(GatewayError, match="not trusted"):
        untrusting.publish(21, "e")
    secure = http.client.HTTPSConnection("localhost", tls_gateway.port, timeout=TIMEOUT_S,
                                         context=trusting(tls_files))
    secure.request("GET", "/healthz")
    assert secure.getresponse().status == 200
    secure.close()
    def failures() -> list[logging.LogRecord]:
        return [record for record in caplog.records if getattr(record, "event", "") == "tls_handshake_failed"]
    wait_for(lambda: len(failures()) == 2, what="two tls_handshake_failed log records")
    assert all(record.exc_info is None for record in failures())


@pytest.mark.parametrize("given, named", [
    (["-tls-cert", "CERT"], "-tls-key"),
    (["-tls-key", "KEY"], "-tls-cert"),
    (["-tls-cert", "/nonexistent/cert.pem", "-tls-key", "KEY"], "-tls-cert"),
    (["-tls-cert", "CERT", "-tls-key", "/nonexistent/key.pem"], "-tls-key"),
    (["-tls-cert", "KEY", "-tls-key", "KEY"], "-tls-cert"),  # a key where the certificate belongs
    (["-tls-cert", "CA", "-tls-key", "KEY"], "-tls-key"),  # a certificate the key does not match
], ids=["cert-only", "key-only", "cert-missing", "key-missing", "not-a-certificate", "key-mismatch"])
def test_unusable_tls_settings_exit_2_naming_the_flag(tmp_path, tls_files, given, named):
    """Only one of the TLS flags, a file that cannot be read, or a key that does not fit: exit 2, one line naming it."""
    paths = {"CERT": str(tls_files.cert), "KEY": str(tls_files.key), "CA": str(tls_files.ca_cert)}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_gateway_cli("-addr", f"127.0.0.1:{port}", "-dsn", f"file:{tmp_path / 'tokens.db'}",
                             *[paths.get(word, word) for word in given], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"ws-gateway: {named}:"), lines[0]
