"""`mmar train`: the Clara training loop on MONAI's `SupervisedTrainer` and `SupervisedEvaluator`.

Batches, an optimizer minimizing the loss, validation every `num_training_epoch_per_valid` epochs over the
whole validation list, `model.ckpt` when the key metric improves, `model_final.ckpt` at the end, training
state every epoch so that re-running resumes after a crash or a kill.

What a run does with what `models/` already holds (`plan_run`, docs/runs.md): an unfinished run of the same
kind is resumed; a finished one is left alone (exit 0, nothing changed) unless `epochs` is raised (it goes
on) or `--restart` is given; a new run first moves the models it would replace to `models/previous/STAMP/`.
SIGTERM / SIGINT stop the loop at the next step (`handlers.StopAtSafePoint`); the state of the last
finished epoch is what a re-run resumes from.

Under torchrun (several processes, see `mmar.distributed`) the same loop runs data-parallel: the network
is wrapped in DistributedDataParallel, each rank trains on its shard of every epoch's permutation and
validates its share of the validation list (MONAI's metrics gather the per-case values), the learning rate
is scaled with the number of processes, and only rank 0 writes. The resume state is read by rank 0 and
broadcast, so only rank 0 needs to see `models/`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler
from monai.inferers import SimpleInferer
from monai.utils import set_determinism

from mmar import distributed
from mmar.archive import Archive, num_training_epoch_per_valid
from mmar.stop import STOP
from mmar.engine import checkpoint, mixup, precision, selection, transfer
from mmar.engine.data import AUTO_WORKERS, EpochBatches, InBackground, loader_workers, make_dataset, make_loader
from mmar.engine.handlers import (
    BestModelSaver, EpochSummary, EpochValidation, Progress, StateSaver, StopAtSafePoint, quiet_engine_errors,
)
from mmar.engine.weight_average import WeightAverage, ema_decay
from mmar.engine.workflow import (
    KeyedBatch, build_evaluator, dataset_transforms, device_for, has_list, keys_of, section_items, validation_loader,
)
from mmar.errors import MMARError
from mmar.tasks import get_task


def train(archive: Archive, *, finetune: bool = False, ckpt: str | None = None, restart: bool = False,
          log=print) -> dict[str, Any]:
    config = archive.config
    task = get_task(archive.task)
    epochs = int(config.get("epochs", 1))
    if epochs < 1:
        raise MMARError(f"config: epochs must be >= 1, got {epochs}")
    interval = num_training_epoch_per_valid(config)
    opts = distributed.options(config)
    ctx = distributed.setup(config)
    result = _train(archive, config, task, epochs, interval, opts, ctx, finetune=finetune, ckpt=ckpt,
                    restart=restart, log=log if ctx.is_main else _silent)
    # only after success: on an error this process exits and torchrun stops the others
    distributed.cleanup(ctx)
    return result


def _silent(*_args, **_kwargs) -> None:
    """The log of ranks other than 0: one copy of every line is enough (errors are raised, not logged)."""


def _train(archive: Archive, config, task, epochs: int, interval: int, opts, ctx: distributed.Context, *,
           finetune: bool, ckpt: str | None, restart: bool, log) -> dict[str, Any]:
    seed = config.get("determinism", {}).get("random_seed")
    if seed is not None:
        set_determinism(seed=int(seed))
    models_dir = archive.models_dir
    if ctx.is_main:
        models_dir.mkdir(parents=True, exist_ok=True)
    state_path = models_dir / checkpoint.STATE_FILE
    mode = "finetune" if finetune else "train"
    meta = {"task": archive.task, "network_config": config.get("network")}
    image_key, label_key = keys_of(config)
    keys = [image_key, label_key]

    # --- data (checked before anything heavy is built)
    train_items = section_items(archive, "train")
    val_key = config.get("validate", {}).get("datalist_key", "validation")
    val_items = section_items(archive, "validate") if has_list(archive, val_key) else None

    # --- the transforms are instantiated first, so that a config error in them is reported before anything
    # is read; so is the rest of the train section
    parser = archive.parser()
    cache_jobs = [("training", train_items, dataset_transforms(parser, "train", keys=keys, with_augmentation=True),
                   config["train"].get("cache"))]
    if val_items is not None:
        cache_jobs.append(("validation", distributed.shard(val_items, ctx),
                           dataset_transforms(parser, "validate", keys=keys, with_augmentation=False, plain=True),
                           config["validate"].get("cache")))
    device = device_for(archive)
    section = config["train"]
    workers = loader_workers(section.get("num_workers", 0), device.type, where="train#num_workers")
    batch_size = section.get("batch_size", 2)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MMARError(f"config: train#batch_size must be a whole number of cases (1 or more), got {batch_size!r}")
    decay = ema_decay(section.get("ema"))
    # the trainer's batches, mixed in pairs where train#mixup asks (classification; engine/mixup.py)
    prepare_batch = mixup.wrap(KeyedBatch(image_key, label_key), section.get("mixup"), task, config, log)

    # --- what models/ holds decides what this run does: rank 0 reads the state (and writes what a kill
    # left unwritten); the others get its plan, state included (their weights come from rank 0, via DDP)
    plan = distributed.broadcast_object(
        _prepare(models_dir, mode, epochs, restart=restart, log=log) if ctx.is_main else None, ctx)
    if plan.action == "finished":
        for key in ("network", "train#loss", "train#optimizer"):  # a config error is an error still
            parser.get_parsed_content(key)
        log(plan.message)
        return _finished_result(plan.state, mode, models_dir)
    resume = plan.state if plan.action == "resume" else None
    if val_items is None:
        log(f"no '{val_key}' list in the datalist: no validation; model.ckpt is the latest epoch's model")

    # --- the caches fill in a background thread while the network, the optimizer and, on a GPU, the CUDA
    # context are set up (reading and decompressing volumes release the GIL)
    caching = InBackground(lambda: _cache_datasets(keys, cache_jobs, log), name="mmar-cache")

    # --- components, from the config
    network = parser.get_parsed_content("network").to(device)
    loss = parser.get_parsed_content("train#loss")
    optimizer = parser.get_parsed_content("train#optimizer")
    factor = distributed.lr_factor(opts, ctx)
    distributed.scale_lr(optimizer, factor)  # before the scheduler reads the rates
    scheduler = parser.get_parsed_content("train#lr_scheduler") if section.get("lr_scheduler") else None
    wants_amp = bool(config.get("amp", False))
    if section.get("num_workers") == AUTO_WORKERS:
        log(f"loader: {workers} worker processes (train#num_workers {AUTO_WORKERS!r} on {device.type})")

    if ctx.is_main and finetune and resume is None:
        start = Path(ckpt) if ckpt else Path(archive.env.get("PRETRAIN_WEIGHTS_FILE") or models_dir / checkpoint.MODEL_FILE)
        # another label set (Clara's "pretrained model, then your own labels"): the output layer starts fresh
        transfer.load_allowing_new_labels(network, start, log)
        log(f"fine-tuning from {start}")
    elif ctx.is_main and ckpt and resume is None:
        transfer.load_allowing_new_labels(network, ckpt, log)
        log(f"initial weights from {ckpt}")
    train_precision = precision.for_device(distributed.wrap(network, ctx, device), device, wants_amp)
    # the averaged weights (train#ema) are the model: validated every epoch, saved as model.ckpt. Copied after
    # a fine-tuning start is loaded and after DDP has given every rank rank 0's weights (a resumed run
    # restores its own average below)
    averaged = WeightAverage(network, decay) if decay else None
    model = averaged.module if averaged else network
    if averaged:
        log(f"weights: exponential moving average, decay {decay} (train#ema), validated and saved")
    if wants_amp:
        log(f"precision: {train_precision.name}")

    datasets = caching.result()
    train_dataset, val_dataset = datasets[0], (datasets[1] if val_items is not None else None)
    sampler = distributed.train_sampler(train_dataset, ctx, distributed.shared_seed(seed, ctx))
    # all epochs through one loader iterator: the workers prepare the next epoch during validation
    train_batches = EpochBatches(sampler, batch_size, epochs, drop_small=_has_batch_norm(network))
    if train_batches.dropped_per_epoch:
        dropped = train_batches.dropped_per_epoch
        log(f"batches: {len(sampler)} cases in batches of {batch_size} would end each epoch with a batch of {dropped}, "
            f"too few for batch norm: each epoch leaves out its last {dropped} (different ones every epoch)")
    train_loader = make_loader(train_dataset, batch_sampler=train_batches, num_workers=workers)
    if ctx.enabled:
        log(distributed.parallel_summary(ctx, batch_size, factor, opts["warmup_epochs"],
                                         learning_rate=optimizer.param_groups[0]["lr"]))

    evaluator = None
    if val_items is not None:
        eval_precision = precision.for_device(model, device, wants_amp)
        val_loader = validation_loader(parser, cache_jobs[1][1], keys=keys, device=device, dataset=val_dataset,
                                       inferer=parser.get_parsed_content("validate#inferer"), log=log)
        evaluator = build_evaluator(parser, eval_precision.network, val_loader, device,
                                    amp=eval_precision.cuda_amp, amp_kwargs=eval_precision.amp_kwargs)

    trainer = SupervisedTrainer(
        device=device,
        max_epochs=epochs,
        train_data_loader=train_loader,
        epoch_length=train_batches.batches_per_epoch,  # the loader streams all epochs
        network=train_precision.network,
        optimizer=optimizer,
        loss_function=loss,
        inferer=SimpleInferer(),
        prepare_batch=prepare_batch,
        # from pinned memory, asynchronously: a blocking copy waits for the GPU to finish the previous step
        # before the host can queue the next (no measurable cost on an H200 today, bench/train_step.py,
        # but nothing here needs that wait)
        non_blocking=True,
        amp=train_precision.cuda_amp,
        amp_kwargs=train_precision.amp_kwargs,
        decollate=False,
    )
    if train_precision.cuda_amp and not train_precision.grad_scaler:
        precision.without_grad_scaler(trainer)
    if averaged:
        averaged.attach(trainer)  # first: every later ITERATION_COMPLETED handler sees this step's average
    progress = Progress(config.get("validate", {}).get("key_metric") if evaluator else None)
    if evaluator is not None:
        log(f"model selection: rule {progress.rule}: model.ckpt holds {selection.why(progress.rule, progress.key_metric)} "
            "(engine/selection.py; model_final.ckpt the last epoch)")

    # --- handlers, in the order they must run at the end of an epoch
    if seed is not None:
        trainer.add_event_handler(Events.EPOCH_STARTED, _reseed(int(seed), train_dataset, ctx.rank))
    if factor > 1:
        distributed.LinearWarmUp(optimizer, factor, opts["warmup_epochs"] * train_batches.batches_per_epoch).attach(trainer)
    if evaluator is not None:
        EpochValidation(evaluator, interval).attach(trainer)
    if ctx.is_main and resume is None:
        # last thing before the first write: a run that failed on its input has moved nothing
        _move_aside_logged(models_dir, restart, log)
    best = BestModelSaver(progress, evaluator, model, models_dir, meta, log, write=ctx.is_main)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, best.judge)
    saved_epoch = int(resume["trainer"]["epoch"]) if resume is not None else 0
    run_name = resume.get("tensorboard_run") if resume is not None else None
    run_name = run_name or f"{mode}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    # a resume hides the points its killed predecessor wrote after the saved epoch (they are redone)
    run_folder = models_dir / RUNS_DIR / run_name
    unsaved = _mark_unsaved(run_folder, fresh=resume is None) if ctx.is_main else None  # before the folder's first file
    writer = _tensorboard(run_folder, purge_step=saved_epoch + 1 if resume else None) if ctx.is_main else None
    if writer is None and unsaved is not None:  # no tensorboard installed: no folder either
        unsaved.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_folder.rmdir()
        unsaved = None
    EpochSummary(progress, optimizer, evaluator, models_dir, writer, task.extra_scalars, log, ctx=ctx).attach(trainer)
    if scheduler is not None:
        LrScheduleHandler(scheduler, print_lr=False).attach(trainer)
    objects = {"model": network, "optimizer": optimizer, "lr_scheduler": scheduler,
               "scaler": getattr(trainer, "scaler", None), "ema": averaged}
    state_saver = StateSaver(state_path, objects, progress, mode, write=ctx.is_main, saved_epoch=saved_epoch,
                             extra={"meta": meta, "tensorboard_run": run_name})
    state_saver.attach(trainer)
    if unsaved is not None:  # the run's first state names its TensorBoard folder: no longer an orphan if killed
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _engine: unsaved.unlink(missing_ok=True))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, best.save)  # after the state: see engine/handlers.py
    StopAtSafePoint(STOP, state_saver).attach(trainer, evaluator)  # last: an epoch's files are all written
    quiet_engine_errors(trainer, evaluator)
    if ctx.is_main:
        _progress_bar(trainer)
    _attach_metrics(trainer, evaluator)

    if resume is not None:
        _restore(resume, objects, progress, trainer, epochs)
        train_batches.first_epoch = trainer.state.epoch + 1  # the loader's stream starts after the saved epoch
        log(f"resuming {mode} from {state_path} after epoch {trainer.state.epoch}"
            + (f" (epochs raised to {epochs})" if resume.get("complete") else ""))

    started = time.perf_counter()
    try:
        with distributed.explain_timeouts(ctx), STOP.graceful():
            trainer.run()
        if ctx.is_main:
            checkpoint.save_model(models_dir / checkpoint.FINAL_FILE, model, epoch=trainer.state.epoch, **meta)
    finally:
        if writer is not None:
            writer.close()
    minutes = (time.perf_counter() - started) / 60
    result = {
        "command": "finetune" if finetune else "train",
        "epochs": trainer.state.epoch,
        "key_metric": progress.key_metric,
        "best_metric": None if progress.best_metric == float("-inf") else progress.best_metric,
        "best_epoch": progress.best_epoch,
        "minutes": round(minutes, 2),
        "models_dir": str(models_dir),
    }
    if ctx.enabled:
        result["processes"] = ctx.world_size
    log(f"done: {trainer.state.epoch} epochs in {minutes:.1f} min; {_outcome(progress.state_dict())}; "
        f"models in {models_dir}")
    return result


def _outcome(progress: dict[str, Any]) -> str:
    """What model.ckpt is, in words: the best validated epoch, or (without validation) the latest."""
    best, best_epoch = progress.get("best_metric"), progress.get("best_epoch")
    if best_epoch and best is not None and best != float("-inf"):
        return f"best {progress.get('key_metric') or 'key metric'} {best:.4f} at epoch {best_epoch} (model.ckpt)"
    return f"no validation: model.ckpt is the model of epoch {progress.get('model_epoch') or '?'}"


def _has_batch_norm(network) -> bool:
    return any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in network.modules())


RUNS_DIR = "runs"  # TensorBoard: models/runs/<mode>-<UTC start>/, one folder per run (a resume continues its own)
# in a run's TensorBoard folder until its first state is written: a run killed before that left an orphan
UNSAVED_MARK = ".no-state-yet"
# what a new run replaces (TensorBoard runs are not replaced: each has its own folder under runs/)
TRAINING_OUTPUTS = (checkpoint.MODEL_FILE, checkpoint.FINAL_FILE, checkpoint.STATE_FILE, "training_curves.png")
PREVIOUS_DIR = "previous"


@dataclass(frozen=True)
class Plan:
    """What this run does with what models/ holds: "fresh", "resume" (`state`) or "finished" (`message`)."""

    action: str
    state: dict[str, Any] | None = None
    message: str = ""


def plan_run(state: dict[str, Any] | None, mode: str, epochs: int, *, restart: bool,
             models_dir: Path | str = "models") -> Plan:
    """Decide from the state on disk (pure: nothing is read or written here).

    - no state, or `--restart`: a new run;
    - a run of the same kind (train / finetune) with fewer epochs than `epochs`: resume it (an unfinished
      run after a crash or a stop; a finished one whose `epochs` was raised goes on);
    - a run of the same kind with `epochs` or more: finished, nothing to do;
    - `--finetune` over a training run: a new (fine-tuning) run, from its model.ckpt;
    - `train` over a fine-tuning run: finished if that one is, else an error (resume it with --finetune).
    """
    if state is None or restart:
        return Plan("fresh")
    saved = int(state["trainer"]["epoch"])
    kind = state.get("mode", "train")
    what = "fine-tuning" if kind == "finetune" else "training"
    command = "mmar train" + (" --finetune" if kind == "finetune" else "")
    progress = state.get("progress", {})
    done = (f"{what} in {models_dir} already finished {saved} epochs; {_outcome(progress)}" if state.get("complete")
            else f"{what} in {models_dir} already has {saved} epochs (epochs={epochs} asked)")
    advice = (f"To go on, raise epochs (e.g. `{command} ... --set epochs={saved + max(1, saved // 2)}` continues "
              f"from epoch {saved + 1}); to start over, add --restart (the current models are moved to "
              f"{models_dir}/{PREVIOUS_DIR}/, not deleted)")
    if kind == mode:
        if saved < epochs:
            return Plan("resume", state)
        return Plan("finished", state, f"{done}. Nothing to do, nothing changed. {advice}")
    if mode == "finetune":
        return Plan("fresh")
    if state.get("complete"):
        return Plan("finished", state, (
            f"asked for a training (`mmar train` without --finetune), but {models_dir} holds a finished fine-tuning "
            f"({saved} epochs; {_outcome(progress)}). Nothing to do, nothing changed. To train from scratch, add "
            f"--restart (the current models are moved to {models_dir}/{PREVIOUS_DIR}/, not deleted); to fine-tune "
            f"further, `mmar train --finetune ... --set epochs={saved + max(1, saved // 2)}`"))
    raise MMARError(f"{models_dir}/{checkpoint.STATE_FILE} holds an unfinished fine-tuning ({saved} of "
                    f"{state['trainer'].get('max_epochs', '?')} epochs): resume it with `mmar train --finetune`, or "
                    "start training over with --restart (its models are moved aside, not deleted)")


def _prepare(models_dir: Path, mode: str, epochs: int, *, restart: bool, log) -> Plan:
    """Rank 0: read the state, write what a kill left unwritten, and decide."""
    state = checkpoint.load_state(models_dir / checkpoint.STATE_FILE)
    if state is not None:
        checkpoint.repair_models(models_dir, state, log)
    remove_orphan_runs(models_dir, state, log)
    return plan_run(state, mode, epochs, restart=restart, models_dir=models_dir)


def remove_orphan_runs(models_dir: Path, state: dict[str, Any] | None, log=print) -> list[str]:
    """Remove the TensorBoard folders of runs killed before their first state (they hold the points of an
    epoch no run will resume: the next run starts over in a folder of its own, and TensorBoard would show
    both). Such a folder still has its `UNSAVED_MARK`; the folder the current state names is kept whatever it
    holds. Called holding the MMAR's lock: no writer of those folders is alive."""
    runs = models_dir / RUNS_DIR
    keep = state.get("tensorboard_run") if state else None
    removed = []
    for mark in sorted(runs.glob(f"*/{UNSAVED_MARK}")) if runs.is_dir() else []:
        folder = mark.parent
        if folder.name == keep:
            mark.unlink(missing_ok=True)  # its state was written; the mark outlived it by a kill
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
    if removed:
        log(f"removed TensorBoard run(s) {', '.join(removed)} from {runs}: stopped before their first epoch was "
            "saved (the run that follows starts over)")
    return removed


