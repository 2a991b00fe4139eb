# The app image: workers, migrations and the dashboard all run from it (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EXECUTOR_SQL_DIR=/app/sql

WORKDIR /app
COPY pyproject.toml README.md ./
COPY executor ./executor
COPY queue_config ./queue_config
COPY sql ./sql

# No embedded servers in the image: compose (or you) provide Postgres and Redis by URL.
RUN pip install ".[dashboard]" \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin executor

USER executor
CMD ["executor", "worker"]
