# syntax=docker/dockerfile:1.7
#
# mmar container images. Two targets:
#   docker build --target runtime  -t mmar:VERSION .           (default) the `mmar` CLI on CUDA torch
#   docker build --target operator -t mmar-operator:VERSION .  the kopf operator; never torch
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
RUN docker/install.sh operator deps
COPY README.md ./
COPY runtime/ runtime/
COPY operator/ operator/
RUN docker/install.sh operator project

# ---------------------------------------------------------------------------------------------
FROM build AS runtime-build
RUN docker/install.sh runtime torch
RUN docker/install.sh runtime deps
COPY README.md ./
COPY runtime/ runtime/
COPY operator/ operator/
RUN docker/install.sh runtime project

# ---------------------------------------------------------------------------------------------
FROM base AS operator
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
COPY --from=operator-build /opt/mmar /opt/mmar
WORKDIR /home/mmar
USER 1000:1000
# 8000: Prometheus metrics; 8080: liveness probe (chart values operator.healthPort / metrics.port).
EXPOSE 8000 8080
ENTRYPOINT ["mmar-operator"]

# ---------------------------------------------------------------------------------------------
FROM base AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="mmar" \
      org.opencontainers.image.description="mmar runtime: convert, train, validate, infer, export medical-imaging models (MONAI, CUDA)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="mmar" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
# The NVIDIA container toolkit injects the driver; CUDA, cuDNN and TensorRT come as wheels.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=runtime-build /opt/mmar /opt/mmar
WORKDIR /workspace
USER 1000:1000
# Prometheus metrics while a step runs: MMAR_METRICS_PORT + LOCAL_RANK (one port per local rank).
EXPOSE 9400
ENTRYPOINT ["mmar"]
CMD ["--help"]