def _mark_unsaved(folder: Path, *, fresh: bool) -> Path | None:
    """A new run's folder gets the mark until its first state is written; a resumed one never needs it."""
    mark = folder / UNSAVED_MARK
    if not fresh:
        mark.unlink(missing_ok=True)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    mark.touch()
    return mark


def _move_aside_logged(models_dir: Path, restart: bool, log) -> None:
    moved = move_aside(models_dir)
    if moved:
        where = Path(next(iter(moved.values()))).parent
        log(f"{'--restart: ' if restart else ''}the models this run replaces are kept in {where}")


def move_aside(models_dir: Path) -> dict[str, str]:
    """Move the files a training run writes to models/previous/<UTC stamp>/ (old path -> new path)."""
    present = [models_dir / name for name in TRAINING_OUTPUTS if (models_dir / name).exists()]
    if not present:
        return {}
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = models_dir / PREVIOUS_DIR / stamp
    suffix = 1
    while target.exists():
        suffix += 1
        target = models_dir / PREVIOUS_DIR / f"{stamp}-{suffix}"
    target.mkdir(parents=True)
    moved = {}
    for path in present:
        os.replace(path, target / path.name)  # same file system: a rename, whole folders included
        moved[str(path)] = str(target / path.name)
    return moved


def _finished_result(state: dict[str, Any], mode: str, models_dir: Path) -> dict[str, Any]:
    """The result of a re-run that found the training finished: the finished run's own figures."""
    progress = state.get("progress", {})
    best = progress.get("best_metric")
    return {
        "command": mode,
        "epochs": int(state["trainer"]["epoch"]),
        "key_metric": progress.get("key_metric"),
        "best_metric": None if best is None or best == float("-inf") else float(best),
        "best_epoch": int(progress.get("best_epoch", 0)),
        "minutes": 0.0,
        "models_dir": str(models_dir),
    }


