# The inference service on CPU: ONNX Runtime, FastAPI, no torch; runs as a non-root user.
# GPU variant: Dockerfile.gpu. Bundles are mounted at /app/weights (see docker-compose.yml).
#   docker build -t imm-service:cpu .
#   docker run -p 8000:8000 -v "$PWD/weights:/app/weights:ro" imm-service:cpu
# BASE_IMAGE is any Debian-like image with `python` 3.11 and its venv module; `make test-docker` builds
# one locally (tests/docker/run.sh). Pin it by digest (python:3.11-slim-bookworm@sha256:...) for an
# image that rebuilds byte for byte the same Python. No `# syntax=` line: BuildKit would fetch a
# frontend image for it, which fails offline.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/imm
WORKDIR /src
# The serving dependencies, exactly as locked (requirements/serve.txt, `make lock`): pinned versions,
# hash-checked wheels only. Their own layer, rebuilt only when the lock changes.
COPY requirements/serve.txt requirements/
RUN /opt/imm/bin/pip install --require-hashes --only-binary :all: -r requirements/serve.txt
COPY pyproject.toml README.md LICENSE ./
COPY model ./model
COPY export ./export
COPY engine ./engine
COPY service ./service
COPY imm ./imm
# The project itself, on the locked dependencies (--no-deps; pip check fails the build on a lock that
# no longer satisfies pyproject.toml). Fail the build too if torch sneaked in, or if the app does not import.
# Then pip goes: the running image installs nothing.
RUN /opt/imm/bin/pip install --no-deps . \
    && /opt/imm/bin/pip check \
    && /opt/imm/bin/python -c "import service.app, onnxruntime; print(onnxruntime.get_available_providers())" \
    && if /opt/imm/bin/python -c "import torch" 2>/dev/null; then echo "torch must not be in the image" >&2; exit 1; fi \
    && /opt/imm/bin/pip uninstall --yes --quiet pip setuptools

FROM ${BASE_IMAGE} AS runtime
ENV PATH=/opt/imm/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IMM_HOST=0.0.0.0 \
    IMM_PORT=8000 \
    IMM_NER_BUNDLE=/app/weights/ner \
    IMM_RE_BUNDLE=/app/weights/re
RUN groupadd --system --gid 10001 imm \
    && useradd --system --uid 10001 --gid imm --home-dir /app --no-create-home --shell /usr/sbin/nologin imm \
    && mkdir -p /app/weights \
    && chown -R imm:imm /app
COPY --from=build /opt/imm /opt/imm
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# Ready, not just alive: the models are loaded and warmed up.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
CMD ["python", "-m", "service"]
