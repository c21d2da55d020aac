#!/usr/bin/env python
"""`mmar validate`'s mirrored inference: one sliding-window call per mirror against all 8 mirrors as one
batch, in one run, on an MMAR's own model, validation list and config.

    python bench/mirrors.py --mmar path/to/mmar              # e.g. the MMAR of a bench/train.py run
    python bench/mirrors.py --mmar path/to/mmar --repeats 5 --set amp=false

A volume within one sliding window (hippocampus: every case) sends its 8 mirrors through the window as one
batch (`SlidingWindowMirrorInferer.fits_one_window`): MONAI groups the windows of a batch `sw_batch_size` at a
time, so the network runs once instead of 8 times. `sequential` forces one call per mirror, as before.
Both variants run the whole `mmar validate` (loading, mirrored inference, metrics, the per-case CSV and
overlays) alternating, and print the median seconds of the evaluator, the mean Dice (the same: the method
does not change) and the ratio to `sequential`. The MMAR's eval/ folder is rewritten by every run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))


def run(root: Path, variant: str, overrides: list[str]) -> tuple[float, float]:
    from mmar.archive import load_archive, read_json
    from mmar.engine.evaluate import validate
    from mmar.inferers import SlidingWindowMirrorInferer

    one_window = SlidingWindowMirrorInferer.fits_one_window
    if variant == "sequential":
        SlidingWindowMirrorInferer.fits_one_window = lambda self, inputs: False
    try:
        archive = load_archive(root, overrides, for_validation=True)
        validate(archive, log=lambda *_: None)
    finally:
        SlidingWindowMirrorInferer.fits_one_window = one_window
    metrics = read_json(archive.eval_dir / "metrics.json", "metrics")
    return metrics["seconds"], metrics[metrics["key_metric"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mmar", type=Path, required=True, help="an MMAR with models/model.ckpt and a validation list")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, as mmar validate's")
    args = parser.parse_args(argv)
    if not (args.mmar / "models" / "model.ckpt").is_file():
        parser.error(f"--mmar: no models/model.ckpt in {args.mmar}")
    variants = ("sequential", "batched")
    run(args.mmar, "batched", args.set)  # first calls (imports, allocator, oneDNN / cuDNN set-up) untimed
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    dice: dict[str, float] = {}
    for _ in range(args.repeats):  # alternating, so that a busy moment of the machine hits both
        for variant in variants:
            took, dice[variant] = run(args.mmar, variant, args.set)
            seconds[variant].append(took)
    base = statistics.median(seconds["sequential"])
    print(f"mmar validate {args.mmar}, {args.repeats} repeats")
    for variant in variants:
        median = statistics.median(seconds[variant])
        print(f"  {variant:<10} {median:6.2f} s (runs {', '.join(f'{s:.2f}' for s in seconds[variant])})  "
              f"metric {dice[variant]:.6f}  ratio {median / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
