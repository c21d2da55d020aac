"""Cross-cutting work of a training run, as ignite event handlers on MONAI's engines.

Written here rather than taken from MONAI's `CheckpointSaver` because Clara's contract is specific:
fixed names (`model.ckpt` only when the key metric improves, from a best that starts at -inf and survives
a resume; `model_final.ckpt` at the end), every write atomic, and one resumable state file per epoch.

Order at the end of an epoch (engine/train.py attaches them so): validation, the verdict on the model
(`BestModelSaver.judge`), the summary (terminal, TensorBoard, curves), the learning-rate step, the state
(`StateSaver`), then `model.ckpt` (`BestModelSaver.save`). The state is the record: a kill at any instant
leaves either the previous epoch's state with the previous model.ckpt, or this epoch's state, which holds
the weights a stale model.ckpt lacks (`checkpoint.repair_models`). TensorBoard points of an epoch written
before its state are hidden on resume (`purge_step`), so no epoch is drawn twice.

In a multi-process run every rank runs every handler (the bookkeeping must agree and the epoch summary
gathers numbers from all ranks), but only the writing rank (`write=True`, rank 0) touches files.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from ignite.engine import Engine, Events

from mmar import distributed
from mmar.stop import StopSignals, Stopped
from mmar.engine import checkpoint, selection
from mmar.errors import user_error
from mmar.io import atomic_write


class Progress:
    """Run bookkeeping shared by the handlers: the selected model's key metric and epoch (`best_metric`,
    `best_epoch`: the epoch the selection rule picked, mmar.engine.selection), the validations the rule decides
    from, the epoch history (all kept across a resume)."""

    def __init__(self, key_metric: str | None, rule: str = selection.RULE):
        self.key_metric = key_metric
        self.rule = rule
        self.best_metric = -math.inf
        self.best_epoch = 0
        self.model_epoch = 0  # the epoch whose weights model.ckpt holds (or is about to: see BestModelSaver)
        self.history: list[dict[str, Any]] = []
        # every validation: its epoch, key metric and that metric's standard error (the rule's input)
        self.validations: dict[str, list[float]] = {"epochs": [], "values": [], "noise": []}

    def state_dict(self) -> dict[str, Any]:
        return {"key_metric": self.key_metric, "best_metric": self.best_metric, "best_epoch": self.best_epoch,
                "model_epoch": self.model_epoch, "history": self.history, "selection_rule": self.rule,
                "validations": self.validations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_metric = float(state.get("best_metric", -math.inf))
        self.best_epoch = int(state.get("best_epoch", 0))
        self.model_epoch = int(state.get("model_epoch", self.best_epoch))
        self.history = list(state.get("history", []))
        validations = state.get("validations")
        if validations is None:  # a state from before the rules: the history has the values, not their noise
            records = [r for r in self.history if self.key_metric and self.key_metric in r]
            validations = {"epochs": [r["epoch"] for r in records], "values": [r[self.key_metric] for r in records],
                           "noise": [math.nan] * len(records)}
        self.validations = {key: list(values) for key, values in validations.items()}

    def selection(self) -> dict[str, Any] | None:
        """Which rule picked which epoch of model.ckpt, and why (the checkpoint and metrics.json keep it)."""
        if not self.key_metric or not self.best_epoch:
            return None
        return selection.record(self.rule, self.key_metric, self.best_epoch, self.best_metric)


class EpochValidation:
    """Run the evaluator every `interval` epochs and after the last epoch (so a best model always exists)."""

    def __init__(self, evaluator: Engine, interval: int):
        self.evaluator, self.interval = evaluator, interval

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, trainer: Engine) -> None:
        epoch = trainer.state.epoch
        if epoch % self.interval == 0 or epoch == trainer.state.max_epochs:
            self.evaluator.run(global_epoch=epoch)


class BestModelSaver:
    """`model.ckpt` whenever the selection rule picks the epoch just validated (mmar.engine.selection: `best`
    is Clara's "the key metric beats the best so far", from -inf).

    Two steps, attached apart: `judge` decides (in `Progress`, which the state records) and `save` writes,
    after the state. Without a validation list the latest epoch's model is the one to use."""

    def __init__(self, progress: Progress, evaluator: Engine | None, network, models_dir: Path, meta: dict, log=print,
                 *, write: bool = True):
        self.progress, self.evaluator, self.network = progress, evaluator, network
        self.path = Path(models_dir) / checkpoint.MODEL_FILE
        self.meta, self.log, self.write = meta, log, write

    def attach(self, trainer: Engine) -> None:
        """Both steps at once: for a run without a state in between (tests)."""
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, trainer: Engine) -> None:
        self.judge(trainer)
        self.save(trainer)

    def judge(self, trainer: Engine) -> None:
        epoch = trainer.state.epoch
        if self.evaluator is None:
            self.progress.model_epoch = epoch
            return
        if self.evaluator.state.epoch != epoch or not self.evaluator.state.metrics:
            return  # no validation this epoch
        key = self.progress.key_metric
        value = float(self.evaluator.state.metrics[key])
        details = (getattr(self.evaluator.state, "metric_details", None) or {}).get(key)
        seen = self.progress.validations
        seen["epochs"].append(epoch)
        seen["values"].append(value)
        seen["noise"].append(metric_noise(details))
        if selection.chooses(self.progress.rule, seen["values"], seen["noise"], self.progress.best_epoch,
                             seen["epochs"], getattr(trainer.state, "max_epochs", None) or epoch):
            self.progress.best_metric, self.progress.best_epoch = value, epoch
            self.progress.model_epoch = epoch

    def save(self, trainer: Engine) -> None:
        epoch = trainer.state.epoch
        if not self.write or self.progress.model_epoch != epoch:
            return
        if self.evaluator is None:
            checkpoint.save_model(self.path, self.network, epoch=epoch, **self.meta)
            return
        value = self.progress.best_metric
        checkpoint.save_model(
            self.path, self.network, epoch=epoch, key_metric=self.progress.key_metric, metric=value,
            selection=self.progress.selection(), **self.meta
        )
        self.log(f"epoch {epoch}: new best {self.progress.key_metric} {value:.4f} -> {self.path} "
                 f"(rule {self.progress.rule}: {selection.why(self.progress.rule, self.progress.key_metric)})")


