# ws-gateway in a container, configured by WS_GATEWAY_* environment variables
# (every flag: WS_GATEWAY_MAX_CONNS=5, WS_GATEWAY_DB=mysql, WS_GATEWAY_DSN=..., ...).
#
# Not built in CI: these machines have no container engine. It runs only the commands CI
# does run: `make install` (a venv from requirements.txt) and bin/ws-gateway.
#
#   docker build -t ws-gateway .
#   docker run -p 8080:8080 -v ws-data:/var/lib/ws-gateway ws-gateway
#   docker run --rm -v ws-data:/var/lib/ws-gateway ws-gateway token add --player 21 --ttl 24h
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home-dir /var/lib/ws-gateway --create-home ws-gateway

WORKDIR /opt/ws-gateway
COPY Makefile requirements.txt ./
RUN make install
COPY bin/ bin/
COPY wsgateway/ wsgateway/
# The gateway's user cannot write here, so without this every start compiles the package
# again: about 100 ms of CPU before a restarted gateway serves its players' reconnects.
RUN .venv/bin/python -m compileall -q wsgateway

USER ws-gateway
WORKDIR /var/lib/ws-gateway
# SIGTERM drains (players get 1001) within -shutdown-timeout; `docker stop` kills after 10 s
# unless given more, so the image drains in 8 s. A longer drain needs a longer stop timeout:
#   docker run --stop-timeout 40 -e WS_GATEWAY_SHUTDOWN_TIMEOUT=30s ...
ENV WS_GATEWAY_ADDR=:8080 \
    WS_GATEWAY_DSN=file:/var/lib/ws-gateway/ws_tokens.db?cache=shared \
    WS_GATEWAY_SHUTDOWN_TIMEOUT=8s
VOLUME /var/lib/ws-gateway
EXPOSE 8080
STOPSIGNAL SIGTERM
# Asks /healthz where the gateway (PID 1) listens, from its own flags, variables and -c file,
# over https when it serves TLS.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD ["/opt/ws-gateway/.venv/bin/python", "/opt/ws-gateway/bin/ws-gateway-healthcheck"]
ENTRYPOINT ["/opt/ws-gateway/bin/ws-gateway"]
