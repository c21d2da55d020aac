"""The runtime's Prometheus metrics, fed by a tiny real MONAI training run on random tensors."""

from __future__ import annotations

import math
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from _metrics_sources import BATCH_SIZE, EPOCHS, N_SAMPLES, exposition, runtime_registry, tiny_workflows
from _tools import promtool_check_metrics
from mmar.engine import prometheus as pm
from mmar.errors import MMARError

LABELS = {"mmarjob": "brain-seg", "step": "train", "node_rank": "0", "local_rank": "0"}


@pytest.fixture(scope="module")
def scrape() -> str:
    return exposition(runtime_registry())


def _value(text: str, name: str, **labels: str) -> float:
    want = {**LABELS, **labels}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in want.items()):
                return sample.value
    raise AssertionError(f"no sample {name}{want} in scrape:\n{text}")


def test_training_progress_is_exported(scrape):
    iterations = EPOCHS * math.ceil(N_SAMPLES / BATCH_SIZE)
    assert _value(scrape, "mmar_train_epoch") == EPOCHS
    assert _value(scrape, "mmar_train_max_epochs") == EPOCHS
    assert _value(scrape, "mmar_train_iteration") == iterations
    loss = _value(scrape, "mmar_train_loss")
    assert math.isfinite(loss) and loss >= 0
    assert _value(scrape, "mmar_samples_total", engine="train") == EPOCHS * N_SAMPLES
    assert _value(scrape, "mmar_samples_total", engine="validation") == EPOCHS * N_SAMPLES
    assert _value(scrape, "mmar_samples_per_second", engine="train") > 0
    # One data-loader wait observed per fetched batch.
    assert _value(scrape, "mmar_data_loading_wait_seconds_count", engine="train") == iterations
    assert _value(scrape, "mmar_data_loading_wait_seconds_sum", engine="train") >= 0


def test_validation_metrics_are_exported(scrape):
    current = _value(scrape, "mmar_validation_key_metric", metric="val_mse")
    best = _value(scrape, "mmar_validation_best_key_metric", metric="val_mse")
    assert math.isfinite(current) and best <= current  # lower is better for this run's metric_cmp_fn
    assert 1 <= _value(scrape, "mmar_validation_best_epoch") <= EPOCHS


def test_gpu_memory_family_without_cuda_has_no_samples(scrape):
    import torch

    families = {f.name: f for f in text_string_to_metric_families(scrape)}
    assert "mmar_gpu_memory_allocated_bytes" in families
    if not torch.cuda.is_available():
        assert families["mmar_gpu_memory_allocated_bytes"].samples == []


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA device")
def test_gpu_memory_is_reported_on_cuda():
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    metrics = pm.RuntimeMetrics(registry)
    trainer, evaluator = tiny_workflows(max_epochs=1, device="cuda")
    metrics.attach(trainer, evaluator, pm.RunLabels(**LABELS))
    trainer.run()
    text = exposition(registry)
    import torch

    device = f"cuda:{torch.cuda.current_device()}"
    assert _value(text, "mmar_gpu_memory_allocated_bytes", device=device) > 0
    assert _value(text, "mmar_gpu_memory_max_allocated_bytes", device=device) >= _value(
        text, "mmar_gpu_memory_allocated_bytes", device=device)
    assert _value(text, "mmar_gpu_memory_reserved_bytes", device=device) >= _value(
        text, "mmar_gpu_memory_allocated_bytes", device=device)
    assert _value(text, "mmar_samples_total", engine="train") == N_SAMPLES


def test_scrape_passes_promtool(scrape):
    result = promtool_check_metrics(scrape)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "output, expected",
    [
        ({"loss": 0.5}, 0.5),
        ([{"loss": 0.25, "pred": 1}, {"loss": 0.25, "pred": 2}], 0.25),
        ([], None),
        ({"pred": 1}, None),
        (None, None),
    ],
)
def test_loss_is_read_from_monai_outputs(output, expected):
    assert pm._loss_of(output) == expected


def test_loss_reads_tensors():
    import torch

    assert pm._loss_of({"loss": torch.tensor(1.5)}) == 1.5


def test_port_is_base_plus_local_rank():
    assert pm.metrics_port({}) is None
    assert pm.metrics_port({"MMAR_METRICS_PORT": "9400"}) == 9400
    assert pm.metrics_port({"MMAR_METRICS_PORT": "9400", "LOCAL_RANK": "3"}) == 9403


@pytest.mark.parametrize("env", [{"MMAR_METRICS_PORT": "metrics"}, {"MMAR_METRICS_PORT": "70000"},
                                 {"MMAR_METRICS_PORT": "9400", "LOCAL_RANK": "x"}])
def test_bad_port_environment_names_the_variable(env):
    with pytest.raises(MMARError, match="MMAR_METRICS_PORT"):
        pm.metrics_port(env)


def test_labels_from_torchrun_environment():
    labels = pm.RunLabels.from_env(
        {"MMAR_JOB_NAME": "spleen", "MMAR_STEP": "finetune", "GROUP_RANK": "2", "NODE_RANK": "9", "LOCAL_RANK": "1"}
    )
    assert labels == pm.RunLabels("spleen", "finetune", "2", "1")
    assert pm.RunLabels.from_env({"NODE_RANK": "4"}).node_rank == "4"


def test_attach_from_env_is_a_no_op_without_port(monkeypatch):
    from ignite.engine import Events

    monkeypatch.delenv("MMAR_METRICS_PORT", raising=False)
    trainer, evaluator = tiny_workflows(max_epochs=1)
    before = len(trainer._event_handlers[Events.ITERATION_COMPLETED])
    pm.attach_from_env(trainer, evaluator)
    assert len(trainer._event_handlers[Events.ITERATION_COMPLETED]) == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_attach_from_env_serves_this_ranks_metrics_over_http(monkeypatch):
    base = _free_port()
    monkeypatch.setenv("MMAR_METRICS_PORT", str(base))
    monkeypatch.setenv("MMAR_METRICS_ADDR", "127.0.0.1")
    monkeypatch.setenv("MMAR_JOB_NAME", "http-job")
    monkeypatch.setenv("MMAR_STEP", "train")
    monkeypatch.setenv("LOCAL_RANK", "0")
    trainer, evaluator = tiny_workflows(max_epochs=1)
    pm.attach_from_env(trainer, evaluator)
    trainer.run()
    text = urllib.request.urlopen(f"http://127.0.0.1:{base}/metrics", timeout=10).read().decode()
    assert _value(text, "mmar_train_epoch", mmarjob="http-job") == 1
    # The default registry also carries process_* and python_* metrics: lint the whole scrape.
    result = promtool_check_metrics(text)
    assert result.returncode == 0, result.stdout + result.stderr
    # A second call in the same process reuses the server (no "address in use").
    trainer2, _ = tiny_workflows(max_epochs=1)
    pm.attach_from_env(trainer2)
