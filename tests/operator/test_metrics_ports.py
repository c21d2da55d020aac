"""Every local rank of a multi-GPU step serves its own metrics port, declared for the PodMonitor."""

from pathlib import Path

import yaml

from mmar_operator.__main__ import render_manifest
from mmar_operator.config import Config

ROOT = Path(__file__).resolve().parents[2]


def _container(step: str) -> dict:
    objects = list(yaml.safe_load_all(render_manifest(ROOT / "examples" / "segmentation-job.yaml", step, Config())))
    (job,) = [o for o in objects if o["kind"] == "Job"]
    return job["spec"]["template"]["spec"]["containers"][0]


def test_each_local_rank_has_a_metrics_port():
    ports = {p["name"]: p["containerPort"] for p in _container("train")["ports"]}
    base = Config().runtime_metrics_port
    # segmentation-job.yaml trains with gpusPerNode: 4
    assert {k: v for k, v in ports.items() if k.startswith("metrics")} == {
        "metrics": base, "metrics-1": base + 1, "metrics-2": base + 2, "metrics-3": base + 3}


def test_single_process_steps_have_one_metrics_port():
    ports = [p["name"] for p in _container("validate")["ports"]]
    assert ports == ["metrics"]


def test_phase_gauges_follow_each_mmarjob():
    from mmar_operator.metrics import Metrics

    metrics = Metrics()

    def gauges():
        return {p: metrics.registry.get_sample_value("mmar_operator_jobs", {"phase": p}) for p in ("Pending", "Running", "Succeeded")}

    metrics.set_phase("ns", "a", "Pending")
    metrics.set_phase("ns", "b", "Pending")
    metrics.set_phase("ns", "a", "Running")
    metrics.set_phase("ns", "a", "Running")  # unchanged: counted once
    assert gauges() == {"Pending": 1, "Running": 1, "Succeeded": 0}
    metrics.set_phase("ns", "a", None)
    metrics.set_phase("ns", "gone", None)  # never seen: nothing to take away
    metrics.set_phase("other", "b", "Succeeded")  # another namespace, another MMARJob
    assert gauges() == {"Pending": 1, "Running": 0, "Succeeded": 1}
