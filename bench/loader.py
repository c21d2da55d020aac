#!/usr/bin/env python
"""Data wait of the training loop at a GPU's pace: one loader iterator per epoch against one for the run.

The training step is simulated: the main process sleeps `--step-ms` per batch (what a GPU step of the
default recipe costs the host: about 15 ms on an H100/H200, bench/train_step.py) and `--pause-ms` after
every epoch (the per-epoch validation: about 0.4 s on an H200). Sleeping leaves the CPU to the loader's
workers, as a GPU step does, so this runs the real data path of `mmar train` (the default recipe's cached
dataset, augmentation and collation from `mmar init`, the engine's loader) on any machine, without a GPU.

Variants, measured in the same run, each for `--epochs` epochs after a first one (worker start-up) that
is not counted:
- `per-epoch`: a fresh iterator per epoch, as a DataLoader gives (what `mmar train` did before): the
  workers get an epoch's indices when its first batch is asked for;
- `stream`: one iterator over all epochs (`mmar.engine.data.EpochBatches`, what `mmar train` does now):
  the workers prepare the next epoch's first batches during the pause;
- `stream-prefetchN`: the same with N batches in flight per worker instead of torch's 2.

Printed: per variant the median over epochs of the data-wait share (time blocked in `next()` / epoch
time without the pause) and of the wait of an epoch's first batch, and the ratio of the wait share to
`per-epoch`.

    python bench/loader.py                                        # hippocampus, 2 workers, 15 ms steps
    python bench/loader.py --workers 4 --step-ms 15 --pause-ms 400 --epochs 8
    python bench/loader.py --data DIR --prefetch 2,4,8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hippocampus"


def training_dataset(data: Path, work: Path):
    """The default segmentation recipe's training dataset, built as `mmar train` builds it."""
    from mmar.archive import load_archive
    from mmar.engine.workflow import build_dataset, keys_of, section_items

    subprocess.run([sys.executable, "-m", "mmar", "init", str(work), "--task", "segmentation",
                    "--datalist", str(data / "datalist.json"), "--force"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    archive = load_archive(work)
    keys = list(keys_of(archive.config))
    items = section_items(archive, "train")
    dataset = build_dataset(archive.parser(), "train", items, keys=keys, with_augmentation=True, log=print)
    return dataset, int(archive.config["train"].get("batch_size", 2))


def measure(loader_epochs, step_s: float, pause_s: float) -> list[dict]:
    """Per epoch: seconds blocked in next(), the first batch's wait, the epoch's seconds (pause excluded)."""
    records = []
    for epoch_batches in loader_epochs:
        started, wait, first = time.perf_counter(), 0.0, None
        for fetch in epoch_batches:
            before = time.perf_counter()
            next(fetch)
            waited = time.perf_counter() - before
            wait += waited
            first = waited if first is None else first
            time.sleep(step_s)
        seconds = time.perf_counter() - started
        records.append({"wait": wait, "first": first or 0.0, "seconds": seconds})
        time.sleep(pause_s)
    return records


def _sampler(dataset):
    """The permutation `mmar train` draws for a single process (mmar.distributed.train_sampler)."""
    from mmar import distributed

    return distributed.train_sampler(dataset, distributed.SINGLE, seed=0)


def per_epoch_variant(dataset, batch_size: int, workers: int, epochs: int):
    from mmar.engine.data import make_loader

    sampler = _sampler(dataset)
    loader = make_loader(dataset, batch_size=batch_size, num_workers=workers, sampler=sampler)

    def epochs_of():
        for epoch in range(1, epochs + 1):
            sampler.set_epoch(epoch)  # what MONAI's workflow does at EPOCH_STARTED
            iterator = iter(loader)
            yield (iterator for _ in range(len(loader)))

    return epochs_of()


def stream_variant(dataset, batch_size: int, workers: int, epochs: int, prefetch: int):
    from mmar.engine.data import EpochBatches, make_loader

    batches = EpochBatches(_sampler(dataset), batch_size, epochs)
    loader = make_loader(dataset, batch_sampler=batches, num_workers=workers, prefetch_factor=prefetch)

    def epochs_of():
        iterator = iter(loader)
        for _ in range(epochs):
            yield (iterator for _ in range(batches.batches_per_epoch))

    return epochs_of()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with datalist.json (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--step-ms", type=float, default=15.0, help="simulated training step (default: %(default)s)")
    parser.add_argument("--pause-ms", type=float, default=400.0, help="simulated validation after each epoch")
    parser.add_argument("--epochs", type=int, default=6, help="measured epochs per variant (after 1 not counted)")
    parser.add_argument("--prefetch", default="2", help="comma-separated prefetch factors for the stream variant")
    parser.add_argument("--repeats", type=int, default=1, help="run the variants this many times, interleaved")
    parser.add_argument("--json", help="write the per-epoch records here")
    args = parser.parse_args(argv)

    import torch

    with tempfile.TemporaryDirectory(prefix="mmar-bench-loader-") as work:
        dataset, batch_size = training_dataset(Path(args.data), Path(work) / "mmar")
        print(f"{len(dataset)} training cases, batch {batch_size}, {args.workers} workers, step {args.step_ms} ms, "
              f"pause {args.pause_ms} ms, {args.epochs} epochs; torch {torch.__version__}", flush=True)
        variants = {"per-epoch": lambda: per_epoch_variant(dataset, batch_size, args.workers, args.epochs + 1)}
        for prefetch in [int(p) for p in args.prefetch.split(",")]:
            name = "stream" if prefetch == 2 else f"stream-prefetch{prefetch}"
            variants[name] = lambda p=prefetch: stream_variant(dataset, batch_size, args.workers, args.epochs + 1, p)
        results: dict[str, list[dict]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, make in variants.items():
                records = measure(make(), args.step_ms / 1000, args.pause_ms / 1000)[1:]  # epoch 1: start-up
                results[name] += records
                share = statistics.median(r["wait"] / r["seconds"] for r in records)
                print(f"  {name:20s} wait {100 * share:5.1f}%", flush=True)

    base = statistics.median(r["wait"] / r["seconds"] for r in results["per-epoch"])
    print(f"\nvariant               wait share  first batch  epoch s   ratio (wait share / per-epoch)")
    for name, records in results.items():
        share = statistics.median(r["wait"] / r["seconds"] for r in records)
        first = statistics.median(r["first"] for r in records)
        seconds = statistics.median(r["seconds"] for r in records)
        print(f"{name:20s} {100 * share:9.1f}%  {1000 * first:8.0f} ms  {seconds:7.2f}   {share / max(base, 1e-12):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
