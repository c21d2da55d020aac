#!/usr/bin/env python
"""Screening of classification recipes, in one process, on the dev split of bench/train_classification.py.

The recipes of issue 23's second round were screened here before the survivor went through the real CLI
(bench/train_classification.py, whose figures make docs/classification.md's table): the images are read
once into one tensor and the augmentation runs batched in torch, so a run costs what the network costs
(BreastMNIST about 2.5 min, the NIH sample 5-7 min with one thread), not MONAI's per-image transforms.

Shared with `mmar train`: the data (PNG -> gray -> per-image [0, 1] -> bilinear anti-aliased resize to 32 /
64 px), the dev split (`stratified_holdout`, by patient; here the split's seed is the run's seed, so two
seeds are two different held-out fifths), MONAI's networks, AdamW + cosine over a step budget, bf16
autocast on the CPU, the augmentation's parameters (rotation +-0.1 rad and scaling +-10 % with p 0.5,
intensity scale and shift +-0.1 with p 0.5, as `train#augmentation`), mixup with one Beta(alpha, alpha)
weight per batch (engine/mixup.py), the moving average of the weights validated every epoch.
Different: the average has no warm-up and copies batch-norm statistics instead of averaging them, and the
cosine schedule steps per batch, not per epoch. Screening figures rank recipes; they are not the table.

    python bench/screen_classification.py --data nih --seed 0 --name dn121_mix1 \\
        --recipe '{"net": "densenet121", "mixup": 1.0}' --out screen.jsonl

Recipe keys (defaults in brackets): net (densenet121 | resnet18 | resnet18half | resnet10, with a 3x3
stride-1 stem up to 32 px, else 7x7 stride 2), steps [600], bs [32], lr [1e-3], wd [1e-4], ema [0.99],
mixup [off: alpha], rot [0.1], scale [0.1], flip [false], smooth [0: label smoothing], drop_small [false:
skip an epoch's last batch under half a batch, as `mmar train` does since this round].
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "runtime"))

import train_classification as bench  # noqa: E402  (the splits, shared with the CLI bench)

RESNET_LAYERS = {"resnet18": [2, 2, 2, 2], "resnet18half": [2, 2, 2, 2], "resnet10": [1, 1, 1, 1]}
RESNET_WIDTHS = {"resnet18": [64, 128, 256, 512], "resnet18half": [32, 64, 128, 256], "resnet10": [64, 128, 256, 512]}


def load_images(items: list[dict], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    images = []
    for item in items:
        array = np.asarray(Image.open(item["image"]).convert("L"), dtype=np.float32)
        array = (array - array.min()) / max(1e-8, float(array.max() - array.min()))
        image = torch.from_numpy(array)[None, None]
        if tuple(image.shape[-2:]) != (size, size):
            image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        images.append(image[0])
    labels = torch.tensor([[float(v) for v in item["label"]] for item in items])
    return torch.stack(images), labels


def load_split(name: str, split: str, seed: int):
    folder = bench.DATASETS[name]
    datalist = json.loads((folder / "datalist.json").read_text())
    training = bench.absolute(datalist["training"], folder)
    if split == "dev":
        training, held_out = bench.stratified_holdout(training, 0.2, seed)
    else:
        held_out = bench.absolute(datalist["validation"], folder)
    size = 32 if name == "breastmnist" else 64
    return load_images(training, size), load_images(held_out, size)


def network(kind: str, outputs: int, size: int) -> torch.nn.Module:
    import monai.networks.nets as nets

    if kind == "densenet121":
        return nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=outputs)
    small = size <= 32
    return nets.ResNet(block="basic", layers=RESNET_LAYERS[kind], block_inplanes=RESNET_WIDTHS[kind], spatial_dims=2,
                       n_input_channels=1, conv1_t_size=3 if small else 7, conv1_t_stride=1 if small else 2,
                       num_classes=outputs)


def augment(images: torch.Tensor, recipe: dict, generator: torch.Generator) -> torch.Tensor:
    def uniform(n, scale):  # U(-scale, scale)
        return (torch.rand(n, generator=generator) * 2 - 1) * scale

    def chosen(n, p=0.5):
        return (torch.rand(n, generator=generator) < p).float()

    n = images.shape[0]
    if recipe.get("flip"):
        flip = chosen(n).bool()[:, None, None, None]
        images = torch.where(flip, images.flip(-1), images)
    rotate, scale = recipe.get("rot", 0.1), recipe.get("scale", 0.1)
    if rotate or scale:
        apply = chosen(n)
        angle = uniform(n, rotate) * apply
        zoom = 1 + uniform(n, scale) * apply
        cos, sin, zero = torch.cos(angle) / zoom, torch.sin(angle) / zoom, torch.zeros(n)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)
    images = images * (1 + chosen(n)[:, None, None, None] * uniform(n, 0.1)[:, None, None, None])
    return images + chosen(n)[:, None, None, None] * uniform(n, 0.1)[:, None, None, None]


def batch_step(model, optimizer, images, targets, recipe: dict, generator: torch.Generator, mix_draws, bf16: bool) -> float:
    """One optimizer step on a batch: augmented, labels smoothed (`smooth`), mixed in pairs (`mixup`: one
    Beta(alpha, alpha) weight from `mix_draws`), BCE with logits; the batch's loss. Shared with
    bench/recipe_cv.py."""
    images = augment(images, recipe, generator)
    smooth = recipe.get("smooth", 0.0)
    if smooth:
        targets = targets * (1 - smooth) + 0.5 * smooth
    if recipe.get("mixup"):
        lam = float(mix_draws.beta(recipe["mixup"], recipe["mixup"]))
        pair = torch.randperm(len(images), generator=generator)
        images, targets = lam * images + (1 - lam) * images[pair], lam * targets + (1 - lam) * targets[pair]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(images)
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def auc_and_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    from monai.metrics import compute_roc_auc

    aucs = [float(compute_roc_auc(probs[:, j], labels[:, j])) for j in range(labels.shape[1])
            if 0 < labels[:, j].sum() < len(labels)]  # labels with both classes, as MultiLabelAUC
    return float(np.mean(aucs)), float(((probs > 0.5).float() == labels).float().mean())


def evaluate(model, images, labels, bf16: bool) -> tuple[float, float]:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        probs = torch.sigmoid(model(images).float())
    return auc_and_accuracy(probs, labels)


def run(recipe: dict, name: str, seed: int, split: str) -> dict:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    mix_draws = np.random.default_rng(seed)
    (train_x, train_y), (held_x, held_y) = load_split(name, split, seed)
    model = network(recipe["net"], train_y.shape[1], train_x.shape[-1])
    average = copy.deepcopy(model).requires_grad_(False)
    batch = recipe.get("bs", 32)
    steps_per_epoch = math.ceil(len(train_x) / batch)
    epochs = max(1, round(recipe.get("steps", 600) / steps_per_epoch))
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.get("lr", 1e-3), weight_decay=recipe.get("wd", 1e-4))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    decay, bf16 = recipe.get("ema", 0.99), recipe.get("bf16", True)
    history, started = [], time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        epoch_started, losses = time.time(), []
        order = torch.randperm(len(train_x), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * batch:(step + 1) * batch]
            if recipe.get("drop_small") and len(index) < batch // 2:
                continue
            loss = batch_step(model, optimizer, train_x[index], train_y[index], recipe, generator, mix_draws, bf16)
            schedule.step()
            with torch.no_grad():
                for mine, theirs in zip(average.parameters(), model.parameters()):
                    mine.mul_(decay).add_(theirs.detach(), alpha=1 - decay)
                for mine, theirs in zip(average.buffers(), model.buffers()):
                    mine.copy_(theirs)
            losses.append(loss)
        auc, accuracy = evaluate(average, held_x, held_y, bf16)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "auc": auc, "acc": accuracy,
                        "s": time.time() - epoch_started})
        print(json.dumps(history[-1]), flush=True)
    aucs = [h["auc"] for h in history]
    late = aucs[-max(1, len(aucs) // 3):]
    return {"recipe": recipe, "data": name, "split": split, "seed": seed, "final_auc": aucs[-1],
            "final_acc": history[-1]["acc"], "best_auc": max(aucs), "best_epoch": int(np.argmax(aucs)) + 1,
            "late_swing": max(late) - min(late), "train_s": time.time() - started, "epochs": epochs,
            "hist": history}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="breastmnist", choices=sorted(bench.DATASETS))
    parser.add_argument("--split", default="dev", choices=("dev", "final"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", required=True, help="the recipe's name in the records")
    parser.add_argument("--recipe", required=True, help="JSON object (keys above)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="screen_classification.jsonl", help="JSON lines, one per run, appended")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {**run(json.loads(args.recipe), args.data, args.seed, args.split), "name": args.name}
    with open(args.out, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(result) + "\n")
    print(f"RESULT {args.name} {args.data} s{args.seed}: final {result['final_auc']:.3f}/{result['final_acc']:.3f} "
          f"best {result['best_auc']:.3f}@{result['best_epoch']} swing {result['late_swing']:.3f} "
          f"{result['train_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
