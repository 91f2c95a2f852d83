# The gateway's container image.
#
#   docker build -t llm-gateway .                      # FROM the official python slim image
#   podman build --build-arg BASE_IMAGE=localhost/gateway-base:bookworm -t llm-gateway .
#   ... --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt   # behind a TLS-intercepting proxy
#
#   docker run --rm -p 9992:9992 llm-gateway --demo    # the demo, in the container
#
# Runs `python gateway.py` as uid 10001, listening on 0.0.0.0:$PORT (9992 when
# PORT is unset). Its state (usage event file, event journal and spool,
# prometheus-client's multi-process files) lives under /var/lib/gateway, a volume.
# SIGTERM: /-/readyz turns 503, open streams get server.drain_timeout_s (30 s)
# to finish, the events are flushed (at most 5 s more), exit 0. Give it a grace
# period of drain_timeout_s + 10 s: docker stop -t 40 (Docker's default 10 s
# cuts a drain short); Kubernetes: terminationGracePeriodSeconds 50 with its
# 5 s preStop pause. deploy/README.md has the rest.

# The official slim image of the Python the project supports (3.11+). Without
# a registry, deploy/base-image.sh builds a stand-in from Debian's packages.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
# The optional build secret `ca_bundle` (a PEM bundle) becomes pip's CA bundle,
# for builds whose outbound TLS passes an intercepting proxy; it is mounted for
# this step only and never stored in a layer. Without it pip uses its own.
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && /opt/venv/bin/pip install -r /tmp/requirements.txt \
 && /opt/venv/bin/python -m pip uninstall -y -q pip setuptools
# The product's code: everything .dockerignore lets through (every top-level
# package and module; not tests/, bench/, docs/, .git, nor the test doubles in
# fakes/ other than the demo's provider). Compiled here, since the non-root
# user cannot write __pycache__ at run time.
COPY . /app/
# Relative paths in the built-in config (conf/gateway.toml) resolve against
# /app: its var/ (var/events.jsonl, var/spool, and var/prometheus for
# `--processes N`) is the state volume. A config file of your own: absolute
# paths under /var/lib/gateway (deploy/kubernetes/gateway.yaml does so).
RUN /opt/venv/bin/python -m compileall -q /app \
 && ln -s /var/lib/gateway /app/var

FROM ${BASE_IMAGE}
# Numeric uid/gid, so that Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/gateway --no-create-home \
      --shell /usr/sbin/nologin gateway \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/gateway
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
# In a container the gateway listens on every interface (the environment wins
# over a config file's `host`). Everything else keeps the config's defaults.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CODY_GATEWAY_HOST=0.0.0.0
WORKDIR /app
VOLUME ["/var/lib/gateway"]
USER 10001:10001
EXPOSE 9992
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/venv/bin/python", "/app/gateway.py"]
CMD []
