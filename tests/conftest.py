"""Fixtures: real gateways on port 0 (sqlite and MariaDB), always shut down.

gevent patches the standard library first, so the in-process gateway and the test's
own blocking clients (websocket-client, http.client) share one cooperative event loop.
"""
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import uuid  # noqa: E402
from typing import Callable, Iterator  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from tests.support import TIMEOUT_S  # noqa: E402
from tests.support.gateways import GatewayUnderTest, TokenTable, gateway_config  # noqa: E402
from tests.support.redis_cluster import RedisCluster  # noqa: E402
from tests.support.redis_server import REDIS_URL, RedisServer  # noqa: E402

# Property-based tests: the same examples on every run (derandomized, no example database),
# few enough for CI; WS_GATEWAY_HYPOTHESIS_EXAMPLES raises the count for a deeper search, and
# `--hypothesis-profile ws-gateway-explore` draws new examples on every run.
_EXAMPLES = int(os.environ.get("WS_GATEWAY_HYPOTHESIS_EXAMPLES", "150"))
settings.register_profile("ws-gateway", derandomize=True, database=None, deadline=None, print_blob=True,
                          max_examples=_EXAMPLES)
settings.register_profile("ws-gateway-explore", database=None, deadline=None, print_blob=True,
                          max_examples=_EXAMPLES)
settings.load_profile("ws-gateway")

MYSQL_SERVER_URL = os.environ.get("WS_GATEWAY_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306")


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'ws_tokens.db'}"


@pytest.fixture(scope="session")
def mysql_url() -> Iterator[str]:
    """A fresh MariaDB database for this test run, dropped at the end."""
    name = f"wsgw_test_{uuid.uuid4().hex[:10]}"
    server = create_engine(MYSQL_SERVER_URL, isolation_level="AUTOCOMMIT")
    try:
        with server.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}"))
    except Exception as exc:  # noqa: BLE001 - reported as the reason the MySQL tests cannot run
        pytest.fail(f"MariaDB at {MYSQL_SERVER_URL} is required for the MySQL tests: {exc}")
    try:
        yield f"{MYSQL_SERVER_URL}/{name}"
    finally:
        with server.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        server.dispose()


@pytest.fixture(params=["sqlite", "mysql"])
def any_database_url(request) -> str:
    """Each test using this runs once on sqlite and once on MariaDB."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    url = request.getfixturevalue("mysql_url")
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS ws_token"))
    engine.dispose()
    return url


@pytest.fixture
def start_gateway(sqlite_url) -> Iterator[Callable[..., GatewayUnderTest]]:
    """Start gateways with `-flag value` style overrides; all are shut down afterwards."""
    started: list[GatewayUnderTest] = []

    def start(*flags: str, database_url: str | None = None) -> GatewayUnderTest:
        config = gateway_config(database_url or sqlite_url, *flags)
        gateway = GatewayUnderTest.start(config)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def gateway(start_gateway) -> GatewayUnderTest:
    """A gateway with default settings on a fresh sqlite file, with tokens at hand."""
    return start_gateway()


@pytest.fixture
def tokens(gateway) -> TokenTable:
    return gateway.tokens


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix no other test uses on the shared Redis; its keys are deleted afterwards."""
    import redis

    prefix = f"wsgw-test-{uuid.uuid4().hex[:10]}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[RedisCluster]:
    """A Redis Cluster of this test run's own (three masters, one replica each), started
    once for the session: tests on it keep apart by key prefix, and none may kill its nodes
    (a failover test starts a cluster of its own)."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["server", "cluster"])
def redis_url(request) -> str:
    """Each test using this runs once on the shared single Redis and once on the session's
    Redis Cluster (`redis+cluster://`); with `redis_prefix`, under a prefix of its own."""
    if request.param == "server":
        return REDIS_URL
    return request.getfixturevalue("redis_cluster").url


@pytest.fixture
def private_redis(tmp_path) -> Iterator[RedisServer]:
    """A running redis-server of this test's own, that the test may stop and restart."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def start_cluster_gateway(start_gateway, redis_prefix) -> Callable[..., GatewayUnderTest]:
    """Start in-process gateways on the shared Redis (one cluster per test) and one sqlite file."""
    def start(*flags: str, broker_url: str = REDIS_URL) -> GatewayUnderTest:
        return start_gateway("-broker", broker_url, "-broker-prefix", redis_prefix, *flags)
    return start


@pytest.fixture
def server_token(tokens) -> str:
    return tokens.server()


@pytest.fixture
def listener(gateway, tokens):
    """Player 21, connected: any message wrongly delivered to it shows up before a marker."""
    return gateway.connect(tokens.player(21))


def pytest_report_header() -> str:
    return f"ws-gateway tests: timeout unit {TIMEOUT_S}s"
