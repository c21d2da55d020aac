"""Which epoch `model.ckpt` holds: the model-selection rule, measured against validation noise (issue 35).

Clara's contract stays: `model.ckpt` is the best model, `model_final.ckpt` the last epoch's. What "best"
means is a rule over the per-epoch validation of the key metric, decided online (at the end of epoch e the
rule says whether epoch e becomes model.ckpt, since earlier weights are gone), from the history alone, so a
resumed run decides as an unbroken one. Every rule here is a pure function of that history and is replayed
offline by bench/model_selection.py on recorded runs, where each rule's pick is scored on a held-out split
no rule looks at (docs/classification.md, "Model selection").

Rules (`RULES`):
- `best`: the epoch with the highest key metric so far (Clara's rule, the first of equal values).
- `last`: every epoch replaces the previous one (model.ckpt = model_final.ckpt).
- `smooth3`: the epoch whose mean key metric over its last 3 validations is the highest so far: a single
  lucky validation does not win alone.
- `within_noise`: the latest epoch whose key metric is within one standard error of the best so far: a later
  model is preferred unless it is worse by more than the validation list can tell.
- `late_best`: as `best`, but the competition starts again at the last third of the epochs.

`RULE` is the one `mmar train` uses; the training log names it on the line of every new model.ckpt, and the
training state and `metrics.json` (`mmar validate` of model.ckpt) record which rule picked which epoch.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

SMOOTH_WINDOW = 3


def _best(values: list[float], noise: list[float], held: int, epochs: list[int], last_epoch: int) -> bool:
    e = len(values)
    return held == 0 or values[-1] > max(values[: e - 1])


def _last(values, noise, held, epochs, last_epoch) -> bool:
    return True


def _trailing(values: Sequence[float], window: int = SMOOTH_WINDOW) -> list[float]:
    return [float(np.mean(values[max(0, i + 1 - window): i + 1])) for i in range(len(values))]


def _smooth3(values, noise, held, epochs, last_epoch) -> bool:
    smoothed = _trailing(values)
    return held == 0 or smoothed[-1] > max(smoothed[:-1])


def _within_noise(values, noise, held, epochs, last_epoch) -> bool:
    best = int(np.argmax(values))  # the first of equal values
    margin = noise[best] if math.isfinite(noise[best]) else 0.0
    return held == 0 or values[-1] >= values[best] - margin


def _late_best(values, noise, held, epochs, last_epoch) -> bool:
    start = last_epoch - last_epoch // 3 + 1  # the first epoch of the last third
    if epochs[-1] < start:
        return _best(values, noise, held, epochs, last_epoch)
    late = [v for v, e in zip(values[:-1], epochs[:-1]) if e >= start]
    return not late or values[-1] > max(late)


RULES: dict[str, Callable[[list[float], list[float], int, list[int], int], bool]] = {
    "best": _best, "last": _last, "smooth3": _smooth3, "within_noise": _within_noise, "late_best": _late_best,
}
WHY = {
    "best": "the highest {key} so far",
    "last": "the latest epoch",
    "smooth3": "the highest mean {key} over its last 3 validations so far",
    "within_noise": "the latest epoch within one standard error of the best {key} so far",
    "late_best": "the highest {key} so far in the last third of the epochs",
}
# the engine's rule, chosen by bench/model_selection.py (docs/classification.md, "Model selection"): on
# BreastMNIST's dev split, 5 seeds, its pick's held-out AUC was level with `best`'s on the median (-0.004),
# ahead on the mean (0.878 against 0.865) and on the worst case (`best` lost 0.045 on two seeds by picking
# early, this rule at most 0.017); it is the last epoch where the curve has flattened, an earlier one where
# the curve falls by more than the validation list's noise
RULE = "within_noise"


def chooses(rule: str, values: Sequence[float], noise: Sequence[float], held: int, epochs: Sequence[int],
            last_epoch: int) -> bool:
    """Whether the latest validated epoch (epochs[-1], key metric values[-1]) becomes model.ckpt under `rule`.

    `values`: the key metric of every validation so far, in order; an undefined one (NaN) is never chosen, as
    under Clara's `value > best`; `noise`: its standard error at each (NaN: unknown, no margin); `held`: the
    epoch model.ckpt holds so far (0: none yet); `epochs`: the epoch of each validation; `last_epoch`: the
    run's last epoch."""
    if rule not in RULES:
        raise ValueError(f"unknown model-selection rule {rule!r} (known: {', '.join(RULES)})")
    if not math.isfinite(values[-1]):
        return False
    finite = [v if math.isfinite(v) else -math.inf for v in values]
    return RULES[rule](finite, list(noise), held, list(epochs), last_epoch)


def replay(rule: str, values: Sequence[float], noise: Sequence[float] | None = None) -> int:
    """The epoch (1-based, one validation per epoch) that model.ckpt holds at the end of a run under `rule`."""
    noise = list(noise) if noise is not None else [math.nan] * len(values)
    epochs = list(range(1, len(values) + 1))
    held = 0
    for e in epochs:
        if chooses(rule, values[:e], noise[:e], held, epochs[:e], len(values)):
            held = e
    return held


def why(rule: str, key: str) -> str:
    return WHY[rule].format(key=key)


# ---- the noise of a key metric -------------------------------------------------------------------


def auc_standard_error(probs, labels) -> float:
    """The standard error of a mean AUC over labels (Hanley & McNeil 1982 per binary label, from the AUC and
    the class counts; the labels taken as independent). probs / labels [N] or [N, L] (binary labels)."""
    from mmar.engine.intervals import rank_auc

    probs = np.asarray(probs, dtype=float).reshape(len(probs), -1)
    labels = np.asarray(labels, dtype=float).reshape(len(labels), -1)
    variances = []
    for j in range(labels.shape[1]):
        positive = labels[:, j] >= 0.5
        auc = rank_auc(probs[:, j], positive)
        if math.isnan(auc):
            continue
        variances.append(hanley_mcneil(auc, int(positive.sum()), int((~positive).sum())) ** 2)
    return math.sqrt(sum(variances)) / len(variances) if variances else math.nan


def hanley_mcneil(auc: float, positives: int, negatives: int) -> float:
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)) / (
        positives * negatives)
    return math.sqrt(max(variance, 0.0))


def mean_standard_error(per_case: Sequence[float]) -> float:
    """The standard error of a mean over cases (segmentation's mean Dice)."""
    values = np.asarray([v for v in per_case if math.isfinite(v)], dtype=float)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def record(rule: str, key: str, epoch: int, value: float) -> dict[str, Any]:
    """What the training state and metrics.json keep of the pick."""
    return {"rule": rule, "epoch": epoch, "key_metric": key, "value": value, "why": why(rule, key)}
