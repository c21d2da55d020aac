"""`mmar train`: the Clara training loop on MONAI's `SupervisedTrainer` and `SupervisedEvaluator`.

Batches, an optimizer minimizing the loss, validation every `num_training_epoch_per_valid` epochs over the
whole validation list, `model.ckpt` when the key metric improves, `model_final.ckpt` at the end, training
state every epoch so that re-running resumes after a crash or a kill.

Under torchrun (several processes, see `mmar.distributed`) the same loop runs data-parallel: the network
is wrapped in DistributedDataParallel, each rank trains on its shard of every epoch's permutation and
validates its share of the validation list (MONAI's metrics gather the per-case values), the learning rate
is scaled with the number of processes, and only rank 0 writes. The resume state is read by rank 0 and
broadcast, so only rank 0 needs to see `models/`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler
from monai.inferers import SimpleInferer
from monai.utils import set_determinism

from mmar import distributed
from mmar.archive import Archive, num_training_epoch_per_valid
from mmar.engine import checkpoint, precision
from mmar.engine.data import AUTO_WORKERS, EpochBatches, InBackground, loader_workers, make_dataset, make_loader
from mmar.engine.handlers import BestModelSaver, EpochSummary, EpochValidation, Progress, StateSaver
from mmar.engine.weight_average import WeightAverage, ema_decay
from mmar.engine.workflow import (
    KeyedBatch, build_evaluator, dataset_transforms, device_for, has_list, keys_of, section_items, validation_loader,
)
from mmar.errors import MMARError
from mmar.tasks import get_task


def train(archive: Archive, *, finetune: bool = False, ckpt: str | None = None, log=print) -> dict[str, Any]:
    config = archive.config
    task = get_task(archive.task)
    epochs = int(config.get("epochs", 1))
    if epochs < 1:
        raise MMARError(f"config: epochs must be >= 1, got {epochs}")
    interval = num_training_epoch_per_valid(config)
    opts = distributed.options(config)
    ctx = distributed.setup(config)
    result = _train(archive, config, task, epochs, interval, opts, ctx, finetune=finetune, ckpt=ckpt,
                    log=log if ctx.is_main else _silent)
    # only after success: on an error this process exits and torchrun stops the others
    distributed.cleanup(ctx)
    return result


def _silent(*_args, **_kwargs) -> None:
    """The log of ranks other than 0: one copy of every line is enough (errors are raised, not logged)."""


def _train(archive: Archive, config, task, epochs: int, interval: int, opts, ctx: distributed.Context, *,
           finetune: bool, ckpt: str | None, log) -> dict[str, Any]:
    seed = config.get("determinism", {}).get("random_seed")
    if seed is not None:
        set_determinism(seed=int(seed))
    models_dir = archive.models_dir
    if ctx.is_main:
        models_dir.mkdir(parents=True, exist_ok=True)
    image_key, label_key = keys_of(config)
    keys = [image_key, label_key]

    # --- data (checked before anything heavy is built)
    train_items = section_items(archive, "train")
    val_key = config.get("validate", {}).get("datalist_key", "validation")
    val_items = section_items(archive, "validate") if has_list(archive, val_key) else None
    if val_items is None:
        log(f"no '{val_key}' list in the datalist: no validation; model.ckpt is the latest epoch's model")
    else:
        val_items = distributed.shard(val_items, ctx)

    # --- the caches fill in a background thread while the network, the optimizer and, on a GPU, the CUDA
    # context are set up (reading and decompressing volumes release the GIL); the transforms are
    # instantiated here first, so that a config error in them is reported before anything is read
    parser = archive.parser()
    cache_jobs = [("training", train_items, dataset_transforms(parser, "train", keys=keys, with_augmentation=True),
                   config["train"].get("cache"))]
    if val_items is not None:
        cache_jobs.append(("validation", val_items,
                           dataset_transforms(parser, "validate", keys=keys, with_augmentation=False, plain=True),
                           config["validate"].get("cache")))
    caching = InBackground(lambda: _cache_datasets(keys, cache_jobs, log), name="mmar-cache")

    # --- components, from the config
    device = device_for(archive)
    network = parser.get_parsed_content("network").to(device)
    loss = parser.get_parsed_content("train#loss")
    optimizer = parser.get_parsed_content("train#optimizer")
    factor = distributed.lr_factor(opts, ctx)
    distributed.scale_lr(optimizer, factor)  # before the scheduler reads the rates
    section = config["train"]
    scheduler = parser.get_parsed_content("train#lr_scheduler") if section.get("lr_scheduler") else None
    wants_amp = bool(config.get("amp", False))
    workers = loader_workers(section.get("num_workers", 0), device.type, where="train#num_workers")
    batch_size = section.get("batch_size", 2)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MMARError(f"config: train#batch_size must be a whole number of cases (1 or more), got {batch_size!r}")
    decay = ema_decay(section.get("ema"))
    if section.get("num_workers") == AUTO_WORKERS:
        log(f"loader: {workers} worker processes (train#num_workers {AUTO_WORKERS!r} on {device.type})")

    state_path = models_dir / checkpoint.STATE_FILE
    mode = "finetune" if finetune else "train"
    # rank 0 decides and reads; the others get its copy (their weights also come from rank 0, via DDP)
    resume = distributed.broadcast_object(_resumable_state(state_path, mode, log) if ctx.is_main else None, ctx)
    if ctx.is_main and finetune and resume is None:
        start = Path(ckpt) if ckpt else Path(archive.env.get("PRETRAIN_WEIGHTS_FILE") or models_dir / checkpoint.MODEL_FILE)
        checkpoint.load_weights(network, start)
        log(f"fine-tuning from {start}")
    elif ctx.is_main and ckpt and resume is None:
        checkpoint.load_weights(network, ckpt)
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
    train_batches = EpochBatches(sampler, batch_size, epochs)
    train_loader = make_loader(train_dataset, batch_sampler=train_batches, num_workers=workers)
    if ctx.enabled:
        log(_parallel_summary(ctx, batch_size, factor, opts["warmup_epochs"]))

    evaluator = None
    if val_items is not None:
        eval_precision = precision.for_device(model, device, wants_amp)
        val_loader = validation_loader(parser, val_items, keys=keys, device=device, dataset=val_dataset,
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
        prepare_batch=KeyedBatch(image_key, label_key),
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

    # --- handlers, in the order they must run at the end of an epoch
    if seed is not None:
        trainer.add_event_handler(Events.EPOCH_STARTED, _reseed(int(seed), train_dataset, ctx.rank))
    if factor > 1:
        distributed.LinearWarmUp(optimizer, factor, opts["warmup_epochs"] * train_batches.batches_per_epoch).attach(trainer)
    if evaluator is not None:
        EpochValidation(evaluator, interval).attach(trainer)
    meta = {"task": archive.task, "network_config": config.get("network")}
    BestModelSaver(progress, evaluator, model, models_dir, meta, log, write=ctx.is_main).attach(trainer)
    writer = _tensorboard(models_dir) if ctx.is_main else None
    extra = getattr(task, "extra_scalars", None)
    EpochSummary(progress, optimizer, evaluator, models_dir, writer, extra, log, ctx=ctx).attach(trainer)
    if scheduler is not None:
        LrScheduleHandler(scheduler, print_lr=False).attach(trainer)
    objects = {"model": network, "optimizer": optimizer, "lr_scheduler": scheduler,
               "scaler": getattr(trainer, "scaler", None), "ema": averaged}
    StateSaver(state_path, objects, progress, mode, write=ctx.is_main).attach(trainer)
    if ctx.is_main:
        _progress_bar(trainer)
    _attach_metrics(trainer, evaluator)

    if resume is not None:
        _restore(resume, objects, progress, trainer, epochs)
        train_batches.first_epoch = trainer.state.epoch + 1  # the loader's stream starts after the saved epoch
        log(f"resuming {mode} from {state_path} after epoch {trainer.state.epoch}")

    started = time.perf_counter()
    with distributed.explain_timeouts(ctx):
        trainer.run()
    if ctx.is_main:
        checkpoint.save_model(models_dir / checkpoint.FINAL_FILE, model, epoch=trainer.state.epoch, **meta)
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
    log(f"done: {trainer.state.epoch} epochs in {minutes:.1f} min; best {progress.key_metric} "
        f"{result['best_metric']} at epoch {progress.best_epoch}; models in {models_dir}")
    return result


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


def _parallel_summary(ctx: distributed.Context, batch_size: int, factor: int, warmup_epochs: int) -> str:
    line = (f"data-parallel: {ctx.world_size} processes ({ctx.backend}), batch {batch_size} per process, "
            f"{batch_size * ctx.world_size} in all; ")
    if factor == 1:
        return line + "learning rate as configured (multi_gpu#lr_scaling is off)"
    line += f"learning rate x{factor} (linear scaling, arXiv 1706.02677)"
    return line + (f", reached after a {warmup_epochs}-epoch warm-up" if warmup_epochs else ", no warm-up")


def _resumable_state(path: Path, mode: str, log) -> dict[str, Any] | None:
    """An unfinished run of the same kind is resumed; a finished one is not (a new run starts)."""
    state = checkpoint.load_state(path)
    if state is None:
        return None
    if state.get("complete") or state.get("mode") != mode:
        return None
    return state


def _restore(state, objects, progress: Progress, trainer, epochs: int) -> None:
    checkpoint.unwrap(objects["model"]).load_state_dict(state["model"])
    for name in ("optimizer", "lr_scheduler", "scaler", "ema"):
        # an empty scaler state comes from a disabled (bf16) scaler: nothing to restore into an fp16 one
        if objects.get(name) is not None and state.get(name):
            objects[name].load_state_dict(state[name])
    if objects.get("ema") is not None and not state.get("ema"):
        objects["ema"].restart()  # train#ema was switched on for this resume: average from the restored weights
    progress.load_state_dict(state.get("progress", {}))
    saved = state["trainer"]
    if saved["epoch"] >= epochs:
        raise MMARError(f"training state {saved['epoch']} epochs >= epochs={epochs}; nothing to resume")
    trainer.state.epoch = saved["epoch"]
    trainer.state.iteration = saved["iteration"]


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


def _tensorboard(models_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an extra of monai; training goes on without event files
        return None
    return SummaryWriter(log_dir=str(models_dir))


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
