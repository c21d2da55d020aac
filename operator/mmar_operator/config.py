"""The operator's settings, read once from the environment (the Helm chart sets these)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from mmar.job import STEP_TYPES  # the types whose default resources MMAR_OPERATOR_STEP_RESOURCES may set


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


def _json_env(name: str, example: str) -> Any:
    """The JSON value of environment variable `name` (None when unset or empty)."""
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be JSON like {example}, got {raw!r}") from None


def _check_resources(value: Any, where: str) -> None:
    if not isinstance(value, dict) or set(value) - {"requests", "limits"}:
        raise ValueError(f"{where} must be a JSON object with requests and/or limits, got {value!r}")


def _resources(name: str) -> dict[str, Any]:
    value = _json_env(name, '{"requests": {"cpu": "4"}}')
    if value is None:
        return {}
    _check_resources(value, f"environment variable {name}")
    return value


def _step_resources(name: str) -> dict[str, dict[str, Any]]:
    """{step type: resources}: the default resources of each step type (the chart's runtime.stepResources)."""
    value = _json_env(name, '{"convert": {"requests": {"cpu": "1"}}}')
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"environment variable {name} must be a JSON object of step type -> resources, got {value!r}")
    for kind, resources in value.items():
        if kind not in STEP_TYPES:
            raise ValueError(f"environment variable {name}: {kind!r} is not a step type ({', '.join(STEP_TYPES)})")
        _check_resources(resources, f"environment variable {name}: {kind}")
    return value


def _names(name: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in os.environ.get(name, "").split(",") if n.strip())


@dataclass(frozen=True)
class Config:
    # the runtime image for steps whose MMARJob gives no spec.image
    default_image: str = "ghcr.io/mmar-dev/mmar:0.1.0"
    # CPU/memory of a step's container when the MMARJob gives no resources (GPUs always come from gpusPerNode)
    default_resources: dict[str, Any] = field(default_factory=dict)
    # per step type, before default_resources: {"convert": {"requests": {...}, "limits": {...}}, ...}
    step_resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Secrets (names) to pull the runtime image with, for step pods whose MMARJob names none
    image_pull_secrets: tuple[str, ...] = field(default_factory=tuple)
    # seconds a step's pod may stay unstartable before the step fails, unless the MMARJob says
    # (spec.runPolicy.pendingTimeoutSeconds)
    pending_timeout_seconds: int = 600
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
    # threads running reconciles at once (kopf's settings.execution.max_workers, set by handlers._startup),
    # and HTTP connections to the API server (apply.Cluster.from_kubeconfig: each thread keeps its own
    # keep-alive connection instead of a new TLS handshake per call). kopf's default pool is min(32, CPUs + 4),
    # 6 threads on a 2-CPU node, and a reconcile mostly waits: profiled with bench/operator_latency.py (100
    # MMARJobs from 16 clients), one took 0.44 s, 0.10-0.17 s per API round trip and a few ms of CPU, so 100
    # MMARJobs applied at once queued behind 6 threads. Idle threads cost a stack of virtual memory, not
    # resident memory (peak RSS 111 -> 123 MB at 64).
    workers: int = 64

    @classmethod
    def from_env(cls) -> "Config":
        namespaces = _names("MMAR_OPERATOR_NAMESPACES")
        return cls(
            default_image=os.environ.get("MMAR_OPERATOR_DEFAULT_IMAGE") or cls.default_image,
            default_resources=_resources("MMAR_OPERATOR_DEFAULT_RESOURCES"),
            step_resources=_step_resources("MMAR_OPERATOR_STEP_RESOURCES"),
            image_pull_secrets=_names("MMAR_OPERATOR_IMAGE_PULL_SECRETS"),
            pending_timeout_seconds=_positive("MMAR_OPERATOR_PENDING_TIMEOUT_SECONDS", cls.pending_timeout_seconds),
            runtime_metrics_port=_int("MMAR_OPERATOR_RUNTIME_METRICS_PORT", cls.runtime_metrics_port),
            run_as_user=_int("MMAR_OPERATOR_RUN_AS_USER", cls.run_as_user),
            metrics_port=_int("MMAR_OPERATOR_METRICS_PORT", cls.metrics_port),
            liveness_port=_int("MMAR_OPERATOR_LIVENESS_PORT", cls.liveness_port),
            namespaces=namespaces,
            resync_seconds=_int("MMAR_OPERATOR_RESYNC_SECONDS", cls.resync_seconds),
            workers=_positive("MMAR_OPERATOR_WORKERS", cls.workers),
        )
