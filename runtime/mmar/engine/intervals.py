"""How far a validation figure can move by the luck of which cases are in the list: bootstrap intervals.

`mmar validate` writes, beside the key metric, a 95 % percentile-bootstrap interval of it (and of each
label's AUC / each class's Dice) into eval/metrics.json, under `intervals`:

    "intervals": {
      "val_mean_auc": {"lower": 0.764, "upper": 0.993},
      "auc_per_label": {"malignant": {"lower": 0.764, "upper": 0.993}},
      "level": 0.95, "resamples": 2000, "seed": 0, "unit": "case", "units": 78,
      "method": "percentile bootstrap, whole units resampled with replacement"
    }

Each resample draws as many units as the list holds, with replacement, and recomputes the figures with the
code that computed the point estimate (the mean AUC over the labels with both classes in the resample; the
mean of the per-case, per-class Dice). The unit is the case (one datalist item) unless the items carry a
`patient` key: then all images of one
patient are drawn together, since they are not independent, and `unit` says `patient` (every item must
carry one; an item without it makes every case its own unit). Seeded (0): the same predictions give the
same interval. 2000 resamples cost 0.2 s for BreastMNIST's 78 images, 2.7 s for 15 labels x 200 images.

The quality gate reads `NAME.lower` / `NAME.upper` from here (`mmar --gate 'val_mean_auc.lower>=0.8' ...`,
mmar.gate). bench/auc_interval.py computes the same interval from an eval/cases.csv.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

DEFAULTS = {"resamples": 2000, "level": 0.95, "seed": 0, "group_key": "patient"}
METHOD = "percentile bootstrap, whole units resampled with replacement"


def settings(config: dict[str, Any]) -> dict[str, Any]:
    """The interval's settings: fixed (`DEFAULTS`), so that every metrics.json of every MMAR is comparable and a
    gate's bar means the same thing everywhere."""
    return dict(DEFAULTS)


def units_of(items: Sequence[dict[str, Any]], group_key: str) -> tuple[list[str], str]:
    """The resampling unit of each item: its `group_key` value where every item has one, else the item
    itself. Returns (unit per item, the unit's name for metrics.json)."""
    if items and all(isinstance(item, dict) and item.get(group_key) not in (None, "") for item in items):
        return [str(item[group_key]) for item in items], group_key
    return [str(index) for index in range(len(items))], "case"


def resample_rows(units: Sequence[str], resamples: int, seed: int):
    """Yield `resamples` row-index arrays, each the rows of as many units as there are, drawn with replacement."""
    rng = np.random.default_rng(seed)
    members: dict[str, list[int]] = {}
    for index, unit in enumerate(units):
        members.setdefault(unit, []).append(index)
    clusters = [np.asarray(rows) for rows in members.values()]
    for _ in range(resamples):
        chosen = rng.integers(0, len(clusters), len(clusters))
        yield np.concatenate([clusters[c] for c in chosen])


def percentile(values: np.ndarray, level: float) -> tuple[float, float]:
    """The (lower, upper) percentiles of the resampled values (NaN draws left out; NaN when all are)."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap(statistic: Callable[[np.ndarray], Sequence[float]], names: Sequence[str], units: Sequence[str],
              settings: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{name: {"lower", "upper"}} for each figure `statistic(rows)` returns (in the order of `names`)."""
    draws = np.asarray([list(statistic(rows)) for rows in resample_rows(units, settings["resamples"], settings["seed"])],
                       dtype=float).reshape(settings["resamples"], len(names))
    return {name: dict(zip(("lower", "upper"), percentile(draws[:, i], settings["level"]))) for i, name in enumerate(names)}


def envelope(settings: dict[str, Any], unit: str, units: Sequence[str]) -> dict[str, Any]:
    return {"level": settings["level"], "resamples": settings["resamples"], "seed": settings["seed"], "unit": unit,
            "units": len(set(units)), "method": METHOD}


def _aligned(units: Sequence[str], unit: str, rows: int) -> tuple[Sequence[str], str]:
    """The items' units where they match the evaluated rows one to one, else one unit per row."""
    if len(units) == rows:
        return units, unit
    return [str(index) for index in range(rows)], "case"


# ---- the figures of each task ----------------------------------------------------------------------


def fast_aucs(probs: np.ndarray, labels: np.ndarray, sizes: Sequence[int]) -> list[float]:
    """One AUC per label, as `mmar.classification_metrics.label_aucs` computes it (a binary label's ROC AUC,
    a categorical label's macro mean of one-vs-rest AUCs over the classes present; NaN where undefined),
    by ranks (Mann-Whitney, ties counted half), without MONAI's per-call overhead: thousands of resamples."""
    values, start = [], 0
    for index, size in enumerate(sizes):
        truth = labels[:, index]
        if size == 1:
            values.append(rank_auc(probs[:, start], truth >= 0.5))
        else:
            per_class = [rank_auc(probs[:, start + c], np.round(truth) == c) for c in range(size)]
            finite = [v for v in per_class if not math.isnan(v)]
            values.append(float(np.mean(finite)) if finite else math.nan)
        start += size
    return values


def rank_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ordered = np.asarray(scores)[order]
    ranks = np.empty(len(ordered), dtype=float)
    # average ranks over ties
    _, first, counts = np.unique(ordered, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification(probs, labels, fmt, key_metric: str, units: Sequence[str], unit: str,
                   settings: dict[str, Any]) -> dict[str, Any]:
    """Intervals of the mean AUC (the key metric) and of each label's AUC."""
    probs = np.asarray(probs, dtype=float)
    labels = np.asarray(labels, dtype=float)
    units, unit = _aligned(units, unit, len(probs))
    sizes, names = list(fmt.sizes), list(fmt.names)

    def statistic(rows):
        aucs = fast_aucs(probs[rows], labels[rows], sizes)
        finite = [a for a in aucs if not math.isnan(a)]
        return [float(np.mean(finite)) if finite else math.nan, *aucs]

    found = bootstrap(statistic, [key_metric, *names], units, settings)
    return {key_metric: found.pop(key_metric), "auc_per_label": found, **envelope(settings, unit, units)}


def mean_dice(details: np.ndarray) -> float:
    """MeanDice's reduction ("mean", monai.metrics.utils.do_metric_reduction): each case's mean over its
    defined classes, then the mean over the cases that have one. Not the mean of every defined (case, class)
    Dice: that differs as soon as a case lacks a class, and the interval would then not be the key
    metric's."""
    defined = np.isfinite(details)
    counts = defined.sum(axis=1)
    if not counts.any():
        return math.nan
    per_case = np.where(defined, details, 0.0).sum(axis=1)[counts > 0] / counts[counts > 0]
    return float(per_case.mean())


def segmentation(details, first_class: int, key_metric: str, units: Sequence[str], unit: str,
                 settings: dict[str, Any]) -> dict[str, Any]:
    """Intervals of the mean Dice over cases (the key metric) and of each class's mean Dice."""
    array = np.asarray(details.detach().cpu() if hasattr(details, "detach") else details, dtype=float)
    if array.ndim == 1:
        array = array[:, None]
    names = [str(first_class + i) for i in range(array.shape[1])]
    units, unit = _aligned(units, unit, len(array))

    def statistic(rows):
        chosen = array[rows]
        per_class = [float(np.nanmean(c)) if np.isfinite(c).any() else math.nan for c in chosen.T]
        return [mean_dice(chosen), *per_class]

    found = bootstrap(statistic, [key_metric, *names], units, settings)
    return {key_metric: found.pop(key_metric), "dice_per_class": found, **envelope(settings, unit, units)}
