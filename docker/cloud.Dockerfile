# The coexit cloud service: `coexit serve` on the bundled default model, gRPC on port 50151.
FROM python:3.11-slim
WORKDIR /app
# CPU torch first (override TORCH_SPEC / PIP_EXTRA_INDEX_URL for a GPU build)
ARG TORCH_SPEC=torch==2.13.0
RUN pip install --no-cache-dir "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY coexit coexit
COPY edge edge
COPY cloud cloud
COPY training training
COPY proto proto
RUN pip install --no-cache-dir ".[cloud]"
COPY models models
EXPOSE 50151
HEALTHCHECK --interval=5s --timeout=5s --retries=12 CMD ["python", "-m", "cloud.healthcheck", "127.0.0.1:50151"]
CMD ["coexit", "serve", "--model", "/app/models/coexit-code-small", "--host", "0.0.0.0", "--port", "50151"]
