# The platform image: every control-plane service, the CLI, the node agent and the simulator.
# One image, many commands (docs/operations.md):
#   crosslogic serve gateway|admin|monitor|billing|notifier|orchestrator
#   crosslogic relay · crosslogic migrate · crosslogic backup · crosslogic nats setup
#   python -m agent · python -m agent.simulator · python -m agent.local_cloud
#
#   docker build -t crosslogic .
#   docker build -t crosslogic --build-arg EXTRAS=skypilot .   # the orchestrator's SkyPilot launcher

ARG EXTRAS=""

FROM python:3.11-slim AS build
ARG EXTRAS
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY services services
COPY agent agent
# Wheels of the project and its dependencies, so the runtime stage needs no build tools.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".${EXTRAS:+[$EXTRAS]}"

FROM python:3.11-slim
ARG EXTRAS
# `crosslogic backup` needs pg_dump from PostgreSQL 16 or later (pg_dump refuses newer
# servers); Debian's own client may be older, so it comes from the PostgreSQL project's repo.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && install -d /usr/share/postgresql-common/pgdg \
    && curl -fsSL -o /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc \
        https://www.postgresql.org/media/keys/ACCC4CF8.asc \
    && . /etc/os-release \
    && echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc] https://apt.postgresql.org/pub/repos/apt ${VERSION_CODENAME}-pgdg main" \
        > /etc/apt/sources.list.d/pgdg.list \
    && apt-get update \
    && apt-get install -y --no-install-recommends postgresql-client-16 \
    && apt-get purge -y curl && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/*

COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels "crosslogic${EXTRAS:+[$EXTRAS]}" \
    && rm -rf /wheels

# A numeric, unprivileged user: Kubernetes' runAsNonRoot can check it without a name lookup.
# nats-auth: where the compose stack's one-shot `nats-auth` writes the NATS authority; a new
# named volume mounted there takes this folder's owner and mode, so the user can write it.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/crosslogic \
        --create-home --shell /usr/sbin/nologin crosslogic \
    && install -d -o 10001 -g 10001 /var/lib/crosslogic/usage-spool /var/lib/crosslogic/backups \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/crosslogic/nats-auth
# Secrets from files (NATS_CREDS_FILE → NATS_CREDS): infra/docker/entrypoint.sh says which.
COPY --chmod=0755 infra/docker/entrypoint.sh /usr/local/bin/crosslogic-entrypoint
WORKDIR /var/lib/crosslogic
USER 10001:10001

# In a container a service listens on every interface (the default is loopback only) and logs
# JSON lines; the usage spool is a folder the user owns (mount a volume on it to keep it).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HTTP_HOST=0.0.0.0 \
    LOG_JSON=true \
    USAGE_SPOOL_DIR=/var/lib/crosslogic/usage-spool

# The services' HTTP ports, and /metrics when METRICS_PORT is set (9090 in the compose stack
# and the Kubernetes manifests; a gateway's worker i on 9090 + i).
EXPOSE 8079 8080 8081 8082 8083 8084 8085 9090

# Liveness of the service this container runs, on its HTTP_PORT (each service's default port
# differs, so the compose file and the manifests set HTTP_PORT). The agent serves no HTTP:
# its containers turn this check off.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('HTTP_PORT', '8080'), timeout=4)"]

ENTRYPOINT ["/usr/local/bin/crosslogic-entrypoint"]
CMD ["crosslogic", "--help"]
