#!/usr/bin/env python
"""How far a validation AUC can move by the luck of which images are in the list: a bootstrap interval.

Reads the per-case table `mmar validate` writes (eval/cases.csv: `<label>_true` and `<label>_prob` columns)
and resamples the cases with replacement (whole patients when the images are named as ChestX-ray14's
`<patient>_<follow-up>.png`, since images of one patient are not independent), recomputing the mean AUC
over the labels with both classes in each resample. The bootstrap is the runtime's own
(`mmar.engine.intervals`, which writes metrics.json's `intervals` in `mmar validate`); this script only adds
reading a cases.csv and the ChestX-ray14 patient from the file name (metrics.json's interval takes the
patient from a `patient` key in the datalist's items). docs/classification.md quotes it beside the goals.

    python bench/auc_interval.py RUN/eval/cases.csv [MORE.csv ...] [--resamples 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "runtime"))

from train_classification import patient_of  # noqa: E402  (the same patients as the bench's dev split)


def mean_auc(probs, labels, fmt) -> float:
    """The mean AUC as metrics.json has it (mmar.classification_metrics: labels with both classes only)."""
    from mmar.classification_metrics import label_aucs, nanmean

    return nanmean(label_aucs(probs, labels, fmt))


def read_cases(path: Path):
    """eval/cases.csv -> (probabilities [N, outputs], labels [N, labels], LabelFormat, resampling unit per row);
    the label format is read back from the header (`name_true` per label, `name_prob` or `name=c_prob`)."""
    import torch

    from mmar.label_format import LabelFormat

    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise SystemExit(f"{path}: no cases")
    names = [column[: -len("_true")] for column in rows[0] if column.endswith("_true")]
    sizes = [1 if f"{name}_prob" in rows[0] else sum(1 for c in rows[0] if c.startswith(f"{name}=") and c.endswith("_prob"))
             for name in names]
    if not names or 0 in sizes:
        raise SystemExit(f"{path}: expected the columns mmar validate writes (<label>_true, <label>_prob or "
                         f"<label>=<class>_prob); labels without probabilities: {[n for n, k in zip(names, sizes) if not k]}")
    fmt = LabelFormat(tuple(sizes), tuple(names))
    probs = torch.tensor([[float(row[f"{column}_prob"]) for column in fmt.columns()] for row in rows])
    labels = torch.tensor([[float(row[f"{name}_true"]) for name in names] for row in rows])
    groups = [patient_of(row) for row in rows]
    return probs, labels, fmt, groups


def interval(probs, labels, fmt, groups, resamples: int, seed: int) -> tuple[float, float, float]:
    from mmar.engine import intervals

    settings = {**intervals.DEFAULTS, "resamples": resamples, "seed": seed}
    found = intervals.classification(np.asarray(probs), np.asarray(labels), fmt, "mean_auc", groups, "patient",
                                     settings)
    return mean_auc(probs, labels, fmt), found["mean_auc"]["lower"], found["mean_auc"]["upper"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="+", type=Path)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in args.cases:
        probs, labels, fmt, groups = read_cases(path)
        value, low, high = interval(probs, labels, fmt, groups, args.resamples, args.seed)
        print(f"{path}: mean AUC {value:.3f}, 95 % bootstrap interval {low:.3f}-{high:.3f} "
              f"({len(labels)} cases, {len(set(groups))} resampled units)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
