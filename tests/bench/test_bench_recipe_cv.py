"""bench/recipe_cv.py's folds and its pooled, paired comparison (the training itself is run by hand)."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("recipe_cv", ROOT / "bench" / "recipe_cv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_folds_cover_every_image_once_keep_patients_together_and_the_label_mix():
    bench = load_bench()
    # ChestX-ray14 names carry the patient: 30 patients with 1-3 images each, a label per patient
    items = [{"image": f"/x/{p:08d}_{i:03d}.png", "label": [p % 3 == 0]} for p in range(30) for i in range(1 + p % 3)]
    parts = bench.folds(items, 5, seed=0)
    assert sorted(i["image"] for part in parts for i in part) == sorted(i["image"] for i in items)
    owner = {bench.bench.patient_of(i): f for f, part in enumerate(parts) for i in part}
    assert all(owner[bench.bench.patient_of(i)] == f for f, part in enumerate(parts) for i in part)
    positives = [sum(i["label"][0] for i in part if i["image"].endswith("_000.png")) for part in parts]
    assert max(positives) - min(positives) <= 1  # positive patients dealt out in turn
    assert parts == bench.folds(items, 5, seed=0) and parts != bench.folds(items, 5, seed=1)


def record(recipe: str, fold: int, labels, probs, draw: int = 0) -> dict:
    return {"data": "breastmnist", "recipe_name": recipe, "k": 2, "fold": fold, "seed": draw, "train_s": 1.0,
            "images": [f"{fold}_{i}.png" for i in range(len(labels))], "labels": [[y] for y in labels],
            "probs": [[p] for p in probs], "probs_tta_flip": [[p] for p in probs]}


def test_table_pools_the_folds_and_pairs_the_difference_on_the_same_images():
    bench = load_bench()
    rng = np.random.default_rng(0)
    labels = [[int(v) for v in rng.integers(0, 2, 60)] for _ in range(2)]
    noisy = [[float(np.clip(y * 0.3 + rng.random() * 0.7, 0, 1)) for y in fold] for fold in labels]
    sharp = [[float(np.clip(y * 0.8 + rng.random() * 0.2, 0, 1)) for y in fold] for fold in labels]
    runs = [record("default", f, labels[f], noisy[f]) for f in range(2)]
    runs += [record("better", f, labels[f], sharp[f]) for f in range(2)]
    table = bench.table(runs)
    rows = {line.split("|")[1].strip(): line.split("|") for line in table.splitlines() if line.startswith("| `")}
    assert set(rows) == {"`default`", "`better`"}
    assert rows["`better`"][3].strip() == "120"  # both folds pooled
    pooled = bench.mean_auc(np.array([[p] for f in sharp for p in f]), np.array([[y] for f in labels for y in f]))
    assert rows["`better`"][4].strip().startswith(f"{pooled:.4f}")
    difference = rows["`better`"][6]
    low = float(difference.split("(")[1].split(" to ")[0])
    assert low > 0  # a clearly better recipe: the paired interval of the difference excludes 0
    assert len(rows["`better`"][8].split(",")) == 2  # one paired difference per fold


def test_a_second_fold_draw_adds_its_predictions_and_resamples_whole_images():
    bench = load_bench()
    rng = np.random.default_rng(1)
    labels = [int(v) for v in rng.integers(0, 2, 40)]
    first = [float(np.clip(y * 0.5 + rng.random() * 0.5, 0, 1)) for y in labels]
    second = [float(np.clip(y * 0.5 + rng.random() * 0.5, 0, 1)) for y in labels]
    runs = [record("default", 0, labels, first, draw=0), record("default", 0, labels, second, draw=1)]
    rows = [line.split("|") for line in bench.table(runs).splitlines() if line.startswith("| `default`")]
    assert rows[0][3].strip() == "80"  # 40 images, each predicted in both draws
    probs, labels_, names = bench.pooled(runs, "probs")["default"]
    seen = []
    bench.bootstrap(lambda a: seen.append(len(a[1])) or 0.0, [(probs, labels_)], names, resamples=5)
    assert seen == [80] * 5  # whole images drawn: each brings its two rows
