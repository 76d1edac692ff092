# The coexit edge: `coexit demo` against the cloud service, or `coexit edge-serve` (the OpenAI-compatible endpoint).
FROM python:3.11-slim
WORKDIR /app
ARG TORCH_SPEC=torch==2.13.0
RUN pip install --no-cache-dir "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY coexit coexit
COPY edge edge
COPY cloud cloud
COPY training training
COPY proto proto
RUN pip install --no-cache-dir ".[cloud,api]"
COPY models models
CMD ["coexit", "demo", "--model", "/app/models/coexit-code-small", "--cloud", "cloud:50151", "--color", "always"]
