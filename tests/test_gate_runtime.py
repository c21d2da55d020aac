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


def other_model(source: Path, target: Path, shift: float = 0.05) -> Path:
    """A checkpoint of the same network with other weights (another training's model)."""
    import torch

    data = torch.load(source, weights_only=False)
    data["model"] = {k: v + shift if v.is_floating_point() else v for k, v in data["model"].items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, target)
    return target


def test_a_replaced_model_must_be_validated_again_whatever_its_mtime(validated, tmp_path):
    """A retrained model, one put back with `mv` (an old mtime), or one replaced within one mtime tick: the
    gate compares content (sha256), not times."""
    root = copy_of(validated, tmp_path)
    checkpoint = root / "models" / "model.ckpt"
    stat = checkpoint.stat()
    other_model(checkpoint, tmp_path / "previous" / "model.ckpt")
    os.replace(tmp_path / "previous" / "model.ckpt", checkpoint)
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as old as the validated one
    run, data = result(tmp_path, "--gate", "val_mean_dice>=0", "export", str(root), "--formats", "onnx")
    assert run.returncode == 0 and data["gate"]["passed"] is False
    assert f"{checkpoint} is not the model eval/metrics.json measured" in data["gate"]["message"]
    assert f"validate it first (`mmar validate {root} --ckpt {checkpoint}`)" in data["gate"]["message"]
    assert not (root / "models" / "model.onnx").exists()


def test_the_gate_opens_only_for_the_model_that_was_validated(validated, tmp_path):
    """Issue 31 item 2: `validate G --ckpt OTHER` speaks for OTHER, not for G's own model.ckpt; `--ckpt ANY` on
    the gated command is the model compared."""
    root = copy_of(validated, tmp_path)
    other = other_model(root / "models" / "model.ckpt", tmp_path / "other" / "model.ckpt")
    run_mmar("validate", str(root), "--ckpt", str(other))
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(other) and len(metrics["checkpoint_sha256"]) == 64
    before = predictions(root)
    for argv in (["infer", str(root)], ["infer", str(root), "--ckpt", str(root / "models" / "model.ckpt")],
                 ["export", str(root), "--formats", "onnx"]):
        run, data = result(tmp_path, "--gate", "val_mean_dice>=0", *argv)
        assert run.returncode == 0 and data["gate"]["passed"] is False, (argv, data)
        assert "is not the model eval/metrics.json measured" in data["gate"]["message"]
    assert predictions(root) == before and not (root / "models" / "model.onnx").exists()
    anything = other_model(other, tmp_path / "any" / "model.ckpt", shift=0.1)  # --ckpt ANY
    run, data = result(tmp_path, "--gate", "val_mean_dice>=0", "infer", str(root), "--ckpt", str(anything))
    assert data["gate"]["passed"] is False and predictions(root) == before
    run, data = result(tmp_path, "--gate", "val_mean_dice>=0", "infer", str(root), "--ckpt", str(other))
    assert run.returncode == 0 and data["gate"]["passed"] is True and data["num_cases"] > 0  # the validated one


def test_an_export_stands_for_the_checkpoint_it_was_made_from(validated, tmp_path):
    """validate (checkpoint) -> export -> a gated infer of the export: export.json ties the two; a retrained
    checkpoint unties them."""
    root = copy_of(validated, tmp_path)
    run_mmar("export", str(root), "--formats", "onnx")
    run, data = result(tmp_path, "--gate", "val_mean_dice>=0", "infer", str(root), "--model", "onnx")
    assert run.returncode == 0 and data["gate"]["passed"] is True, run.stdout
    checkpoint = root / "models" / "model.ckpt"
    os.replace(other_model(checkpoint, tmp_path / "retrained" / "model.ckpt"), checkpoint)
    run, data = result(tmp_path, "--gate", "val_mean_dice>=0", "infer", str(root), "--model", "onnx",
                       "--allow-stale-export")
    assert data["gate"]["passed"] is False and "is not the model eval/metrics.json measured" in data["gate"]["message"]


@pytest.mark.parametrize("value", ["Infinity", "NaN", "1e999"])
def test_a_metric_that_is_not_a_finite_number_does_not_pass(validated, tmp_path, value):
    root = copy_of(validated, tmp_path)
    path = root / "eval" / "metrics.json"
    path.write_text(path.read_text().replace(f'"val_mean_dice": {json.loads(path.read_text())["val_mean_dice"]!r}',
                                             f'"val_mean_dice": {value}'))
    assert value in path.read_text()
    run, data = result(tmp_path, "--gate", "val_mean_dice>=0.5", "infer", str(root))
    assert run.returncode == 0 and data["gate"]["passed"] is False and data["gate"]["value"] is None
    assert "val_mean_dice is undefined in eval/metrics.json" in data["gate"]["message"]


def test_a_validation_that_did_not_record_its_model_does_not_pass(validated, tmp_path):
    root = copy_of(validated, tmp_path)
    path = root / "eval" / "metrics.json"
    metrics = json.loads(path.read_text())
    del metrics["checkpoint_sha256"]  # as an older mmar wrote it
    path.write_text(json.dumps(metrics))
    run, data = result(tmp_path, "--gate", "val_mean_dice>=0", "infer", str(root))
    assert data["gate"]["passed"] is False
    assert "eval/metrics.json does not record which model it measured (checkpoint_sha256" in data["gate"]["message"]


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
