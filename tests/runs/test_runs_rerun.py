"""A re-run never loses a result: a finished training is left alone unless extended or restarted, and
whatever instant a kill hits, the resume state and the model files agree (real CLI, tiny data)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from mmar.engine import selection

from conftest import make_seg_mmar, run_mmar
from runs_support import copy_mmar, digests, load, scalar_steps, signal_when, start, temp_files


def rule_picks(progress: dict, last_epoch: int | None = None) -> list[int]:
    """The epochs the run's selection rule picked, in order, replayed on the validations the state records
    (`last_epoch`: the run's, where the rule needs it; by default the last validated)."""
    seen, held, picks = progress["validations"], 0, []
    last_epoch = last_epoch or seen["epochs"][-1]
    for i in range(len(seen["epochs"])):
        if selection.chooses(progress["selection_rule"], seen["values"][: i + 1], seen["noise"][: i + 1], held,
                             seen["epochs"][: i + 1], last_epoch):
            held = seen["epochs"][i]
            picks.append(held)
    return picks


def assert_model_is_the_rules_pick(model: dict, progress: dict) -> None:
    """model.ckpt's contract: the epoch the selection rule picked from the validations the state records, with
    that epoch's key metric, and the record (rule, epoch, value) that metrics.json copies."""
    seen = progress["validations"]
    assert progress["selection_rule"] == selection.RULE
    assert model["epoch"] == progress["best_epoch"] == rule_picks(progress)[-1], (model["epoch"], seen)
    assert model["metric"] == progress["best_metric"] == seen["values"][seen["epochs"].index(model["epoch"])]
    assert model["selection"] == selection.record(progress["selection_rule"], progress["key_metric"], model["epoch"],
                                                  model["metric"])


@pytest.fixture
def trained(trained_seg_mmar, tmp_path):
    return copy_mmar(trained_seg_mmar, tmp_path / "mmar")


@pytest.mark.slow
def test_a_finished_training_re_run_changes_nothing(trained):
    models = trained / "models"
    before = digests(models)
    result = run_mmar("train", str(trained))
    assert "already finished 2 epochs" in result.stdout and "nothing changed" in result.stdout, result.stdout
    assert "--restart" in result.stdout and "epochs=" in result.stdout  # it says how to go on or start over
    assert digests(models) == before
    # fine-tuning's re-run alike, once it has finished
    run_mmar("train", str(trained), "--finetune", "--set", "epochs=1")
    before = digests(models)
    result = run_mmar("train", str(trained), "--finetune", "--set", "epochs=1")
    assert "fine-tuning in" in result.stdout and "already finished 1 epochs" in result.stdout, result.stdout
    assert digests(models) == before


def test_raising_epochs_goes_on_and_restart_moves_the_old_models_aside(trained):
    models = trained / "models"
    old_best = load(models / "model.ckpt")
    kept_before = digests(models)
    result = run_mmar("train", str(trained), "--set", "epochs=3")
    assert "resuming train" in result.stdout and "after epoch 2" in result.stdout, result.stdout
    state = load(models / "train_state.pt")
    assert state["complete"] and [r["epoch"] for r in state["progress"]["history"]] == [1, 2, 3]
    best = load(models / "model.ckpt")
    # model.ckpt is the rule's pick over all 3 validations, as an unbroken run decides it (not "the highest so
    # far": `within_noise` may pick a later epoch with a lower metric); unchanged unless epoch 3 was picked
    assert_model_is_the_rules_pick(best, state["progress"])
    assert best["epoch"] in (old_best["epoch"], 3)
    if best["epoch"] == old_best["epoch"]:
        assert digests(models)["model.ckpt"] == kept_before["model.ckpt"]
    # metrics.json (mmar validate of model.ckpt) records the same pick
    run_mmar("validate", str(trained))
    recorded = json.loads((trained / "eval" / "metrics.json").read_text())["selection"]
    assert recorded == best["selection"], recorded
    # the schedule is a 3-epoch one (cosine T_max 3), not the old one's end: epoch 3 learns
    assert state["progress"]["history"][2]["lr"] > 0

    kept = digests(models)
    result = run_mmar("train", str(trained), "--restart", "--set", "epochs=1")
    previous = list((models / "previous").iterdir())
    assert len(previous) == 1 and str(previous[0]) in result.stdout
    for name in ("model.ckpt", "model_final.ckpt", "train_state.pt", "training_curves.png"):
        assert digests(previous[0])[name] == kept[name], name
    assert load(models / "train_state.pt")["trainer"]["epoch"] == 1
    # each run has its own TensorBoard folder; the resumed one continued its run's folder
    runs = sorted(p.name for p in (models / "runs").iterdir())
    assert len(runs) == 2 and all(re.fullmatch(r"train-\d{8}-\d{6}", r) for r in runs), runs
    assert sorted(len(scalar_steps(models / "runs" / r)) for r in runs) == [1, 3]


def test_killed_after_marking_the_state_complete_the_re_run_writes_model_final(tmp_path, seg_data):
    """SIGKILL while model_final.ckpt is being written (the state already says complete)."""
    root = make_seg_mmar(tmp_path / "mmar", seg_data, epochs=2)
    models = root / "models"
    process = start("train", str(root))
    signal_when(process, models, r"\.model_final\.ckpt\.\d+\..+\.tmp\.ckpt")
    process.wait()
    state = load(models / "train_state.pt")
    assert state["complete"] and not (models / "model_final.ckpt").exists()
    best = digests(models)["model.ckpt"]
    result = run_mmar("train", str(root))
    assert "model_final.ckpt written from train_state.pt" in result.stdout, result.stdout
    assert "already finished 2 epochs" in result.stdout
    assert digests(models)["model.ckpt"] == best
    final = load(models / "model_final.ckpt")
    assert final["epoch"] == 2
    for key, value in state["ema"]["weights"].items():  # the final model is the state's (averaged) one
        torch.testing.assert_close(final["model"][key], value, msg=key)
    assert not temp_files(models)  # the dead writer's temp file was removed


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["state", "model"])
def test_a_kill_at_the_end_of_an_epoch_leaves_state_and_models_in_agreement(tmp_path, seg_data, moment):
    """SIGKILL while train_state.pt (or model.ckpt) of an epoch after the first is being written, then re-run:
    model.ckpt is the best the state records, and TensorBoard shows every epoch once."""
    root = make_seg_mmar(tmp_path / "mmar", seg_data, epochs=4)
    models = root / "models"
    process = start("train", str(root), "--set", "num_training_epoch_per_valid=1")
    pattern = r"\.train_state\.pt\.\d+\..+\.tmp\.pt" if moment == "state" else r"\.model\.ckpt\.\d+\..+\.tmp\.ckpt"
    # an epoch after the first: a state and a model.ckpt are there already
    signal_when(process, models, pattern,
                when=lambda: (models / "train_state.pt").exists() and (models / "model.ckpt").exists())
    process.wait()
    # what a resume reads: the state, and a model.ckpt no newer than it
    state = load(models / "train_state.pt")
    on_disk = load(models / "model.ckpt")
    assert on_disk["epoch"] <= state["trainer"]["epoch"]
    # a pick the rule made, the state's or (killed before its model.ckpt was written) the one before it; not
    # "a metric no higher than the state's": `within_noise` may pick a later epoch with a lower metric
    progress = state["progress"]
    picks = rule_picks(progress, last_epoch=4)
    assert on_disk["epoch"] in picks[-2:] and on_disk["epoch"] <= progress["best_epoch"], (on_disk["epoch"], picks)
    seen = progress["validations"]
    assert on_disk["metric"] == seen["values"][seen["epochs"].index(on_disk["epoch"])]
    if moment == "state":  # the state being written was not yet the one on disk: the state's pick was written
        assert on_disk["epoch"] == progress["best_epoch"]

    result = run_mmar("train", str(root), "--set", "num_training_epoch_per_valid=1")
    if moment == "model":  # killed after the state of an improved epoch: its model.ckpt is written from it
        assert "model.ckpt written from train_state.pt" in result.stdout, result.stdout
    state = load(models / "train_state.pt")
    best = load(models / "model.ckpt")
    assert state["complete"] and [r["epoch"] for r in state["progress"]["history"]] == [1, 2, 3, 4]
    assert (best["epoch"], best["metric"]) == (state["progress"]["best_epoch"], state["progress"]["best_metric"]), \
        result.stdout
    assert_model_is_the_rules_pick(best, state["progress"])  # the killed and resumed run decides as an unbroken one
    (run,) = (models / "runs").iterdir()
    assert scalar_steps(run) == [1, 2, 3, 4]
    assert scalar_steps(run, "val_mean_dice") == [1, 2, 3, 4]
