"""Per-label AUC and accuracy for mixed binary/categorical labels, and the key metric (mean AUC).

A binary label's AUC is MONAI's `compute_roc_auc` on its probability; a categorical label's is the macro
mean of its one-vs-rest AUCs (sklearn's `multi_class="ovr"`). The key metric is the mean over labels,
skipping labels whose AUC is undefined (a single class present in the validation list) rather than
letting one NaN hide all the others. Accuracy is at probability 0.5 for binary labels and of the argmax
for categorical ones.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric, compute_roc_auc

from mmar.label_format import LabelFormat, parse


def _format(label_format, label_names=None) -> LabelFormat:
    if isinstance(label_format, LabelFormat):
        return label_format
    return parse(list(label_format), list(label_names) if label_names is not None else None)


def _auc(scores: torch.Tensor, truth: torch.Tensor) -> float:
    with warnings.catch_warnings():  # a single-class label is reported as undefined, not warned per epoch
        warnings.simplefilter("ignore")
        return float(compute_roc_auc(scores.float(), truth.float()))


def label_aucs(probs: torch.Tensor, labels: torch.Tensor, fmt: LabelFormat) -> list[float]:
    """probs [N, C] (after activation), labels [N, L] -> one AUC per label (NaN where undefined)."""
    values = []
    for index, ((start, stop), size) in enumerate(zip(fmt.segments(), fmt.sizes)):
        truth = labels[:, index].long()
        if size == 1:
            values.append(_auc(probs[:, start], truth))
            continue
        per_class = [_auc(probs[:, start + c], (truth == c).long()) for c in range(size)]
        finite = [v for v in per_class if not math.isnan(v)]
        values.append(float(np.mean(finite)) if finite else float("nan"))
    return values


def predicted(probs: torch.Tensor, fmt: LabelFormat) -> torch.Tensor:
    """probs [N, C] -> predicted value per label [N, L] (0/1 at 0.5, or the argmax class)."""
    columns = []
    for (start, stop), size in zip(fmt.segments(), fmt.sizes):
        segment = probs[:, start:stop]
        columns.append((segment[:, 0] >= 0.5).long() if size == 1 else segment.argmax(dim=1))
    return torch.stack(columns, dim=1)


def label_accuracies(probs: torch.Tensor, labels: torch.Tensor, fmt: LabelFormat) -> list[float]:
    hits = (predicted(probs, fmt) == labels.long()).double()
    return hits.mean(dim=0).tolist()


def nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def mean_auc_standard_error(aucs: Sequence[float], labels: torch.Tensor, fmt: LabelFormat) -> float:
    """The standard error of the mean AUC over the labels that have one: per label Hanley & McNeil (1982)
    from its AUC and class counts (a categorical label: the mean of its classes' one-vs-rest errors), the
    labels taken as independent. NaN when no label has an AUC."""
    from mmar.engine.selection import hanley_mcneil

    errors = []
    for index, (auc, size) in enumerate(zip(aucs, fmt.sizes)):
        if math.isnan(auc):
            continue
        truth = labels[:, index].long()
        classes = [1] if size == 1 else range(size)
        per_class = []
        for c in classes:
            positives = int((truth == c).sum())
            negatives = len(truth) - positives
            if positives and negatives:
                per_class.append(hanley_mcneil(auc, positives, negatives))
        if per_class:
            errors.append(float(np.mean(per_class)))
    return math.sqrt(sum(e * e for e in errors)) / len(errors) if errors else float("nan")


def summary(probs: torch.Tensor, labels: torch.Tensor, fmt: LabelFormat) -> dict[str, Any]:
    """What metrics.json reports: mean and per-label AUC, accuracy overall and per label."""
    probs, labels = torch.as_tensor(probs).detach().cpu(), torch.as_tensor(labels).detach().cpu()
    aucs = label_aucs(probs, labels, fmt)
    accuracies = label_accuracies(probs, labels, fmt)
    return {
        "mean_auc": nanmean(aucs),
        # the mean AUC's standard error (Hanley & McNeil, labels taken as independent): the noise the model
        # selection rule allows for (mmar.engine.selection)
        "mean_auc_standard_error": mean_auc_standard_error(aucs, labels, fmt),
        "auc_per_label": dict(zip(fmt.names, aucs)),
        "labels_without_auc": [n for n, v in zip(fmt.names, aucs) if math.isnan(v)],
        "accuracy": float(np.mean(accuracies)),
        "accuracy_per_label": dict(zip(fmt.names, accuracies)),
    }


class MultiLabelAUCMetric(CumulativeIterationMetric):
    """Buffers probabilities and labels over the evaluation; `aggregate` is the mean AUC over labels."""

    def __init__(self, label_format, label_names=None):
        super().__init__()
        self.format = _format(label_format, label_names)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None):  # type: ignore[override]
        if y is None:
            raise ValueError("MultiLabelAUC needs the ground-truth labels")
        return y_pred.reshape(y_pred.shape[0], -1).float(), y.reshape(y.shape[0], -1).float()

    def summary(self) -> dict[str, Any]:
        probs, labels = self.get_buffer()
        return summary(probs, labels, self.format)

    def aggregate(self):  # type: ignore[override]
        return self.summary()["mean_auc"]


class MultiLabelAUC(IgniteMetricHandler):
    """The key metric handler: mean AUC over labels; the full `summary` goes to `state.metric_details`."""

    def __init__(self, label_format, label_names=None, output_transform=lambda x: x, save_details: bool = True):
        super().__init__(metric_fn=MultiLabelAUCMetric(label_format, label_names), output_transform=output_transform,
                         save_details=save_details)

    def compute(self) -> Any:
        details = self.metric_fn.summary()  # type: ignore[attr-defined]
        self._is_reduced = True
        if self.save_details and self._engine is not None and self._name is not None:
            self._engine.state.metric_details[self._name] = details
        return details["mean_auc"]
