"""bench/train_classification.py's data splits and table (the training runs themselves need ../shared/data)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_classification", ROOT / "bench" / "train_classification.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def items(count, positive_every):
    return [{"image": f"png/{i}.png", "label": [int(i % positive_every == 0)]} for i in range(count)]


def test_holdout_is_stratified_disjoint_and_reproducible(bench):
    data = items(100, 4)  # 25 positives, 75 negatives
    kept, held = bench.stratified_holdout(data, 0.2, seed=0)
    assert len(held) == 20 and len(kept) == 80
    assert sum(i["label"][0] for i in held) == 5  # a fifth of each label group
    assert not {i["image"] for i in kept} & {i["image"] for i in held}
    assert bench.stratified_holdout(data, 0.2, seed=0) == (kept, held)
    assert bench.stratified_holdout(data, 0.2, seed=1) != (kept, held)


def test_dev_split_never_reads_the_validation_list(bench, tmp_path):
    dataset = tmp_path / "ds"
    dataset.mkdir()
    (dataset / "datalist.json").write_text(json.dumps({"label_format": [1], "training": items(50, 3),
                                                       "validation": [{"image": "png/v.png", "label": [1]}]}))
    dev = json.loads(bench.write_split(dataset, "dev", tmp_path).read_text())
    final = json.loads(bench.write_split(dataset, "final", tmp_path).read_text())
    assert dev["label_format"] == [1] and len(dev["training"]) + len(dev["validation"]) == 50
    assert all("v.png" not in i["image"] for i in dev["training"] + dev["validation"])
    assert final["validation"] == [{"image": str((dataset / "png/v.png").resolve()), "label": [1]}]
    assert all(Path(i["image"]).is_absolute() for i in dev["training"])


def test_chestxray14_items_carry_their_patient_for_the_interval(bench):
    found = bench.with_patients([{"image": "/d/00012345_001.png", "label": [1]}, {"image": "/d/other.png", "label": [0]}])
    assert found == [{"image": "/d/00012345_001.png", "label": [1], "patient": "00012345"},
                     {"image": "/d/other.png", "label": [0]}]


def test_table_gives_medians_and_spread_over_seeds(bench):
    def run(seed, auc):
        return {"datalist": "/x/breastmnist_final.json", "recipe": "default", "seed": seed,
                "final": {"auc": auc, "accuracy": 0.8}, "best": {"auc": auc + 0.01, "accuracy": 0.8},
                "late_swing": 0.02, "epochs": 30, "median_epoch_seconds": 4.0, "train_seconds": 130.0,
                "history": [{"load1": 1.0}]}

    table = bench.summarize([run(0, 0.90), run(1, 0.94), run(2, 0.92)])
    row = table.splitlines()[2]
    assert "| breastmnist_final | default | 3 | 30 | 0.920 (0.900-0.940) |" in row


def test_every_candidate_is_a_list_of_set_overrides(bench):
    import sys

    sys.path.insert(0, str(ROOT / "runtime"))
    recipes = bench.candidates()
    assert recipes["default"] == [] and {"current", "resnet18_ema", "densenet_ema"} <= set(recipes)
    for name, overrides in recipes.items():
        for override in overrides:
            key, value = override.split("=", 1)
            json.loads(value)  # every value is JSON, as `mmar train --set` reads it


def test_images_of_one_patient_stay_on_one_side(bench):
    data = [{"image": f"png/{p:08d}_{k:03d}.png", "label": [p % 2]} for p in range(30) for k in range(3)]
    kept, held = bench.stratified_holdout(data, 0.2, seed=0)
    kept_patients = {bench.patient_of(i) for i in kept}
    held_patients = {bench.patient_of(i) for i in held}
    assert not kept_patients & held_patients and len(held_patients) == 6 and len(held) == 18
