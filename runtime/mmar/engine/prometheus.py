"""Prometheus metrics of a running training/validation step.

The trainer calls :func:`attach_from_env` once it has built its MONAI workflows. With
``MMAR_METRICS_PORT`` unset nothing happens; with it set, this process serves its own
``/metrics`` on ``MMAR_METRICS_PORT + LOCAL_RANK`` (every rank of a multi-GPU, multi-node run
exposes its own series) and ignite event handlers keep the gauges below up to date.

Every series carries the labels ``mmarjob`` (``MMAR_JOB_NAME``), ``step`` (``MMAR_STEP``),
``node_rank`` (``GROUP_RANK``/``NODE_RANK``) and ``local_rank`` (``LOCAL_RANK``). The label is
``mmarjob``, not ``job``, because Prometheus reserves ``job`` for the scrape job.

Names follow the Prometheus conventions: base units (seconds, bytes), ``_total`` on counters.
``docs/deploy.md`` lists them with a sample scrape; the chart's Grafana dashboard queries them
and a test checks it names nothing that is not exported here.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mmar.errors import MMARError

PORT_ENV = "MMAR_METRICS_PORT"
ADDR_ENV = "MMAR_METRICS_ADDR"
LABELS = ("mmarjob", "step", "node_rank", "local_rank")

# Batch fetch times span sub-millisecond (cached tensors) to seconds (cold NFS, heavy 3D augmentation).
_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class RunLabels:
    """Who is reporting: the MMARJob, its step and this process's place in the run."""

    mmarjob: str = ""
    step: str = ""
    node_rank: str = "0"
    local_rank: str = "0"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "RunLabels":
        env = os.environ if env is None else env
        # torchrun sets GROUP_RANK; the operator's Indexed Job may set NODE_RANK instead.
        node_rank = env.get("GROUP_RANK") or env.get("NODE_RANK") or "0"
        return cls(
            mmarjob=env.get("MMAR_JOB_NAME", ""),
            step=env.get("MMAR_STEP", ""),
            node_rank=node_rank,
            local_rank=env.get("LOCAL_RANK", "0"),
        )

    def values(self) -> tuple[str, str, str, str]:
        return (self.mmarjob, self.step, self.node_rank, self.local_rank)


class GPUMemoryCollector(Collector):
    """GPU memory of this process's current CUDA device, read at scrape time.

    Reading at scrape time (not per iteration) keeps the numbers fresh during validation and
    checkpointing too, and costs the training loop nothing. Without CUDA the families are
    exported with no samples, so dashboards show "no data" rather than a false 0.
    """

    _FAMILIES = (
        ("mmar_gpu_memory_allocated_bytes", "GPU memory held by tensors of this process", "memory_allocated"),
        ("mmar_gpu_memory_reserved_bytes", "GPU memory reserved by this process's caching allocator", "memory_reserved"),
        ("mmar_gpu_memory_max_allocated_bytes", "Peak GPU memory held by tensors of this process", "max_memory_allocated"),
    )

    def __init__(self, labels: RunLabels | None = None) -> None:
        self._labels = labels or RunLabels()

    def set_labels(self, labels: RunLabels) -> None:
        self._labels = labels

    def collect(self) -> Iterable[GaugeMetricFamily]:
        import torch  # the runtime always has torch; imported here so the module loads fast

        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        device = torch.cuda.current_device() if cuda else None
        for name, doc, reader in self._FAMILIES:
            family = GaugeMetricFamily(name, doc, labels=(*LABELS, "device"))
            if cuda:
                value = getattr(torch.cuda, reader)(device)
                family.add_metric((*self._labels.values(), f"cuda:{device}"), float(value))
            yield family


