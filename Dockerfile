# One image for every SAIR service; the command chooses the service (see compose.yaml).
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc make libc6-dev libhiredis-dev \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir uv
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
COPY schemas ./schemas
COPY services ./services
COPY sair ./sair
COPY gpu_interceptor ./gpu_interceptor
RUN uv sync --frozen --no-dev && make -C gpu_interceptor

FROM python:3.11-slim
WORKDIR /app
COPY --from=build /app /app
ENV PATH="/app/.venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    SAIR_METRICS_HOST=0.0.0.0 \
    SAIR_METRICS_PORT=9100
EXPOSE 9100
CMD ["sair", "--help"]
