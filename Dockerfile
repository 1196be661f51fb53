# syntax=docker/dockerfile:1
# The atproto-backfill application image: one image, every process is `backfill <command>`.
#
#   docker build -t atproto-backfill .
#   docker run --rm atproto-backfill jetstream --help
#
# No public registry publishes it. For Kubernetes, push it where the cluster pulls from, tagged with
# the version (the Helm chart's default tag is its appVersion, the same as VERSION below):
#
#   docker build -t registry.example.net/atproto-backfill:0.1.0 . && docker push registry.example.net/atproto-backfill:0.1.0
#   helm install backfill helm/atproto-backfill --set image.repository=registry.example.net/atproto-backfill
#
# Runs as an unprivileged user (uid/gid 10001) and works with a read-only root filesystem: the only
# writable paths it needs are /tmp (tmpfs), /cache (downloaded Jetstream zstd dictionary) and /data
# (the durable SQLite queues of `backfill consume queue`).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# A C compiler and OpenSSL's headers build the native fast path of repository decoding
# (runtime/atproto/_fastrepo.c); the final image only needs libcrypto, which the base image has.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY runtime ./runtime
COPY producers ./producers
COPY consumers ./consumers
# A regular (non-editable) install: the image needs no source tree at run time.
RUN /opt/venv/bin/pip install . \
 && /opt/venv/bin/python -c "import runtime.atproto._fastrepo, runtime.contract._avrowire, runtime.contract._keyhash, producers.jetstream._fastevent" \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM ${PYTHON_IMAGE}
# The project's version (pyproject.toml) and the chart's appVersion: the image tag the chart expects.
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="atproto-backfill" \
      org.opencontainers.image.description="Backfill AT Protocol (Bluesky) data through Avro-typed Kafka topics" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"
RUN groupadd --system --gid 10001 backfill \
 && useradd --system --uid 10001 --gid backfill --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin backfill \
 && mkdir -p /data /cache \
 && chown 10001:10001 /data /cache
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    XDG_DATA_HOME=/data \
    BACKFILL_QUEUE_PATH=/data/queues.sqlite
USER 10001:10001
WORKDIR /tmp
# Metrics, /healthz and /readyz when BACKFILL_METRICS_PORT=9100 (compose and the Helm chart set it).
EXPOSE 9100
ENTRYPOINT ["backfill"]
CMD ["--help"]
