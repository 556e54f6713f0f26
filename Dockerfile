# syntax=docker/dockerfile:1
# loopserve: the OpenAI-compatible server and its bundled checkpoint in one image.
#
#   GPU (default): docker build -t loopserve:0.1.0 .
#   CPU:           docker build --build-arg VARIANT=cpu -t loopserve:0.1.0-cpu .
#   run:           docker run --gpus all -p 8000:8000 loopserve:0.1.0 [serve flags]
#
# Why this base: torch 2.13.0's Linux x86_64 wheel on PyPI is built for CUDA 13.0 and pulls
# its CUDA libraries in as pip packages (nvidia-cuda-runtime 13.0.96, cuBLAS 13.1,
# cuDNN 9.20, NCCL 2.29). The CUDA 13.0 *base* image adds what the wheels cannot: the
# driver requirement (NVIDIA_REQUIRE_CUDA=cuda>=13.0) and the container-toolkit settings.
# The `-runtime` flavour would ship a second copy of cuBLAS and friends (gigabytes) that
# torch never loads. The host needs an NVIDIA driver that supports CUDA 13.0 (>= 580).
# The CPU variant takes torch from PyTorch's CPU wheel index, so no CUDA bytes at all.
# No C/C++ compiler is installed, so `--compile-chains` and `--attention-backend flex`
# (torch.compile: C++ on a CPU, Triton launchers on a GPU) are not available in this
# image: the server refuses them at start-up with a message saying why.

ARG VARIANT=cuda
ARG CUDA_BASE=nvidia/cuda:13.0.2-base-ubuntu24.04
ARG CPU_BASE=ubuntu:24.04

FROM ${CUDA_BASE} AS base-cuda
ENV LOOPSERVE_DEVICE=cuda

FROM ${CPU_BASE} AS base-cpu
ENV LOOPSERVE_DEVICE=cpu

# Both bases are Ubuntu 24.04, so the venv built below runs unchanged in the final stage.
# base-${VARIANT} names one of the two stages above (tagged there), not a registry image.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Ubuntu's archive keeps one version per release pocket: pinning it would only break
# rebuilds after a security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*


FROM base AS build
ARG VARIANT
ARG TORCH_VERSION=2.13.0
# Empty: PyPI for the CUDA variant, PyTorch's CPU-only index for the CPU variant.
ARG TORCH_INDEX_URL=""
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# torch first and alone: the largest layer, cached until TORCH_VERSION changes.
RUN index="${TORCH_INDEX_URL}"; \
    if [ -z "$index" ] && [ "$VARIANT" = cpu ]; then index=https://download.pytorch.org/whl/cpu; fi; \
    if [ -z "$index" ]; then index=https://pypi.org/simple; fi; \
    /opt/venv/bin/pip install --no-cache-dir --index-url "$index" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md loopserve_cli.py ./
COPY model/ model/
COPY engine/ engine/
COPY server/ server/
COPY clients/ clients/
COPY training/ training/
COPY benchmarks/ benchmarks/
RUN /opt/venv/bin/pip install --no-cache-dir .


FROM base AS runtime
ARG UID=10001
RUN groupadd --system --gid "${UID}" loopserve \
    && useradd --system --uid "${UID}" --gid loopserve --home-dir /home/loopserve \
       --create-home --shell /usr/sbin/nologin loopserve
COPY --from=build /opt/venv /opt/venv
COPY --chown=root:root models/ /opt/loopserve/models/
# Every serve flag can also come from its LOOPSERVE_* variable; these are the image's
# defaults, overridable with `docker run -e` or flags after the image name.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/loopserve \
    LOOPSERVE_MODEL=/opt/loopserve/models/loopserve-tiny \
    LOOPSERVE_HOST=0.0.0.0 \
    LOOPSERVE_PORT=8000
USER ${UID}
WORKDIR /home/loopserve
EXPOSE 8000
# /health is 200 only while the engine loop is alive and making progress. Python, not
# curl: the image has no curl, and Python reads LOOPSERVE_PORT if it was overridden.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LOOPSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["loopserve", "serve"]
CMD []
