"""The operator's settings, read once from the environment (the Helm chart sets these)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _positive(name: str, default: int) -> int:
    value = _int(name, default)
    if value < 1:
        raise ValueError(f"environment variable {name} must be at least 1, got {value}")
    return value


def _resources(name: str) -> dict[str, Any]:
    raw = os.environ.get(name)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be JSON like {{\"requests\": {{\"cpu\": \"4\"}}}}, got {raw!r}") from None
    if not isinstance(value, dict) or set(value) - {"requests", "limits"}:
        raise ValueError(f"environment variable {name} must be a JSON object with requests and/or limits, got {raw!r}")
    return value


@dataclass(frozen=True)
class Config:
    # the runtime image for steps whose MMARJob gives no spec.image
    default_image: str = "ghcr.io/mmar-dev/mmar:0.1.0"
    # CPU/memory of a step's container when the MMARJob gives no resources (GPUs always come from gpusPerNode)
    default_resources: dict[str, Any] = field(default_factory=dict)
    # the port the runtime pods serve Prometheus metrics on (MMAR_METRICS_PORT, container port "metrics")
    runtime_metrics_port: int = 9400
    # the non-root user/group the runtime pods run as (also fsGroup, so PVCs are writable)
    run_as_user: int = 1000
    # the operator's own endpoints
    metrics_port: int = 8000
    liveness_port: int = 8080
    # namespaces to watch; empty = the whole cluster
    namespaces: tuple[str, ...] = field(default_factory=tuple)
    # safety-net re-reconcile of unfinished MMARJobs, seconds
    resync_seconds: int = 30
    # threads running reconciles at once, and HTTP connections to the API server (see tuning.py): a
    # reconcile mostly waits on API round trips, so a burst of MMARJobs needs many at once
    workers: int = 64

    @classmethod
    def from_env(cls) -> "Config":
        namespaces = tuple(n.strip() for n in os.environ.get("MMAR_OPERATOR_NAMESPACES", "").split(",") if n.strip())
        return cls(
            default_image=os.environ.get("MMAR_OPERATOR_DEFAULT_IMAGE") or cls.default_image,
            default_resources=_resources("MMAR_OPERATOR_DEFAULT_RESOURCES"),
            runtime_metrics_port=_int("MMAR_OPERATOR_RUNTIME_METRICS_PORT", cls.runtime_metrics_port),
            run_as_user=_int("MMAR_OPERATOR_RUN_AS_USER", cls.run_as_user),
            metrics_port=_int("MMAR_OPERATOR_METRICS_PORT", cls.metrics_port),
            liveness_port=_int("MMAR_OPERATOR_LIVENESS_PORT", cls.liveness_port),
            namespaces=namespaces,
            resync_seconds=_int("MMAR_OPERATOR_RESYNC_SECONDS", cls.resync_seconds),
            workers=_positive("MMAR_OPERATOR_WORKERS", cls.workers),
        )