def metric_noise(details: Any) -> float:
    """The standard error of a validation's key metric from its details: a classification summary's
    `standard_error` (mmar.classification_metrics), or the per-case values of a metric such as MeanDice
    (cases x classes: the standard error of the mean over cases). NaN when the details do not tell."""
    if isinstance(details, dict):
        value = details.get("mean_auc_standard_error", details.get("standard_error"))
        return float(value) if isinstance(value, (int, float)) else math.nan
    if details is None:
        return math.nan
    try:
        array = details.detach().float().cpu().numpy() if hasattr(details, "detach") else details
        import numpy as np

        array = np.asarray(array, dtype=float)
        array = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
        with np.errstate(all="ignore"):
            per_case = [float(np.nanmean(row)) for row in array if np.isfinite(row).any()]
    except (TypeError, ValueError):
        return math.nan
    return selection.mean_standard_error(per_case)


CURVES_INTERVAL_S = 30.0


class EpochSummary:
    """One line per epoch on the terminal, TensorBoard scalars, `training_curves.png`, and the history.

    With several processes the loss is the mean over every rank's iterations and the throughput counts
    every rank's samples (summed across ranks), so the history reads like a single-process run's.
    The PNG is redrawn at most every `CURVES_INTERVAL_S` seconds and after the last epoch: drawing it
    (matplotlib) takes about 75 ms, 4 % of an epoch of the default recipe on a GPU, for a picture
    nobody needs every epoch (the terminal line and TensorBoard are per epoch).
    """

    def __init__(self, progress: Progress, optimizer, evaluator: Engine | None, models_dir: Path,
                 writer=None, extra_scalars: Callable[[Engine], dict[str, float]] | None = None, log=print,
                 *, ctx: distributed.Context = distributed.SINGLE):
        self.progress, self.optimizer, self.evaluator = progress, optimizer, evaluator
        self.models_dir, self.writer, self.extra_scalars, self.log = Path(models_dir), writer, extra_scalars, log
        self.ctx = ctx
        self._losses: list[torch.Tensor] = []
        self._samples = 0
        self._started = 0.0
        self._data_wait = 0.0
        self._fetch_started = 0.0
        self._curves_due = 0.0

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.STARTED, self._run_started)
        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        trainer.add_event_handler(Events.GET_BATCH_STARTED, self._fetch_start)
        trainer.add_event_handler(Events.GET_BATCH_COMPLETED, self._fetch_done)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _run_started(self, trainer: Engine) -> None:
        self._curves_due = time.perf_counter() + CURVES_INTERVAL_S

    def _epoch_started(self, trainer: Engine) -> None:
        self._losses, self._samples, self._data_wait = [], 0, 0.0
        self._started = time.perf_counter()

    def _fetch_start(self, trainer: Engine) -> None:
        self._fetch_started = time.perf_counter()

    def _fetch_done(self, trainer: Engine) -> None:
        self._data_wait += time.perf_counter() - self._fetch_started

    def _iteration(self, trainer: Engine) -> None:
        # kept as a (device) tensor: reading it with .item() here would stall the GPU queue every step
        self._losses.append(loss_tensor(trainer.state.output))
        self._samples += batch_size_of(trainer.state.batch)

    def _epoch_completed(self, trainer: Engine) -> None:
        epoch = trainer.state.epoch
        seconds = time.perf_counter() - self._started
        epoch_loss = float(torch.stack(self._losses).sum()) if self._losses else 0.0  # one sync per epoch
        loss_sum, iterations, samples = distributed.sum_across([epoch_loss, len(self._losses), self._samples],
                                                               self.ctx)
        seconds = distributed.max_across(seconds, self.ctx)  # the epoch lasts as long as its slowest rank
        record: dict[str, Any] = {
            "epoch": epoch,
            "loss": loss_sum / max(1, iterations),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "seconds": seconds,
            "samples_per_second": samples / max(seconds, 1e-9),
            "data_wait_fraction": self._data_wait / max(seconds, 1e-9),
        }
        validated = self.evaluator is not None and self.evaluator.state.epoch == epoch and self.evaluator.state.metrics
        if validated:
            record.update({k: float(v) for k, v in self.evaluator.state.metrics.items() if _is_number(v)})
            if self.extra_scalars:
                record.update(self.extra_scalars(self.evaluator))
        self.progress.history.append(record)
        if not self.ctx.is_main:
            return
        line = f"epoch {epoch}/{trainer.state.max_epochs} loss {record['loss']:.4f} lr {record['lr']:.2e}"
        if validated and self.progress.key_metric:
            line += f" {self.progress.key_metric} {record[self.progress.key_metric]:.4f}"
            line += f" (best {self.progress.best_metric:.4f} @ {self.progress.best_epoch})"
        line += f" {seconds:.1f}s {record['samples_per_second']:.1f} samples/s"
        self.log(line)
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, epoch)
            self.writer.flush()
        now = time.perf_counter()
        if epoch >= trainer.state.max_epochs or now >= self._curves_due:
            write_curves(self.models_dir / "training_curves.png", self.progress.history, self.progress.key_metric)
            self._curves_due = now + CURVES_INTERVAL_S


