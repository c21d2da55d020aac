"""Live metric sources for the observability tests: a tiny MONAI run and the operator's registry.

Both the promtool checks and the dashboard check read metric names from here, i.e. from what
the code really registers, never from a hand-written list.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

N_SAMPLES = 6
BATCH_SIZE = 2
EPOCHS = 2


def tiny_workflows(max_epochs: int = EPOCHS, device: str = "cpu"):
    """A MONAI SupervisedTrainer validated each epoch by a SupervisedEvaluator, on random tensors."""
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import MeanSquaredError, ValidationHandler, from_engine

    torch.manual_seed(0)
    data = [{"image": torch.randn(4), "label": torch.randn(1)} for _ in range(N_SAMPLES)]
    net = torch.nn.Linear(4, 1).to(device)
    evaluator = SupervisedEvaluator(
        device=torch.device(device),
        val_data_loader=DataLoader(data, batch_size=BATCH_SIZE),
        network=net,
        key_val_metric={"val_mse": MeanSquaredError(output_transform=from_engine(["pred", "label"]))},
        # Lower MSE is better: MONAI compares with metric_cmp_fn.
        metric_cmp_fn=lambda current, best: current < best,
    )
    trainer = SupervisedTrainer(
        device=torch.device(device),
        max_epochs=max_epochs,
        train_data_loader=DataLoader(data, batch_size=BATCH_SIZE, shuffle=True),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
        loss_function=torch.nn.MSELoss(),
        train_handlers=[ValidationHandler(validator=evaluator, interval=1, epoch_level=True)],
    )
    return trainer, evaluator


def runtime_registry():
    """A fresh registry holding the runtime's metrics after a tiny two-epoch run."""
    from mmar.engine.prometheus import RunLabels, RuntimeMetrics

    registry = CollectorRegistry()
    metrics = RuntimeMetrics(registry)
    trainer, evaluator = tiny_workflows()
    metrics.attach(trainer, evaluator, RunLabels(mmarjob="brain-seg", step="train", node_rank="0", local_rank="0"))
    trainer.run()
    return registry


def operator_metrics():
    """A fresh instance of the operator's metrics, fed one tracked MMARJob and one finished step."""
    try:
        module = importlib.import_module("mmar_operator.metrics")
    except ImportError as exc:  # the operator package is written in parallel; say so plainly
        pytest.skip(f"mmar_operator.metrics not importable: {exc}")
    metrics = module.Metrics(CollectorRegistry())
    metrics.set_phase("radiology", "spleen-seg", "Running")
    metrics.observe_finished(
        [{"type": "train", "phase": "Succeeded", "startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T02:00:00Z"}]
    )
    metrics.reconcile_errors.inc()
    return metrics


def exposition(registry) -> str:
    return generate_latest(registry).decode()


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "info": ("_info",),
}


def series_names(text: str) -> set[str]:
    """Every series name a scrape of `text` can carry: sample names plus each family's type suffixes.

    The suffixes matter for families with no samples yet (a labelled histogram before its first
    observation still has a `_bucket` series in any real run).
    """
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names
