"""A stream whose client vanishes without a word (its host gone from the network), run as
`python -m tests.support.vanishing_client` inside a network namespace of its own (`unshare
--net`): the gateway and the client share the namespace's loopback, which the scenario takes
down once the stream is open. Prints one JSON line: how the stream ended and how long after."""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from tests.support import wait_for  # noqa: E402
from tests.support.event_streams import open_stream  # noqa: E402
from tests.support.gateways import GatewayUnderTest, gateway_config  # noqa: E402

PING_PERIOD_S, PONG_WAIT_S = 0.2, 1.0


def main() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.TemporaryDirectory() as directory:
        config = gateway_config(f"sqlite:///{Path(directory) / 'tokens.db'}", "-log-level", "warning",
                                "-ping-period", f"{int(PING_PERIOD_S * 1000)}ms",
                                "-pong-wait", f"{int(PONG_WAIT_S * 1000)}ms")
        gateway = GatewayUnderTest.start(config)
        open_stream(gateway, gateway.tokens.player(21))
        subprocess.run(["ip", "link", "set", "lo", "down"], check=True)  # no byte is acknowledged from now on
        vanished = time.monotonic()
        wait_for(lambda: gateway.gateway.hub.connection_count() == 0, timeout_s=30 * PONG_WAIT_S,
                 what="the stream of the vanished client ended")
        codes = {code: gateway.metric("ws_sse_disconnects_total", code=code) for code in ("1006", "4000", "4001")}
        print(json.dumps({"after_s": time.monotonic() - vanished, "codes": codes,
                          "pong_wait_s": PONG_WAIT_S, "ping_period_s": PING_PERIOD_S}))
        gateway.gateway.shutdown(timeout_s=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
