#!/usr/bin/env python
"""The per-epoch validation of `mmar train`: before and after the fast path, in one run.

    python bench/validation.py                       # hippocampus's 41 validation cases, CPU or GPU
    python bench/validation.py --device cuda --repeats 7

Builds the default segmentation MMAR (`mmar init` on DATA's datalist) and times its validation evaluator,
as `mmar train` builds it between epochs, in three variants:

  before   cases cached as MetaTensors; post-processing softmax + MONAI's AsDiscreted (torch.argmax);
           one case per sliding-window call
  plain    cases cached as plain tensors; mmar's AsDiscreted (torch.max(...).indices), no softmax
  batched  plain, and cases that pad to the same windows share sliding-window calls (up to sw_batch_size
           cases), cropped back before the metric (engine/window_batches.py): what `mmar train` does now

each with the default network (bf16 autocast where the device has it, as training) and with a 1x1x1
convolution in its place, which leaves the per-case overhead alone: on a GPU the default network's
inference is launch-bound, so the overhead is most of what a GPU epoch's validation costs. Prints the median
seconds per pass over the validation list, the mean Dice (the same in all: the method does not change),
and the ratios to "before".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hippocampus"

BEFORE_POSTPROCESSING = {
    "_target_": "Compose",
    "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False],
         "to_onehot": ["@num_classes", "@num_classes"]},
    ],
}


def time_variant(root: Path, variant: str, *, tiny: bool, device, repeats: int) -> tuple[float, float]:
    import torch

    from mmar.archive import load_archive
    from mmar.engine import precision
    from mmar.engine.workflow import build_evaluator, keys_of, section_items, validation_loader

    archive = load_archive(root)
    if variant == "before":
        archive.config["validate"]["postprocessing"] = BEFORE_POSTPROCESSING
    parser = archive.parser()
    items = section_items(archive, "validate")
    inferer = parser.get_parsed_content("validate#inferer") if variant == "batched" else None
    loader = validation_loader(parser, items, keys=list(keys_of(archive.config)), device=device,
                               plain=variant != "before", inferer=inferer, log=lambda *_: None)
    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, archive.config["num_classes"], 1) if tiny else parser.get_parsed_content("network")
    network = network.to(device).eval()
    chosen = precision.for_device(network, device, bool(archive.config.get("amp", False)))
    evaluator = build_evaluator(parser, chosen.network, loader, device, amp=chosen.cuda_amp,
                                amp_kwargs=chosen.amp_kwargs)
    evaluator.run()  # warm-up: cuDNN plans, allocator, first-call imports
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        evaluator.run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), float(evaluator.state.metrics[archive.config["validate"]["key_metric"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with datalist.json")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on a CPU (default: torch's)")
    args = parser.parse_args(argv)

    import torch

    from mmar.scaffold import init

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    datalist = args.data / "datalist.json"
    if not datalist.is_file():
        print(f"bench/validation.py: {datalist} not found (--data)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-validation-") as work:
        root = Path(work) / "mmar"
        init(root, task="segmentation", datalist=datalist, log=lambda *_: None)
        print(f"device {device}; torch {torch.__version__}, {torch.get_num_threads()} threads; {args.repeats} passes "
              f"each over the validation list of {datalist}")
        print(f"{'network':<10} {'before s':>9} {'plain s':>8} {'ratio':>6} {'batched s':>10} {'ratio':>6}"
              f"   mean Dice before / plain / batched")
        for tiny in (False, True):
            (before, dice_before), (plain, dice_plain), (batched, dice_batched) = (
                time_variant(root, variant, tiny=tiny, device=device, repeats=args.repeats)
                for variant in ("before", "plain", "batched"))
            name = "1x1 conv" if tiny else "default"
            print(f"{name:<10} {before:9.3f} {plain:8.3f} {plain / before:6.2f} {batched:10.3f} {batched / before:6.2f}"
                  f"   {dice_before:.4f} / {dice_plain:.4f} / {dice_batched:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
