# syntax=docker/dockerfile:1
# The inference service on CPU: ONNX Runtime, FastAPI, no torch; runs as a non-root user.
# GPU variant: Dockerfile.gpu. Bundles are mounted at /app/weights (see docker-compose.yml).
#   docker build -t imm-service:cpu .
#   docker run -p 8000:8000 -v "$PWD/weights:/app/weights:ro" imm-service:cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/imm
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY model ./model
COPY export ./export
COPY service ./service
# The serving install only: numpy, Pillow, tokenizers, onnxruntime, FastAPI. Fail the build if
# torch sneaked in, or if the app does not import.
RUN /opt/imm/bin/pip install ".[serve]" \
    && /opt/imm/bin/python -c "import service.app, onnxruntime; print(onnxruntime.get_available_providers())" \
    && if /opt/imm/bin/python -c "import torch" 2>/dev/null; then echo "torch must not be in the image" >&2; exit 1; fi

FROM ${PYTHON_IMAGE} AS runtime
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