class RuntimeMetrics:
    """The runtime's metric families, registered in one registry, and the handlers feeding them."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.epoch = Gauge("mmar_train_epoch", "Current training epoch (1-based)", LABELS, registry=registry)
        self.max_epochs = Gauge("mmar_train_max_epochs", "Number of epochs the run will train", LABELS, registry=registry)
        self.iteration = Gauge(
            "mmar_train_iteration", "Training iterations (optimizer steps) done since the start of the run",
            LABELS, registry=registry,
        )
        self.loss = Gauge("mmar_train_loss", "Training loss of the last iteration", LABELS, registry=registry)
        self.samples = Counter(
            "mmar_samples", "Samples processed by this process", (*LABELS, "engine"), registry=registry,
        )
        self.samples_per_second = Gauge(
            "mmar_samples_per_second", "Samples per second over the current epoch so far",
            (*LABELS, "engine"), registry=registry,
        )
        self.data_wait = Histogram(
            "mmar_data_loading_wait_seconds", "Time the engine waited for the data loader to yield a batch",
            (*LABELS, "engine"), buckets=_WAIT_BUCKETS, registry=registry,
        )
        self.key_metric = Gauge(
            "mmar_validation_key_metric", "Validation key metric of the last validation round",
            (*LABELS, "metric"), registry=registry,
        )
        self.best_key_metric = Gauge(
            "mmar_validation_best_key_metric", "Best validation key metric so far", (*LABELS, "metric"), registry=registry,
        )
        self.best_epoch = Gauge(
            "mmar_validation_best_epoch", "Epoch that gave the best validation key metric", LABELS, registry=registry,
        )
        self.gpu = GPUMemoryCollector()
        registry.register(self.gpu)

    # -- wiring ------------------------------------------------------------------------------

    def attach(self, trainer: Any, evaluator: Any = None, labels: RunLabels | None = None) -> None:
        """Register ignite handlers on a MONAI ``SupervisedTrainer`` (and ``SupervisedEvaluator``)."""
        from ignite.engine import Events

        labels = labels or RunLabels()
        values = labels.values()
        self.gpu.set_labels(labels)

        self._attach_throughput(trainer, "train", values)

        def on_started(engine: Any) -> None:
            self.max_epochs.labels(*values).set(engine.state.max_epochs or 0)
            self.epoch.labels(*values).set(engine.state.epoch)
            self.iteration.labels(*values).set(engine.state.iteration)

        def on_epoch_started(engine: Any) -> None:
            self.epoch.labels(*values).set(engine.state.epoch)

        def on_iteration_completed(engine: Any) -> None:
            self.iteration.labels(*values).set(engine.state.iteration)
            loss = _loss_of(engine.state.output)
            if loss is not None:
                self.loss.labels(*values).set(loss)

        trainer.add_event_handler(Events.STARTED, on_started)
        trainer.add_event_handler(Events.EPOCH_STARTED, on_epoch_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, on_iteration_completed)

        if evaluator is not None:
            self._attach_throughput(evaluator, "validation", values)

            def on_validation_completed(engine: Any) -> None:
                # MONAI's Workflow updates best_metric in its own EPOCH_COMPLETED handler,
                # registered at construction, so it has already run when this one does.
                name = getattr(engine.state, "key_metric_name", None)
                if not name or name not in engine.state.metrics:
                    return
                self.key_metric.labels(*values, name).set(float(engine.state.metrics[name]))
                if getattr(engine.state, "best_metric_epoch", -1) != -1:
                    self.best_key_metric.labels(*values, name).set(float(engine.state.best_metric))
                    self.best_epoch.labels(*values).set(engine.state.best_metric_epoch)

            evaluator.add_event_handler(Events.EPOCH_COMPLETED, on_validation_completed)

    def _attach_throughput(self, engine: Any, kind: str, values: tuple[str, ...]) -> None:
        from ignite.engine import Events

        samples = self.samples.labels(*values, kind)
        rate = self.samples_per_second.labels(*values, kind)
        wait = self.data_wait.labels(*values, kind)
        clock: dict[str, float] = {}

        def on_epoch_started(_: Any) -> None:
            clock["epoch_start"] = time.perf_counter()
            clock["epoch_samples"] = 0.0

        def on_get_batch_started(_: Any) -> None:
            clock["fetch_start"] = time.perf_counter()

        def on_get_batch_completed(_: Any) -> None:
            start = clock.pop("fetch_start", None)
            if start is not None:
                wait.observe(time.perf_counter() - start)

        def on_iteration_completed(e: Any) -> None:
            n = _batch_size(e.state.batch)
            samples.inc(n)
            clock["epoch_samples"] = clock.get("epoch_samples", 0.0) + n
            elapsed = time.perf_counter() - clock.get("epoch_start", time.perf_counter())
            if elapsed > 0:
                rate.set(clock["epoch_samples"] / elapsed)

        engine.add_event_handler(Events.EPOCH_STARTED, on_epoch_started)
        engine.add_event_handler(Events.GET_BATCH_STARTED, on_get_batch_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, on_get_batch_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, on_iteration_completed)


def _loss_of(output: Any) -> float | None:
    """The iteration's loss from a MONAI trainer output (a dict, or a decollated list of dicts)."""
    from monai.utils import CommonKeys

    # After decollation every item carries the same batch loss: the first one is it.
    item = output[0] if isinstance(output, (list, tuple)) and output else output
    if not isinstance(item, Mapping) or CommonKeys.LOSS not in item:
        return None
    loss = item[CommonKeys.LOSS]
    return float(loss.item() if hasattr(loss, "item") else loss)


