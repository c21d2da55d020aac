"""`mmar --gate METRIC>=X infer|export|push ...` with a real validation's eval/metrics.json, and a gate's
skip in `mmar run` (the same reading of the result as the operator's: tests/operator/test_gate_status.py)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_mmar


@pytest.fixture(scope="module")
def validated(trained_seg_mmar, tmp_path_factory) -> tuple[Path, float]:
    """A copy of the session's trained MMAR with a real validation: (root, its val_mean_dice)."""
    root = tmp_path_factory.mktemp("gate") / "mmar"
    shutil.copytree(trained_seg_mmar, root)
    run_mmar("validate", str(root))
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    return root, metrics["val_mean_dice"]


def copy_of(validated, tmp_path) -> Path:
    root = tmp_path / "mmar"
    shutil.copytree(validated[0], root)
    return root


def result(tmp_path, *args, check=True):
    log = tmp_path / "termination-log"
    run = run_mmar(*args, env={"MMAR_TERMINATION_LOG": str(log)}, check=check)
    return run, (json.loads(log.read_text()) if log.exists() else None)


def predictions(root: Path) -> list[Path]:
    return sorted(p for p in (root / "eval").rglob("*_seg.nii.gz"))


def test_a_gate_below_the_bar_skips_the_command_and_writes_nothing(validated, tmp_path):
    root = copy_of(validated, tmp_path)
    before = predictions(root)
    run, data = result(tmp_path, "--gate", "val_mean_dice>=1.01", "infer", str(root))
    assert run.returncode == 0
    assert f"gate: infer skipped: val_mean_dice {validated[1]:.4g} < 1.01 (eval/metrics.json)" in run.stdout
    assert data["command"] == "infer" and data["gate"]["passed"] is False and data["gate"]["value"] == pytest.approx(validated[1])
    assert predictions(root) == before  # nothing ran


def test_a_gate_at_the_bar_runs_the_command_and_its_result_carries_the_gate(validated, tmp_path):
    root = copy_of(validated, tmp_path)
    run, data = result(tmp_path, "--gate", f"val_mean_dice>={validated[1]}", "infer", str(root))
    assert run.returncode == 0 and "gate: val_mean_dice" in run.stdout
    assert data["command"] == "infer" and data["num_cases"] > 0 and data["gate"]["passed"] is True
    assert predictions(root)


def test_a_retrained_model_must_be_validated_again(validated, tmp_path):
    root = copy_of(validated, tmp_path)
    checkpoint = root / "models" / "model.ckpt"
    later = time.time() + 5
    os.utime(checkpoint, (later, later))
    run, data = result(tmp_path, "--gate", "val_mean_dice>=0", "export", str(root), "--formats", "onnx")
    assert run.returncode == 0 and data["gate"]["passed"] is False
    assert "model.ckpt was replaced after metrics.json was written: validate the current model first" in data["gate"]["message"]
    assert not (root / "models" / "model.onnx").exists()


def test_no_validation_yet_is_a_skip_that_says_what_to_do(validated, tmp_path):
    root = copy_of(validated, tmp_path)
    (root / "eval" / "metrics.json").unlink()
    run, data = result(tmp_path, "--gate", "val_mean_dice>=0.5", "infer", str(root))
    assert run.returncode == 0 and data["gate"]["passed"] is False and "run a validate step first" in data["gate"]["message"]


def test_a_metric_name_that_is_not_there_is_an_error_listing_the_real_ones(validated, tmp_path):
    root = copy_of(validated, tmp_path)
    run, data = result(tmp_path, "--gate", "val_dice>=0.5", "infer", str(root), check=False)
    assert run.returncode == 1
    assert "error: gate.metric: 'val_dice' is not in eval/metrics.json (its metrics: " in run.stderr and "val_mean_dice" in run.stderr
    assert data["command"] == "infer" and "val_dice" in data["error"]


@pytest.mark.parametrize("argv, message", [
    (["--gate", "val_mean_dice>=0.5", "train", "x"], "--gate: only infer, export, push can be gated, not train"),
    (["--gate", "val_mean_dice=0.5", "infer", "x"], "--gate: expected METRIC>=NUMBER or METRIC<=NUMBER"),
])
def test_bad_gate_options(tmp_path, argv, message):
    run = run_mmar(*argv, check=False)
    assert run.returncode != 0 and message in run.stderr


def test_mmar_run_records_a_skip_and_ends_cleanly(validated, seg_data, tmp_path):
    workspace = tmp_path / "workspace"
    shutil.copytree(validated[0], workspace / "seg")
    job = {
        "apiVersion": "mmar.dev/v1alpha1", "kind": "MMARJob", "metadata": {"name": "gated"},
        "spec": {"mmar": {"claimName": "ws", "path": "seg"}, "data": {"claimName": "d", "datalist": seg_data.name},
                 "gpusPerNode": 0,
                 "steps": [{"type": "infer", "gate": {"metric": "val_mean_dice", "atLeast": 1.01}},
                           {"type": "export", "formats": ["onnx"]}]},
    }
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    run = run_mmar("run", str(manifest), "--volume", f"ws={workspace}", "--volume", f"d={seg_data.parent}")
    assert "[1/2] infer: SKIPPED: val_mean_dice" in run.stdout and "1.01" in run.stdout
    status = json.loads((workspace / "gated.status.json").read_text())
    assert status["phase"] == "Succeeded" and status["reason"] == "GateNotMet"
    assert [s["phase"] for s in status["steps"]] == ["Skipped", "Skipped"]
    assert status["steps"][1]["message"] == "not run: step infer was skipped by its gate"
    assert status["results"]["gate"]["passed"] is False
    assert not (workspace / "seg" / "models" / "model.onnx").exists()
