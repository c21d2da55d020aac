"""Datasets and loaders for a section of the recipe (train / validate / infer).

Deterministic preprocessing is cached in memory (MONAI `CacheDataset`) and random augmentation runs on
the cached tensors, so a volume is decoded once per run, not once per epoch. The cache is bounded by a
share of the available RAM (`train#cache#max_ram_fraction`): when the data does not fit, only the share
that fits is cached, with a message, instead of the kernel killing the run. In a multi-process run each
process on a node caches its own copy (the shards change every epoch), so the share is split between them.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable, Iterator, Sequence

import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.data.utils import worker_init_fn
from monai.transforms import Compose
from torch.utils.data import BatchSampler, Sampler

from mmar.distributed import die_with_parent
from mmar.errors import MMARError
from mmar.transforms import nbytes_estimate

DEFAULT_RAM_FRACTION = 0.5


def available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def cache_rate_that_fits(
    items: Sequence[dict[str, Any]], keys: Sequence[str], requested: float, ram_fraction: float, log=print
) -> float:
    """The cache rate that keeps the cache under `ram_fraction` of the available memory."""
    if requested <= 0 or not items:
        return 0.0
    sample = items[: min(len(items), 8)]
    per_case = max(1, sum(nbytes_estimate(item, keys) for item in sample) // len(sample))
    # decoded volumes plus the working copies of the transforms: count 1.5x
    need = per_case * 1.5 * len(items) * requested
    # torchrun's LOCAL_WORLD_SIZE processes on this node each hold a cache
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    budget = available_ram_bytes() * ram_fraction / processes
    if need <= budget:
        return requested
    rate = max(0.0, requested * budget / need)
    log(
        f"cache: {len(items)} cases need about {need / 2**30:.1f} GiB, more than {ram_fraction:.0%} of the "
        f"available RAM ({budget / 2**30:.1f} GiB{f' for each of {processes} processes' if processes > 1 else ''}); caching {rate:.0%} of them, the rest is read each epoch "
        "(raise train#cache#max_ram_fraction or add RAM to cache all)"
    )
    return rate


def make_dataset(
    items: Sequence[dict[str, Any]],
    deterministic: Sequence[Any],
    random: Sequence[Any] = (),
    *,
    keys: Sequence[str],
    cache: dict[str, Any] | None = None,
    log=print,
) -> Dataset:
    cache = dict(cache or {})
    transforms = Compose([*deterministic, *random], log_stats=False)
    rate = cache_rate_that_fits(
        items, keys, float(cache.get("rate", 1.0)), float(cache.get("max_ram_fraction", DEFAULT_RAM_FRACTION)), log
    )
    if rate <= 0:
        return Dataset(list(items), transforms)
    workers = int(cache.get("num_workers", min(4, os.cpu_count() or 1)))
    return CacheDataset(list(items), transforms, cache_rate=rate, num_workers=workers, progress=False)


AUTO_WORKERS = "auto"


def loader_workers(value: Any, device_type: str, *, where: str, cpu_count: int | None = None,
                   local_processes: int | None = None) -> int:
    """A section's `num_workers`: a count, or "auto".

    "auto" is 2 on a CPU, where the cores are busy computing the network and 2 workers keep the data wait
    at about 2 % of a step. On a GPU a step of the default recipe takes about 15 ms and 2 workers leave the
    loop waiting for data 12 % of the time (H200, 16 cores: bench/train.py, docs/speed.md); 4 brought that
    to 5.2 %, and with the epochs streamed (`EpochBatches`) to 2.2 %, so "auto" there is 4 where each
    training process on the node has the cores for them.
    """
    if value == AUTO_WORKERS:
        if device_type != "cuda":
            return 2
        cpus = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
        processes = local_processes if local_processes is not None else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        per_process = cpus // max(1, processes)
        return max(2, min(4, per_process - 2))  # the main process and its pin-memory thread keep a core or two
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MMARError(f"config: {where} must be a count of loader processes (0 or more) or {AUTO_WORKERS!r}, "
                        f"got {value!r}")
    return value


class EpochBatches(Sampler):
    """The batches of epochs `first_epoch`..`epochs` as one stream: one loader iterator serves the whole run.

    A DataLoader gives a fresh iterator per epoch, and its persistent workers receive an epoch's indices
    only when that epoch asks for its first batch: the first step of every epoch waits for a whole batch to
    be prepared, and the workers sit idle while the previous epoch ends with validation. On a GPU, where a
    step of the default recipe takes about 15 ms, that wait is most of the loop's data wait. Streamed, the
    workers prepare the next epoch's first batches while the main process validates (ignite keeps drawing
    from one iterator across epochs when the trainer's `epoch_length` is the length of one epoch).

    The batches are exactly those of a per-epoch `BatchSampler` over `sampler` after `set_epoch(epoch)`
    (epochs count from 1, as ignite's, and as MONAI's workflow used to set them), so a single process and
    every rank of a data-parallel run see the same shards as before. A resumed run sets `first_epoch`.

    `drop_small` (a network with batch norm): an epoch whose last batch would hold a single case, or fewer
    than half a batch, ends that many cases early (torch's `drop_last`, for that epoch's scrap only).
    - Batch norm cannot train on one case (`Expected more than 1 value per channel`: 33 images in batches
      of 32).
    - A scrap of a few cases is worse than none: BreastMNIST's 546 images in batches of 32 end every epoch
      with a batch of 2, whose batch statistics (DenseNet121's last block works on 1x1 maps at 32 px:
      two values per channel) and full-rate step undid the epoch. The validation AUC stalled at 0.81-0.87
      and the training loss near the class prior's entropy; without that batch 0.92 (docs/classification.md).
    The cases left out are the last of that epoch's permutation, different ones every epoch, so every case
    is still trained on over the run. Every rank's shard has the same length, so all ranks drop alike. A
    list shorter than one batch is never cut.
    """

    def __init__(self, sampler, batch_size: int, epochs: int, first_epoch: int = 1, *, drop_small: bool = False):
        self.sampler, self.batch_size, self.epochs, self.first_epoch = sampler, batch_size, epochs, first_epoch
        self.drop_small = drop_small

    @property
    def dropped_per_epoch(self) -> int:
        """How many cases each epoch leaves out (see `drop_small`): 0, or its last batch's."""
        cases, size = len(self.sampler), self.batch_size
        rest = cases % size
        if not self.drop_small or size < 2 or cases < size or rest == 0:
            return 0
        return rest if rest == 1 or rest < size / 2 else 0

    @property
    def batches_per_epoch(self) -> int:
        cases = len(self.sampler) - self.dropped_per_epoch
        return -(-cases // self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch * max(0, self.epochs - self.first_epoch + 1)

    def __iter__(self) -> Iterator[list[int]]:
        for epoch in range(self.first_epoch, self.epochs + 1):
            self.sampler.set_epoch(epoch)
            yield from BatchSampler(self.sampler, self.batch_size, drop_last=self.dropped_per_epoch > 0)


DEFAULT_PREFETCH_BATCHES = 2  # per worker: torch's default


def make_loader(dataset: Dataset, *, num_workers: int, batch_size: int = 1, sampler=None,
                batch_sampler: Sampler | None = None, prefetch_factor: int = DEFAULT_PREFETCH_BATCHES,
                collate_fn=None) -> DataLoader:
    """A loader in dataset order, or in `sampler`'s; a `batch_sampler` (training: `EpochBatches`) decides
    the batches instead. Workers persist across iterators; batches are pinned where there is a GPU.
    `collate_fn`: MONAI's list_data_collate unless given."""
    batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size,
                                                                                    "sampler": sampler}
    return DataLoader(
        dataset,
        **batching,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        **({"prefetch_factor": prefetch_factor, "worker_init_fn": start_worker} if num_workers > 0 else {}),
        **({"collate_fn": collate_fn} if collate_fn is not None else {}),
    )


