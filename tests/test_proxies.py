"""-trusted-proxies: the client address from X-Forwarded-For, believed only from listed peers; then in a real gateway."""
from __future__ import annotations

import logging
import socket

import pytest

from tests.support import wait_for
from wsgateway.config import ConfigError, load, parse_networks
from wsgateway.proxies import MAX_HOPS, TrustedProxies


def proxies(text: str) -> TrustedProxies:
    return TrustedProxies(parse_networks(text))


@pytest.mark.parametrize("trusted, peer, forwarded_for, client", [
    ("", "10.0.0.5", "203.0.113.9", "10.0.0.5"),  # nobody trusted: the header is ignored
    ("10.0.0.5", "10.0.0.5", None, "10.0.0.5"),  # a trusted peer without the header is the client
    ("10.0.0.5", "10.0.0.5", "203.0.113.9", "203.0.113.9"),
    ("10.0.0.5", "10.0.0.6", "203.0.113.9", "10.0.0.6"),  # an untrusted peer's header proves nothing
    ("10.0.0.5", "127.0.0.1", "203.0.113.9", "127.0.0.1"),  # loopback is not trusted unless listed
    ("127.0.0.1", "127.0.0.1", "203.0.113.9", "203.0.113.9"),
    ("10.0.0.0/8", "10.1.2.3", "198.51.100.7, 10.9.9.9", "198.51.100.7"),  # trusted hops are skipped
    ("10.0.0.0/8", "10.1.2.3", "1.1.1.1, 198.51.100.7, 10.9.9.9", "198.51.100.7"),  # right-most untrusted wins
    ("10.0.0.0/8", "10.1.2.3", "forged, 198.51.100.7", "198.51.100.7"),  # what the client wrote is never read
    ("10.0.0.0/8", "10.1.2.3", "198.51.100.7, not-an-address", "10.1.2.3"),  # malformed: the nearest trusted
    ("10.0.0.0/8", "10.1.2.3", "198.51.100.7, 203.0.113.1:8080", "10.1.2.3"),  # a port makes it malformed
    ("10.0.0.0/8", "10.1.2.3", "", "10.1.2.3"),
    ("10.0.0.0/8", "10.1.2.3", "10.7.7.7, 10.8.8.8", "10.7.7.7"),  # all trusted: the left-most of them
    ("10.0.0.0/8", "::ffff:10.1.2.3", "198.51.100.7", "198.51.100.7"),  # IPv4-mapped peer (dual-stack socket)
    ("::1, fd00::/8", "::1", "2001:db8::1, fd00::2", "2001:db8::1"),
    ("::1", "::1", "2001:DB8:0:0::1", "2001:db8::1"),  # canonical form for per-address limits
    ("10.0.0.5", "", "203.0.113.9", ""),  # no peer address (a UNIX socket): nothing to trust
])
def test_client_address(trusted, peer, forwarded_for, client):
    """The client is the peer unless it is trusted; then the right-most untrusted X-Forwarded-For entry."""
    assert proxies(trusted).client_address(peer, forwarded_for) == client


def test_a_long_chain_is_read_only_so_far():
    """A header of thousands of trusted hops costs at most MAX_HOPS lookups; the last one read is taken."""
    chain = ", ".join(["203.0.113.9"] + [f"10.0.{index // 250}.{index % 250}" for index in range(5000)])
    assert proxies("10.0.0.0/8").client_address("10.1.2.3", chain) == f"10.0.{(5000 - MAX_HOPS) // 250}." \
        f"{(5000 - MAX_HOPS) % 250}"


def test_parse_networks():
    """Addresses and CIDRs, spaces and empty entries allowed; host bits in a CIDR are tolerated."""
    assert [str(network) for network in parse_networks(" 10.0.0.1, 192.168.1.7/24,,::1 ")] == [
        "10.0.0.1/32", "192.168.1.0/24", "::1/128"]
    assert parse_networks("") == ()


@pytest.mark.parametrize("value, shown", [("10.0.0.300", "'10.0.0.300'"), ("localhost", "'localhost'"),
                                          ("10.0.0.0/33", "'10.0.0.0/33'")])
def test_a_bad_entry_is_refused_naming_it(value, shown):
    """-trusted-proxies with an entry that is no address or CIDR is refused with one line naming the flag and entry."""
    with pytest.raises(ConfigError) as refused:
        load(["-trusted-proxies", f"127.0.0.1,{value}"], env={})
    assert str(refused.value).startswith(f"-trusted-proxies: {shown} is not an IP address or CIDR")


# --- in a gateway --------------------------------------------------------------------------------------------
def remotes(caplog, event: str) -> list[str]:
    return [record.remote for record in caplog.records if getattr(record, "event", "") == event]


@pytest.mark.parametrize("flags, logged", [((), "127.0.0.1"), (("-trusted-proxies", "127.0.0.1"), "203.0.113.9")])
def test_logs_show_the_client_behind_a_trusted_proxy_only(start_gateway, caplog, flags, logged):
    """Request and connection logs show X-Forwarded-For's client only when the peer is listed; else the peer."""
    gateway = start_gateway(*flags)
    token = gateway.tokens.player(21)
    forwarded = {"X-Forwarded-For": "198.51.100.1, 203.0.113.9"}
    with caplog.at_level(logging.INFO, logger="wsgateway"):
        assert gateway.request("GET", "/nothing-here", headers=forwarded).status == 404
        assert gateway.post("/publish", {"player_id": 21, "event": "e"}, token="no-such-token",
                            headers=forwarded).status == 403  # the direct path (2xx are logged at debug only)
        client = gateway.connect(token, header=[f"X-Forwarded-For: {forwarded['X-Forwarded-For']}"])
        client.close()
        wait_for(lambda: remotes(caplog, "ws_disconnected"), what="the disconnect logged")
    assert remotes(caplog, "http_request") == [logged, logged]
    assert remotes(caplog, "ws_connected") == remotes(caplog, "ws_disconnected") == [logged]


def test_a_malformed_request_after_a_forwarded_one_shows_the_peer(start_gateway, caplog):
    """On a kept-alive connection, a malformed request is logged with the peer, not the previous client."""
    gateway = start_gateway("-trusted-proxies", "127.0.0.1")
    sock = socket.create_connection((gateway.host, gateway.port))
    with caplog.at_level(logging.INFO, logger="wsgateway"):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: g\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n")
        assert b"200 OK" in sock.recv(4096)
        sock.sendall(b"NOT A REQUEST LINE AT ALL\r\n\r\n")
        assert b"400" in sock.recv(4096)
    sock.close()
    assert remotes(caplog, "bad_request") == ["127.0.0.1"]