def _cache_datasets(keys, jobs, log) -> list:
    """The datasets of `jobs` ((what, items, (deterministic, random) transforms, cache config) each), cached one
    after the other: each caches with its own threads."""
    datasets = []
    for what, items, transforms, cache in jobs:
        started = time.perf_counter()
        dataset = make_dataset(items, *transforms, keys=keys, cache=cache, log=log)
        _log_cached(log, what, dataset, len(items), started)
        datasets.append(dataset)
    return datasets


def _log_cached(log, what: str, dataset, total: int, started: float) -> None:
    """How long preprocessing the cache took: most of the start-up of a run on a GPU."""
    cached = getattr(dataset, "cache_num", 0)
    if cached:
        log(f"cache: {cached} of {total} {what} cases preprocessed in {time.perf_counter() - started:.1f} s")


def _restore(state, objects, progress: Progress, trainer, epochs: int) -> None:
    checkpoint.unwrap(objects["model"]).load_state_dict(state["model"])
    saved = state["trainer"]
    for name in ("optimizer", "lr_scheduler", "scaler", "ema"):
        # an empty scaler state comes from a disabled (bf16) scaler: nothing to restore into an fp16 one
        if objects.get(name) is not None and state.get(name):
            if name == "lr_scheduler" and saved.get("max_epochs", epochs) != epochs and _replays(objects[name]):
                _replay_schedule(objects[name], objects["optimizer"], saved["epoch"])
                continue
            objects[name].load_state_dict(state[name])
    if objects.get("ema") is not None and not state.get("ema"):
        objects["ema"].restart()  # train#ema was switched on for this resume: average from the restored weights
    progress.load_state_dict(state.get("progress", {}))
    if saved["epoch"] >= epochs:
        raise MMARError(f"training state {saved['epoch']} epochs >= epochs={epochs}; nothing to resume")
    trainer.state.epoch = saved["epoch"]
    trainer.state.iteration = saved["iteration"]


