#!/usr/bin/env python
"""One training step of `mmar init`'s default segmentation recipe, through MONAI's `SupervisedTrainer`,
under the precision and host-to-device settings the engine can choose: which one keeps a GPU busy?

Each variant trains the default network (UNet 32-64-128-256, DiceCE with batch Dice, AdamW) on a fixed
set of pinned batches (4 patches of 40x56x40 by default, the hippocampus default) for `--steps` steps
after a warm-up, synchronizes, and reports the median over `--repeats` repeats of milliseconds per step,
and the ratio to the first variant, measured in the same run:

- `fp16-scaler-blocking`: MONAI's own `amp=True` (fp16 + GradScaler, whose `step` reads its inf check back
  to the host every step) with blocking copies (each waits for the previous step to finish on the GPU);
  what `mmar train` did before;
- `fp16-scaler-async`: the same with non-blocking copies;
- `bf16-async`: bf16 autocast, no scaler, non-blocking copies; what `mmar train` does now on GPUs with
  native bf16 (engine/precision.py);
- `fp32-async`: no autocast;
- `...-fused`: the same with AdamW's fused kernel (`fused=True`, what `mmar init` writes: docs/speed.md,
  "The defaults and why") instead of the implementation torch picks by default (one multi-tensor
  `_foreach_*` kernel per operation on a GPU, a Python loop over the parameters on a CPU).

    python bench/train_step.py --device cuda               # on a GPU machine
    python bench/train_step.py --device cpu --steps 5      # runs anywhere (only fp32 / bf16 are meaningful)
    python bench/train_step.py --device cpu --steps 10 --variants fp32-async,fp32-async-fused,fp32-async
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))

VARIANTS = {
    # name: (amp, amp dtype, keep MONAI's GradScaler, non_blocking, fused AdamW)
    "fp16-scaler-blocking": (True, torch.float16, True, False, False),
    "fp16-scaler-async": (True, torch.float16, True, True, False),
    "bf16-async": (True, torch.bfloat16, False, True, False),
    "fp32-async": (False, None, False, True, False),
    "bf16-async-fused": (True, torch.bfloat16, False, True, True),
    "fp32-async-fused": (False, None, False, True, True),
}
DEFAULT_VARIANTS = "fp16-scaler-blocking,fp16-scaler-async,bf16-async,fp32-async,bf16-async-fused"


def build(device: torch.device, patch: list[int], classes: int, fused: bool):
    from monai.bundle import ConfigParser

    from mmar.tasks.segmentation import default_configs

    train, _ = default_configs(num_classes=classes, in_channels=1, spatial_size=patch, epochs=10)
    train["train"]["optimizer"]["fused"] = True if fused else None  # None: torch's default implementation
    parser = ConfigParser(train)
    network = parser.get_parsed_content("network").to(device)
    loss = parser.get_parsed_content("train#loss")
    optimizer = parser.get_parsed_content("train#optimizer")
    return network, loss, optimizer


def batches(count: int, batch: int, patch: list[int], classes: int, pin: bool) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        image = torch.randn(batch, 1, *patch, generator=generator)
        label = torch.randint(0, classes, (batch, 1, *patch), generator=generator).float()
        if pin:
            image, label = image.pin_memory(), label.pin_memory()
        out.append({"image": image, "label": label})
    return out


def time_variant(name: str, device: torch.device, data: list[dict], args) -> list[float]:
    from monai.engines import SupervisedTrainer
    from monai.inferers import SimpleInferer

    from mmar.engine import precision
    from mmar.engine.workflow import KeyedBatch

    amp, dtype, scaler, non_blocking, fused = VARIANTS[name]
    torch.manual_seed(0)
    network, loss, optimizer = build(device, args.patch, args.classes, fused)
    timings = []
    for _ in range(args.repeats + 1):  # the first run warms up (cuDNN heuristics, allocator)
        trainer = SupervisedTrainer(
            device=device, max_epochs=1, epoch_length=args.steps, train_data_loader=data, network=network,
            optimizer=optimizer, loss_function=loss, inferer=SimpleInferer(), prepare_batch=KeyedBatch("image", "label"),
            non_blocking=non_blocking, amp=amp and device.type == "cuda",
            amp_kwargs={"dtype": dtype} if dtype is not None else None, decollate=False,
        )
        if amp and not scaler and device.type == "cuda":
            precision.without_grad_scaler(trainer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        trainer.run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(1000 * (time.perf_counter() - started) / args.steps)
    return timings[1:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, nargs=3, default=[40, 56, 40])
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, the first is the baseline; of {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    data = batches(8, args.batch, args.patch, args.classes, pin=device.type == "cuda")
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{label}: batch {args.batch} x {args.patch}, {args.steps} steps x {args.repeats} repeats")
    base = None
    for name in names:
        timings = time_variant(name, device, data, args)
        median = statistics.median(timings)
        base = base or median
        print(f"  {name:<22} {median:7.2f} ms/step (median; runs {', '.join(f'{t:.1f}' for t in timings)})"
              f"  ratio {median / base:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
