#!/usr/bin/env python
"""Where the cache's preprocessing time goes: the deterministic transforms of `mmar init`'s default
segmentation recipe, per transform and per case, with the label check as it was and as it is, in one run
(docs/speed.md: "The defaults and why", start-up; the figures under "Current figures").

    python bench/preprocessing.py                    # hippocampus's 167 training cases
    python bench/preprocessing.py --data DIR --section validate --repeats 5

`mmar train` fills its caches in a background thread while it builds the network, the optimizer and the
CUDA context (engine/train.py); when the caching takes longer than that set-up, it is the start-up's
critical path. This times the cached part of DATA's recipe in this process, one case after the other
(one thread, the cost that the engine's threads share and the GIL serializes), in two variants:

  before   the label check as it was until 2026-11-27: `SegmentationCased` formatted the label tensor into
           a fallback file name (`str()` of its values) for every case, and listed its distinct values
           (`torch.unique`) to find values outside the classes
  now      the name only for an error; min, max and whole-number checks, `torch.unique` only for the message

Prints the median seconds over all cases for each variant (and the ratio to "before"), and for "now" the
median milliseconds per case of each transform.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hippocampus"


def with_old_label_check(transform):
    """`transform` (a SegmentationCased) doing the per-case work of the old label check, then its own."""
    import torch

    from mmar.transforms import SegmentationCased

    class Before(SegmentationCased):
        def __call__(self, data):
            label = data.get(self.label_key)
            if label is not None:
                str(label)  # the fallback name, built for every case
                values = torch.unique(torch.as_tensor(label))
                [v for v in values if v < 0 or v >= self.num_classes or v != torch.round(v)]
            return super().__call__(data)

    return Before(transform.image_key, transform.label_key, transform.num_classes)


def time_pass(transforms, items) -> tuple[float, dict[str, float]]:
    """Seconds for all cases, and seconds per transform (summed over the cases)."""
    per_transform: dict[str, float] = {}
    started = time.perf_counter()
    for item in items:
        data = dict(item)
        for transform in transforms:
            begun = time.perf_counter()
            data = transform(data)
            name = type(transform).__name__
            per_transform[name] = per_transform.get(name, 0.0) + time.perf_counter() - begun
    return time.perf_counter() - started, per_transform


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with datalist.json")
    parser.add_argument("--section", choices=["train", "validate"], default="train")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    datalist = args.data / "datalist.json"
    if not datalist.is_file():
        parser.error(f"--data: no datalist.json in {args.data}")

    from mmar.archive import load_archive
    from mmar.engine.workflow import dataset_transforms, keys_of, section_items
    from mmar.transforms import SegmentationCased

    with tempfile.TemporaryDirectory(prefix="bench-preprocessing-") as work:
        mmar = Path(work) / "mmar"
        subprocess.run([sys.executable, "-m", "mmar", "init", str(mmar), "--task", "segmentation", "--datalist",
                        str(datalist)], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        archive = load_archive(mmar)
        keys = list(keys_of(archive.config))
        now, _ = dataset_transforms(archive.parser(), args.section, keys=keys, with_augmentation=False)
        items = section_items(archive, args.section)
        before = [with_old_label_check(t) if isinstance(t, SegmentationCased) else t for t in now]
        variants = {"before": before, "now": now}
        time_pass(now, items[:4])  # first calls (imports, allocator) outside the timings
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        per_transform: list[dict[str, float]] = []
        for _ in range(args.repeats):  # alternating, so that a busy moment of the machine hits both
            for name, transforms in variants.items():
                total, parts = time_pass(transforms, items)
                seconds[name].append(total)
                if name == "now":
                    per_transform.append(parts)

    print(f"{len(items)} {args.section} cases of {args.data}, one thread, {args.repeats} repeats")
    base = statistics.median(seconds["before"])
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"  {name:<7} {median:6.2f} s ({1000 * median / len(items):5.2f} ms a case; runs "
              f"{', '.join(f'{v:.2f}' for v in values)})  ratio {median / base:.2f}")
    print("  now, per transform (median ms a case):")
    for name in per_transform[0]:
        median = statistics.median(parts[name] for parts in per_transform)
        print(f"    {name:<24} {1000 * median / len(items):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