def start_worker(worker_id: int) -> None:
    """A loader worker's start: MONAI's (each worker's own random state for the transforms), and the worker
    dies with the process it serves, and only then.

    Without the second, a training process killed hard (torchrun stopping the other ranks after one failed,
    the OOM killer, `kill -9`) leaves its workers to notice it only at their next 5-second check, and a
    worker stopped while it holds a batch nobody will read can wait on it for good, keeping the job's
    output pipes open after the job has exited.

    Ctrl-C signals the whole process group, workers included: a worker that ended on it would fail the next
    batch, which the main process, stopping at its next safe point (mmar.stop.StopSignals), may still need. So
    workers ignore SIGINT. Not SIGTERM: it is how multiprocessing ends them at the main process's exit.
    """
    worker_init_fn(worker_id)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)


class InBackground:
    """`work()` in a daemon thread; `result()` waits for it and returns its value or raises its error.

    A daemon thread rather than a ThreadPoolExecutor's: when the main thread fails meanwhile (a config error,
    an unreadable checkpoint), the process reports that and exits at once instead of first waiting for the
    work, which for a large dataset's cache can take minutes.
    """

    def __init__(self, work: Callable[[], Any], *, name: str):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], Any]) -> None:
        try:
            self._value = work()
        except BaseException as error:  # handed to the caller of result()
            self._error = error

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

