"""Mixup of training batches (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018).

`train#mixup: {"alpha": 1.0}` trains on convex combinations of pairs of cases: for each batch one weight
lam ~ Beta(alpha, alpha) and a random pairing of its cases; the network sees lam * x + (1 - lam) * x[perm]
and is scored against lam * y + (1 - lam) * y[perm]. Only the training batches are mixed; validation and
inference see the images as they are.

Why (docs/classification.md, bench/train_classification.py): on a few hundred images a network memorises
its training list within a few hundred steps (training loss ~0.02), after which the validation AUC falls
(on held-out patients of the NIH sample from 0.71 to 0.49). A mixed target cannot be memorised to zero
loss, and the fall shrinks.

The targets are the task's (`task.mixup_targets`): classification turns its labels (a 0/1 per binary
label, a class index per categorical one) into one column per network output, a one-hot segment per
categorical label, which `mmar.losses.MultiLabelLoss` reads as soft targets. A task without that hook
(segmentation) refuses the option.

Written here rather than taken from MONAI: `monai.transforms.MixUp` mixes per case with a weight vector
sized at construction (the last, shorter batch of an epoch does not fit), applies only to image-shaped
tensors (3 or 4 dimensions after the batch: a label vector is refused), and draws from its own numpy
random state, which the per-epoch seeding of `mmar train` (engine/train.py: `_reseed`) does not reach. Here
the weight and the pairing come from torch's generator, seeded per epoch, so a resumed run mixes as an
unbroken one.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from mmar.archive import switch_section
from mmar.errors import MMARError


def mixup_alpha(section: Any) -> float | None:
    """The configured alpha, or None when the section is absent, null or `{"alpha": 0}` (no mixing)."""
    return switch_section(section, "train#mixup", "alpha", example=0.4, fits=lambda v: 0 <= v <= 100,
                          bounds="[0, 100] (Beta(alpha, alpha))")


def mix(image: torch.Tensor, target: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One mixed batch: one weight for the batch, a random pairing of its cases (torch's generator)."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(image.shape[0]).to(image.device, non_blocking=True)
    target = target.to(image.dtype)
    return torch.lerp(image[perm], image, lam), torch.lerp(target[perm], target, lam)


class MixedBatch:
    """`prepare_batch` for the trainer: the task's batch, its labels as soft targets, then mixed."""

    def __init__(self, prepare: Callable, alpha: float, targets: Callable[[torch.Tensor], torch.Tensor]):
        self.prepare, self.alpha, self.targets = prepare, alpha, targets

    def __call__(self, batch, device=None, non_blocking=False, **kwargs):
        image, label = self.prepare(batch, device, non_blocking, **kwargs)
        if label is None:
            raise MMARError("train#mixup needs a label for every training case")
        return mix(image, self.targets(label), self.alpha)


def wrap(prepare: Callable, section: Any, task, config: dict[str, Any], log) -> Callable:
    """The trainer's `prepare_batch`: `prepare` itself, or mixed where `train#mixup` asks for it."""
    alpha = mixup_alpha(section)
    if alpha is None:
        return prepare
    make_targets = task.mixup_targets(config)  # MMARError for a task without mixup
    log(f"mixup: training batches mixed in pairs, weight ~ Beta({alpha:g}, {alpha:g}) (train#mixup)")
    return MixedBatch(prepare, alpha, make_targets)
