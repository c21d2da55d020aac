"""The operator's own Prometheus metrics (the runtime pods export training metrics themselves).

A private registry (not the process-global one) so tests can build a fresh set and read values back.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")
# steps run from a minute (convert, export) to days (multi-node training)
DURATION_BUCKETS = (30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, 172800, 604800)


def _parse_time(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.jobs = Gauge("mmar_operator_jobs", "MMARJobs by phase", ["phase"], registry=self.registry)
        self.step_duration = Histogram("mmar_operator_step_duration_seconds", "Wall time of finished MMARJob steps, from the Job's start to its completion",
                                       ["step"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.steps_finished = Counter("mmar_operator_steps_finished_total", "Finished MMARJob steps by type and outcome",
                                      ["step", "phase"], registry=self.registry)
        self.reconcile_errors = Counter("mmar_operator_reconcile_errors_total", "Reconciles that raised (retried by kopf)", registry=self.registry)
        self.children_created = Counter("mmar_operator_children_created_total", "Jobs and Services created", ["kind"], registry=self.registry)
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(0)

    def set_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Record an MMARJob's phase (None: deleted) and move it between the per-phase gauges.

        Called by every reconcile: only the gauges that change are touched, not a recount of every MMARJob."""
        with self._lock:
            old = self._phases.pop((namespace, name), None) if phase is None else self._phases.get((namespace, name))
            if phase is not None:
                self._phases[(namespace, name)] = phase
            if old == phase:
                return
            if old is not None:
                self.jobs.labels(phase=old).dec()
            if phase is not None:
                self.jobs.labels(phase=phase).inc()

    def observe_finished(self, steps: Iterable[Mapping[str, Any]]) -> None:
        for step in steps:
            self.steps_finished.labels(step=step["type"], phase=step["phase"]).inc()
            if step.get("startTime") and step.get("completionTime"):
                seconds = max(0.0, _parse_time(step["completionTime"]) - _parse_time(step["startTime"]))
                self.step_duration.labels(step=step["type"]).observe(seconds)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)
