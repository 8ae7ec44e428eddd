# spendgate in a container: `docker compose up` uses this (see docker-compose.yml).
# Build: docker build -t spendgate .   Run: see docker-compose.yml for the settings it needs.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY src ./src
# With the shared extra (asyncpg, redis): the same image runs one process or several replicas.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[shared]"

FROM python:3.12-slim
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPENDGATE_HOST=0.0.0.0 \
    SPENDGATE_PORT=8787 \
    SPENDGATE_DB_PATH=/data/spendgate.db
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin spendgate \
    && mkdir -p /data && chown spendgate:spendgate /data
USER spendgate
WORKDIR /data
# The SQLite database (and its WAL files) live here: mount a volume to keep them.
VOLUME ["/data"]
EXPOSE 8787
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SPENDGATE_PORT', '8787'), timeout=2)"]
# Listening on 0.0.0.0 needs SPENDGATE_ADMIN_TOKEN (or SPENDGATE_ALLOW_REMOTE_WITHOUT_TOKEN=true).
ENTRYPOINT ["spendgate"]
CMD ["serve"]
