# syntax=docker/dockerfile:1.7
#
# mmar container images. Two targets:
#   docker build --target runtime  -t mmar:VERSION .           (default) the `mmar` CLI on torch
#   docker build --target operator -t mmar-operator:VERSION .  the kopf operator; never torch
# `make images` builds and smoke-tests both (Docker, or podman/buildah); docs/deploy.md, "Images".
#
# Build arguments (all optional):
#   PYTHON_IMAGE     the base: an image with python >= 3.11 and its venv module on PATH
#   TORCH_VARIANT    cuda (default: PyPI's torch, CUDA libraries as wheels, onnxruntime-gpu) or
#                    cpu (torch==PIN+cpu and onnxruntime: for CPU inference nodes and CI)
#   TORCH_INDEX_URL  where the cpu build comes from (default: PyTorch's CPU index; empty: none)
#   TENSORRT         1 or 0: TensorRT in or out (default: 1 for cuda; cpu never has it)
#   EXTRA_INDEX_URL  an extra package index, e.g. https://pypi.nvidia.com, where TensorRT's wheels are
#   PIP_EXTRA_ARGS   any other pip options, e.g. --find-links=/wheels with a folder mounted there
#   VERSION, REVISION, CREATED   the OCI labels
#
# Every install step is docker/install.sh (CI runs the same script in a venv). Layers go from
# least to most often changed: interpreter + venv, torch, other requirements, then the source,
# so editing mmar's code rebuilds only the last, small layer.

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/mmar \
    PATH=/opt/mmar/bin:$PATH
# A fixed non-root uid/gid (1000): the chart's securityContext and the operator's step pods
# (runAsUser) use the same one, so files on the MMAR PVC stay readable by every pod.
RUN python -m venv /opt/mmar \
 && groupadd --gid 1000 mmar \
 && useradd --uid 1000 --gid mmar --home-dir /home/mmar --create-home --shell /usr/sbin/nologin mmar

# ---------------------------------------------------------------------------------------------
FROM base AS build
WORKDIR /src
COPY docker/install.sh docker/constraints.txt docker/
COPY pyproject.toml ./

# ---------------------------------------------------------------------------------------------
FROM build AS operator-build
ARG EXTRA_INDEX_URL=
ARG PIP_EXTRA_ARGS=
RUN docker/install.sh operator deps
COPY README.md ./
COPY runtime/ runtime/
COPY operator/ operator/
RUN docker/install.sh operator project

# ---------------------------------------------------------------------------------------------
FROM build AS runtime-build
ARG TORCH_VARIANT=cuda
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TENSORRT=
ARG EXTRA_INDEX_URL=
ARG PIP_EXTRA_ARGS=
RUN docker/install.sh runtime torch
RUN docker/install.sh runtime deps
COPY README.md ./
COPY runtime/ runtime/
COPY operator/ operator/
RUN docker/install.sh runtime project

# ---------------------------------------------------------------------------------------------
FROM base AS operator
COPY --from=operator-build /opt/mmar /opt/mmar
WORKDIR /home/mmar
USER 1000:1000
# 8000: Prometheus metrics; 8080: liveness probe (chart values operator.healthPort / metrics.port).
EXPOSE 8000 8080
ENTRYPOINT ["mmar-operator"]
# Labels last: CREATED changes on every build and must not invalidate the layers above.
# An ARG declared before the first FROM is visible in a stage only when declared there again.
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="mmar-operator" \
      org.opencontainers.image.description="Kubernetes operator running MMARJob steps as Jobs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="mmar" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# ---------------------------------------------------------------------------------------------
FROM base AS runtime
# The NVIDIA container toolkit injects the driver; CUDA, cuDNN and TensorRT come as wheels.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=runtime-build /opt/mmar /opt/mmar
# The default working folder of `docker run`: owned by the image's user, who must write there
# (WORKDIR alone would create it owned by root under Docker).
RUN install -d -o 1000 -g 1000 -m 0755 /workspace
WORKDIR /workspace
USER 1000:1000
# Prometheus metrics while a step runs: MMAR_METRICS_PORT + LOCAL_RANK (one port per local rank).
EXPOSE 9400
ENTRYPOINT ["mmar"]
CMD ["--help"]
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG TORCH_VARIANT=cuda
LABEL org.opencontainers.image.title="mmar" \
      org.opencontainers.image.description="mmar runtime: convert, train, validate, infer, export medical-imaging models (MONAI)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="mmar" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}" \
      dev.mmar.torch-variant="${TORCH_VARIANT}"