class StateSaver:
    """Everything needed to resume, written atomically after every epoch (after validation)."""

    def __init__(self, path: Path, objects: dict[str, Any], progress: Progress, mode: str, *, write: bool = True,
                 extra: dict[str, Any] | None = None, saved_epoch: int = 0):
        self.path, self.objects, self.progress, self.mode = Path(path), objects, progress, mode
        self.write, self.extra = write, dict(extra or {})
        self.saved_epoch = saved_epoch  # the epoch the state file on disk holds (0: none of this run)

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, trainer: Engine) -> None:
        if not self.write:
            return
        state = {name: obj.state_dict() for name, obj in self.objects.items() if obj is not None}
        state["model"] = checkpoint.unwrap(self.objects["model"]).state_dict()
        state["trainer"] = {
            "epoch": trainer.state.epoch,
            "iteration": trainer.state.iteration,
            "max_epochs": trainer.state.max_epochs,
            "epoch_length": trainer.state.epoch_length,
        }
        state["progress"] = self.progress.state_dict()
        state["mode"] = self.mode
        state["complete"] = trainer.state.epoch >= trainer.state.max_epochs
        state.update(self.extra)
        checkpoint.save_state(self.path, state)
        self.saved_epoch = trainer.state.epoch


class StopAtSafePoint:
    """Ends the run at the next step boundary once SIGTERM or SIGINT was received (`mmar.stop.StopSignals`):
    after a training step, after a validation step (the partial validation counts for nothing), or after the
    end-of-epoch handlers (attach it last). The run then ends with `Stopped`, whose message says which
    epoch the resume state holds; nothing is half-written (every write is atomic and done, or undone)."""

    def __init__(self, signals: StopSignals, state: StateSaver):
        self.signals, self.state = signals, state

    def attach(self, trainer: Engine, evaluator: Engine | None = None) -> None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._check, trainer, "in")
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._check, trainer, "after")
        if evaluator is not None:
            evaluator.add_event_handler(Events.ITERATION_COMPLETED, self._check, trainer, "in the validation of")

    def _check(self, _engine: Engine, trainer: Engine, where: str) -> None:
        if self.signals.requested is None:
            return
        raise Stopped(self.signals.requested, self.describe(trainer.state.epoch, where))

    def describe(self, epoch: int, where: str) -> str:
        saved = self.state.saved_epoch
        if not saved:
            kept = "no epoch had finished, so there is nothing to resume: the same command starts over"
        else:
            kept = f"{self.state.path} holds epoch {saved}: run the same command again to go on from there"
        return f"training ended {where} epoch {epoch}; {kept}"


