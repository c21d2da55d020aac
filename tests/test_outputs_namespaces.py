"""infer's predictions and validate's set live in separate names of eval/, and a swap killed half-way is undone.

Through the real CLI on a copy of the session's trained MMAR (issue 31: item 6, and the leftover
`.mmar-previous-*` folders).
"""

from __future__ import annotations

import json
import os
import shutil
import socket

import nibabel as nib
import pytest

from conftest import run_mmar

HOST = socket.gethostname().replace("-", "_")
DEAD_PID = 2 ** 22 + 4321  # above Linux's default pid_max: no such process


@pytest.fixture
def mmar(trained_seg_copy):
    return trained_seg_copy


@pytest.fixture
def overlays_data(seg_data, tmp_path):
    """A data root whose test image sits in a folder named like validate's `overlays/`."""
    data = json.loads(seg_data.read_text())
    root = tmp_path / "data"
    (root / "overlays").mkdir(parents=True)
    (root / "labels").mkdir()
    item = data["validation"][0]
    shutil.copy(seg_data.parent / item["image"], root / "overlays" / "scan.nii.gz")
    shutil.copy(seg_data.parent / item["label"], root / "labels" / "scan.nii.gz")
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"validation": [{"image": "overlays/scan.nii.gz", "label": "labels/scan.nii.gz"}]}))
    return datalist


def test_validate_keeps_the_prediction_of_an_image_under_a_folder_named_overlays(mmar, overlays_data):
    eval_dir = mmar / "eval"
    env = ("--set", f"DATASET_JSON={overlays_data}")
    run_mmar("infer", str(mmar), *env)
    prediction = eval_dir / "predictions" / "overlays" / "scan_seg.nii.gz"
    assert prediction.is_file(), sorted(p.relative_to(eval_dir).as_posix() for p in eval_dir.rglob("*"))
    written = prediction.read_bytes()
    assert nib.load(prediction).shape == nib.load(overlays_data.parent / "overlays" / "scan.nii.gz").shape

    run_mmar("validate", str(mmar), *env)  # swaps overlays/ as a set: infer's file is not in it
    assert prediction.read_bytes() == written
    assert sorted(p.name for p in (eval_dir / "overlays").iterdir()) == ["best_scan.png", "worst_scan.png"]
    assert json.loads((eval_dir / "metrics.json").read_text())["num_cases"] == 1
    # a second validation replaces its set again, and still leaves the prediction alone
    run_mmar("validate", str(mmar), *env)
    assert prediction.read_bytes() == written
    assert not [p.name for p in eval_dir.iterdir() if p.name.startswith(".mmar-")]


def _old_set(eval_dir):
    """What a finished validation left: the set a killed swap must not lose."""
    (eval_dir / "overlays").mkdir(parents=True)
    files = {"metrics.json": '{"key_metric": "val_mean_dice", "val_mean_dice": 0.5, "num_cases": 2}\n',
             "cases.csv": "image,label,mean_dice\nold\n", "overlays/best_old.png": "old png"}
    for name, text in files.items():
        (eval_dir / name).write_text(text)
    return files


def _contents(eval_dir):
    return {p.relative_to(eval_dir).as_posix(): p.read_text() for p in eval_dir.rglob("*")
            if p.is_file() and p.relative_to(eval_dir).parts[0] != "predictions"
            and not p.relative_to(eval_dir).parts[0].startswith(".")}


def _kill_mid_swap(eval_dir, *, moved: bool, pid: int = DEAD_PID):
    """The folders a validation killed during its swap leaves: the old set (all of it when `moved`) in
    `.mmar-previous-*`, and in eval/ the new entries moved in so far; the rest of the new set in staging."""
    previous = eval_dir / f".mmar-previous-validate-{HOST}-{pid}-k1ll3d"
    staging = eval_dir / f".mmar-staging-validate-{HOST}-{pid}-k1ll3d"
    previous.mkdir()
    staging.mkdir()
    names = ["metrics.json", "cases.csv", "overlays"] if moved else ["metrics.json", "cases.csv"]
    for name in names:
        os.replace(eval_dir / name, previous / name)
    (previous / (".set-moved" if moved else ".set")).write_text(
        json.dumps({"last": "metrics.json", "names": ["cases.csv", "overlays"]}))
    if moved:  # the new cases.csv and overlays/ are in, its metrics.json was not yet
        (eval_dir / "cases.csv").write_text("image,label,mean_dice\nnew\n")
        (eval_dir / "overlays").mkdir()
        (eval_dir / "overlays" / "best_new.png").write_text("new png")
        (staging / "metrics.json").write_text('{"new": true}')
    return previous, staging


def test_a_swap_killed_half_way_is_undone_by_the_next_command(mmar):
    """Killed after the old set was moved aside and part of the new one moved in: the next `mmar infer` puts
    the old set back whole (not the old metrics.json beside the new cases.csv) and removes the leftovers."""
    eval_dir = mmar / "eval"
    old = _old_set(eval_dir)
    previous, staging = _kill_mid_swap(eval_dir, moved=True)
    live = eval_dir / f".mmar-previous-validate-{HOST}-{os.getpid()}-l1ve"  # a live process's (this test's)
    live.mkdir()
    (live / "cases.csv").write_text("someone else's")
    result = run_mmar("infer", str(mmar))
    assert _contents(eval_dir) == old
    assert not previous.exists() and not staging.exists()
    assert "restored" in result.stderr and previous.name in result.stderr
    assert live.is_dir(), "a live process's swap is its own"
    shutil.rmtree(live)
    assert not [p.name for p in eval_dir.iterdir() if p.name.startswith(".mmar-")]


@pytest.mark.parametrize("case", ["moving_away", "complete", "no_record"])
def test_a_leftover_previous_folder_is_resolved_by_what_it_records(tmp_path, case):
    from mmar.eval_output import remove_abandoned

    eval_dir = tmp_path / "eval"
    old = _old_set(eval_dir)
    if case == "moving_away":  # killed while moving the old set aside: overlays/ still in eval/, nothing new
        previous, _ = _kill_mid_swap(eval_dir, moved=False)
        expected = old
    elif case == "complete":  # killed after the new set was in, before the old one was deleted
        previous, staging = _kill_mid_swap(eval_dir, moved=True)
        os.replace(staging / "metrics.json", eval_dir / "metrics.json")
        expected = {"metrics.json": '{"new": true}', "cases.csv": "image,label,mean_dice\nnew\n",
                    "overlays/best_new.png": "new png"}
    else:  # a folder of an older version, no record: what eval/ lacks goes back
        previous = eval_dir / f".mmar-previous-validate-{HOST}-{DEAD_PID}-0ld"
        previous.mkdir()
        os.replace(eval_dir / "metrics.json", previous / "metrics.json")
        expected = old
    messages = []
    removed = remove_abandoned(eval_dir, log=messages.append)
    assert previous in removed and not previous.exists()
    assert _contents(eval_dir) == expected
    assert bool(messages) == (case != "complete")
    assert not [p.name for p in eval_dir.iterdir() if p.name.startswith(".mmar-")]