def _batch_size(batch: Any) -> int:
    """Samples in a batch: decollated list, collated dict of tensors, tensor, or (image, label) tuple."""
    if isinstance(batch, list) and batch and isinstance(batch[0], dict):
        return len(batch)
    if isinstance(batch, Mapping):
        for value in batch.values():
            if hasattr(value, "shape") and len(value.shape) > 0:
                return int(value.shape[0])
        return 0
    if hasattr(batch, "shape") and len(batch.shape) > 0:
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0]) if not isinstance(batch[0], Mapping) else len(batch)
    return 0


# -- process-wide entry point ------------------------------------------------------------------

_lock = threading.Lock()
_process_metrics: RuntimeMetrics | None = None
_server_port: int | None = None


def metrics_port(env: Mapping[str, str] | None = None) -> int | None:
    """This process's metrics port (base + LOCAL_RANK), or None when metrics are off."""
    env = os.environ if env is None else env
    raw = env.get(PORT_ENV, "").strip()
    if not raw:
        return None
    try:
        base = int(raw)
        local_rank = int(env.get("LOCAL_RANK", "0") or "0")
    except ValueError:
        raise MMARError(
            f"environment: {PORT_ENV}={raw!r} and LOCAL_RANK={env.get('LOCAL_RANK')!r} must be integers"
        ) from None
    port = base + local_rank
    if not 0 < port < 65536:
        raise MMARError(f"environment: {PORT_ENV}={raw!r} + LOCAL_RANK={local_rank} gives port {port}, not in 1..65535")
    return port


def attach_from_env(trainer: Any, evaluator: Any = None) -> None:
    """Serve this process's metrics and feed them from ``trainer``/``evaluator``; no-op without MMAR_METRICS_PORT.

    The HTTP server starts once per process; later calls (e.g. a validate step after a train step
    in the same process) only attach handlers to the new engines.
    """
    global _process_metrics, _server_port
    port = metrics_port()
    if port is None:
        return
    with _lock:
        if _process_metrics is None:
            _process_metrics = RuntimeMetrics(REGISTRY)
        if _server_port is None:
            addr = os.environ.get(ADDR_ENV, "0.0.0.0")
            try:
                start_http_server(port, addr=addr, registry=REGISTRY)
            except OSError as exc:
                raise MMARError(f"environment: {PORT_ENV}: cannot serve metrics on {addr}:{port}: {exc}") from exc
            _server_port = port
    _process_metrics.attach(trainer, evaluator, RunLabels.from_env())
