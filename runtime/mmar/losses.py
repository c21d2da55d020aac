"""Losses MONAI does not have: binary and categorical labels mixed in one output vector."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from mmar.label_format import LabelFormat, as_list


class MultiLabelLoss(torch.nn.Module):
    """BCE-with-logits on the binary labels' outputs, cross-entropy on each categorical label's segment.

    `label_format` as in the datalist (1 = binary, k = k classes). Input: logits [B, sum(label_format)];
    target: [B, len(label_format)] (a binary label's 0/1, a categorical label's class index), or soft
    targets with one column per output, [B, sum(label_format)] (a binary label's probability, a categorical
    label's class probabilities: what `train#mixup` trains on, engine/mixup.py). With binary labels only the
    two layouts are the same. The result is the mean of the per-label losses, so its scale does not grow
    with the number of labels.

    `label_smoothing` (epsilon in [0, 1)): a binary target t is trained as t (1 - epsilon) + epsilon / 2, a
    categorical one as torch's cross-entropy smooths it (epsilon spread over the k classes), so that a few
    hundred images cannot be fitted with ever larger logits.
    """

    def __init__(self, label_format: Sequence[int] | LabelFormat, pos_weight: Sequence[float] | None = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        if not isinstance(label_smoothing, (int, float)) or isinstance(label_smoothing, bool) \
                or not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be a number in [0, 1), not {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self.sizes = as_list(label_format)
        self.binary = [i for i, size in enumerate(self.sizes) if size == 1]
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.binary_columns = [starts[i] for i in self.binary]
        self.categorical = [(i, starts[i], starts[i] + size) for i, size in enumerate(self.sizes) if size > 1]
        weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
        if weight is not None and weight.numel() != len(self.binary):
            raise ValueError(f"pos_weight has {weight.numel()} values for {len(self.binary)} binary labels")
        self.register_buffer("pos_weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        expected = sum(self.sizes)
        if logits.ndim != 2 or logits.shape[1] != expected:
            raise ValueError(f"logits shape {tuple(logits.shape)}: expected [batch, {expected}] for label_format {self.sizes}")
        target = torch.as_tensor(target, device=logits.device).reshape(logits.shape[0], -1)
        soft = target.shape[1] == expected and target.shape[1] != len(self.sizes)
        if target.shape[1] != len(self.sizes) and not soft:
            raise ValueError(f"target shape {tuple(target.shape)}: expected [batch, {len(self.sizes)}] (labels) or "
                             f"[batch, {expected}] (soft targets) for label_format {self.sizes}")
        total = logits.new_zeros(())
        if self.binary:
            columns = self.binary_columns if soft else self.binary
            wanted = target[:, columns].to(logits.dtype)
            if self.label_smoothing:
                wanted = wanted * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
            bce = F.binary_cross_entropy_with_logits(
                logits[:, self.binary_columns], wanted, pos_weight=self.pos_weight, reduction="none",
            )
            total = total + bce.mean(dim=0).sum()  # mean over the batch, summed over labels
        for index, start, stop in self.categorical:
            wanted = target[:, start:stop].to(logits.dtype) if soft else target[:, index].long()
            total = total + F.cross_entropy(logits[:, start:stop], wanted,  # class indices or probabilities
                                            label_smoothing=self.label_smoothing)
        return total / len(self.sizes)