def quiet_engine_errors(*engines: Engine | None) -> None:
    """ignite logs `... run is terminating due to exception: ...` before it re-raises: for a data-loader
    worker's error that is the worker's whole traceback (80 lines), for Ctrl-C an empty message. A stop and
    a user error are reported by the CLI in one line: their log record is dropped (other errors keep it)."""
    for engine in engines:
        if engine is not None:
            engine.logger.addFilter(_not_reported_by_the_cli)


def _not_reported_by_the_cli(record) -> bool:
    if "terminating due to exception" not in str(record.msg):
        return True
    error = sys.exc_info()[1]
    if isinstance(error, (Stopped, KeyboardInterrupt)):
        return False
    return error is None or user_error(error) is None


def loss_tensor(output: Any) -> torch.Tensor:
    """The step's loss as a detached 0-d tensor, where it was computed (no device sync)."""
    if isinstance(output, list):
        output = output[0]
    value = output["loss"] if isinstance(output, dict) else output
    return value.detach().reshape(()).float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))


def loss_of(output: Any) -> float:
    if isinstance(output, list):
        output = output[0]
    value = output["loss"] if isinstance(output, dict) else output
    return value.item() if isinstance(value, torch.Tensor) else float(value)


def batch_size_of(batch: Any) -> int:
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                return int(value.shape[0])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    return 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)


def write_curves(path: Path, history: list[dict[str, Any]], key_metric: str | None) -> None:
    """Loss and key metric per epoch, for people who would rather look than read TensorBoard."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, loss_axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    epochs = [r["epoch"] for r in history]
    loss_axis.plot(epochs, [r["loss"] for r in history], color="tab:blue", label="training loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    if key_metric:
        points = [(r["epoch"], r[key_metric]) for r in history if key_metric in r]
        if points:
            metric_axis = loss_axis.twinx()
            metric_axis.plot(*zip(*points), color="tab:orange", marker="o", markersize=3, label=key_metric)
            metric_axis.set_ylabel(key_metric, color="tab:orange")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
