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