def _replays(scheduler) -> bool:
    """Whether the schedule is a function of the epoch count (stepped once an epoch, no metric)."""
    from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

    return isinstance(scheduler, LRScheduler) and not isinstance(scheduler, ReduceLROnPlateau)


def _replay_schedule(scheduler, optimizer, epochs_done: int) -> None:
    """`epochs` changed since the state was saved (a finished run extended): the learning rate follows the
    schedule of a run of the new length, configured afresh (e.g. cosine's T_max = epochs), stepped through the
    epochs done. Restoring the saved schedule would go on from the end of the old one: cosine at its minimum,
    a learning rate of 0 for the first added epoch."""
    import warnings

    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": a replay, on purpose
        for _ in range(epochs_done):
            scheduler.step()


RANK_SEED_STRIDE = 1_000_003  # a prime: rank r's seeds never meet rank 0's for any sane number of epochs


def _reseed(seed: int, dataset, rank: int = 0):
    """Seed each epoch from (seed, epoch), so that a run is reproducible from its seed.

    With `num_workers: 0` the augmentations run here, and a resumed run draws the same ones as an unbroken
    run. Loader workers (persistent, fed one stream of epochs) are seeded once, when they start, from the
    generator seeded here for the first epoch they serve: a run is then reproducible from its start, and a
    resumed one draws other (equally random) augmentations. Every rank draws its own augmentations (offset
    by its rank); rank 0 draws what a single process would.
    """

    def handler(engine):
        epoch_seed = seed + engine.state.epoch + RANK_SEED_STRIDE * rank
        set_determinism(seed=epoch_seed)
        transform = getattr(dataset, "transform", None)
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=epoch_seed)

    return handler


def _tensorboard(folder: Path, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an extra of monai; training goes on without event files
        return None
    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)


def _progress_bar(trainer) -> None:
    if not sys.stderr.isatty():
        return  # logs of pods and CI: the one-line epoch summary is enough
    from ignite.handlers import ProgressBar

    ProgressBar(persist=False).attach(trainer, output_transform=lambda output: {"loss": _loss(output)})


def _loss(output) -> float:
    from mmar.engine.handlers import loss_of

    return loss_of(output)


def _attach_metrics(trainer, evaluator) -> None:
    try:
        from mmar.engine.prometheus import attach_from_env
    except ImportError:
        return
    attach_from_env(trainer, evaluator)
