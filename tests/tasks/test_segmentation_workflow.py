"""init -> train -> validate -> infer on tiny generated volumes, through the real CLI."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import torch

from conftest import run_mmar
from runs_support import kill_when


def test_init_scaffolds_a_clara_mmar(seg_mmar):
    for name in ("config/config_train.json", "config/config_validation.json", "config/environment.json",
                 "commands/train.sh", "commands/train_finetune.sh", "commands/validate.sh", "commands/infer.sh"):
        assert (seg_mmar / name).is_file(), name
    env = json.loads((seg_mmar / "config" / "environment.json").read_text())
    assert set(env) >= {"DATA_ROOT", "DATASET_JSON", "MMAR_CKPT_DIR", "MMAR_EVAL_OUTPUT_PATH", "PROCESSING_TASK"}
    config = json.loads((seg_mmar / "config" / "config_train.json").read_text())
    assert config["num_classes"] == 3  # read from the labels
    assert config["network"]["_target_"] == "monai.networks.nets.UNet"
    assert config["validate"]["key_metric"] == "val_mean_dice"


def test_init_refuses_to_overwrite(seg_mmar, seg_data):
    result = run_mmar("init", str(seg_mmar), "--datalist", str(seg_data), check=False)
    assert result.returncode == 1 and "exists" in result.stderr
    assert run_mmar("init", str(seg_mmar), "--datalist", str(seg_data), "--exist-ok").returncode == 0


def test_train_writes_models_and_training_outputs(trained_seg_mmar):
    models = trained_seg_mmar / "models"
    best = torch.load(models / "model.ckpt", weights_only=False)
    final = torch.load(models / "model_final.ckpt", weights_only=False)
    state = torch.load(models / "train_state.pt", weights_only=False)
    assert best["key_metric"] == "val_mean_dice" and 0.0 <= best["metric"] <= 1.0
    assert final["epoch"] == 2 and state["complete"] and state["trainer"]["epoch"] == 2
    assert len(state["progress"]["history"]) == 2
    assert list(models.glob("runs/train-*/events.out.tfevents.*")), "TensorBoard events (one folder per run)"
    assert (models / "training_curves.png").stat().st_size > 1000
    # the default averages the weights (train#ema): the average is what was validated and is saved, the
    # trained network (which goes on training on a resume) is in the state beside it
    assert state["ema"]["updates"] == state["trainer"]["iteration"] > 0
    for key, value in state["ema"]["weights"].items():
        torch.testing.assert_close(final["model"][key], value.cpu(), msg=key)
    assert any(not torch.equal(state["model"][k].cpu(), v) for k, v in final["model"].items() if v.is_floating_point())
    if best["epoch"] == 2:
        torch.testing.assert_close(best["model"], final["model"])


def test_validate_writes_metrics_cases_and_overlays(trained_seg_mmar, tmp_path):
    result = run_mmar("validate", str(trained_seg_mmar), env={"MMAR_TERMINATION_LOG": str(tmp_path / "term")})
    metrics = json.loads((trained_seg_mmar / "eval" / "metrics.json").read_text())
    assert metrics["key_metric"] == "val_mean_dice"
    assert set(metrics["dice_per_class"]) == {"1", "2"}
    assert np.isclose(metrics["val_mean_dice"], np.nanmean(list(metrics["dice_per_class"].values())), atol=0.05)
    lines = (trained_seg_mmar / "eval" / "cases.csv").read_text().splitlines()
    assert lines[0] == "image,label,dice_1,dice_2,mean_dice" and len(lines) == 1 + metrics["num_cases"]
    assert list((trained_seg_mmar / "eval" / "overlays").glob("*.png"))
    report = json.loads((tmp_path / "term").read_text())
    assert report["command"] == "validate" and report["metric"] == metrics["val_mean_dice"]
    assert "val_mean_dice" in result.stdout


def test_infer_preserves_geometry_and_needs_no_label(trained_seg_mmar, seg_data, tmp_path):
    data = json.loads(seg_data.read_text())
    test_list = tmp_path / "test.json"
    test_list.write_text(json.dumps({"test": [{"image": str(seg_data.parent / i["image"])} for i in data["validation"]]}))
    out = tmp_path / "predictions"
    run_mmar("infer", str(trained_seg_mmar), "--key", "test",
             "--set", f"DATASET_JSON={test_list}", f"MMAR_EVAL_OUTPUT_PATH={out}")
    for item in data["validation"]:
        source = nib.load(seg_data.parent / item["image"])
        name = item["image"].split("/")[-1].replace(".nii.gz", "_seg.nii.gz")
        mask = nib.load(out / "predictions" / name)
        assert mask.shape == source.shape
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}


def test_resume_after_a_killed_run(seg_mmar):
    """SIGKILL mid-training, re-run: it resumes from the last finished epoch and ends with all epochs."""
    command = [sys.executable, "-m", "mmar", "train", str(seg_mmar), "--set", "epochs=8"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state_file = seg_mmar / "models" / "train_state.pt"

    def epoch_two_or_later():
        epoch = torch.load(state_file, weights_only=False)["trainer"]["epoch"] if state_file.exists() else 0
        return epoch if epoch >= 2 else None

    killed_after = kill_when(process, epoch_two_or_later)
    process.wait()
    assert killed_after is not None and killed_after < 8, "the run was not killed mid-training"
    result = run_mmar("train", str(seg_mmar), "--set", "epochs=8")
    resumed_from = int(result.stdout.split("after epoch ")[1].split()[0])
    assert killed_after <= resumed_from < 8
    state = torch.load(state_file, weights_only=False)
    assert state["complete"] and state["trainer"]["epoch"] == 8
    assert [r["epoch"] for r in state["progress"]["history"]] == list(range(1, 9))
    assert state["ema"]["updates"] == state["trainer"]["iteration"]  # the average went on across the kill


def test_finetune_starts_from_the_best_model(trained_seg_mmar, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(trained_seg_mmar, root)
    result = run_mmar("train", str(root), "--finetune", "--set", "epochs=1")
    assert "fine-tuning from" in result.stdout and str(root / "models" / "model.ckpt") in result.stdout
    assert (root / "commands" / "train_finetune.sh").read_text().count("--finetune") == 1
