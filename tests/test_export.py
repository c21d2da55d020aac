"""mmar export -> TorchScript / ONNX (TensorRT where a GPU is) with parity, and validate/infer through them."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import SMALL_CLASSIFICATION, run_mmar
from mmar.engine.precision import cpu_bf16_supported
from mmar.predict import tensorrt_unavailable

NO_TENSORRT = tensorrt_unavailable()


def cli(capsys, *args):
    """The CLI in this process (its dispatch and error handling, without a fresh torch import per call)."""
    from mmar.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def copy_mmar(source, target):
    shutil.copytree(source, target)
    for stale in ("model.ts", "model.onnx", "model.trt", "export.json"):
        (target / "models" / stale).unlink(missing_ok=True)
    return target


@pytest.fixture(scope="module")
def exported_seg(trained_seg_mmar, tmp_path_factory):
    """A copy of the trained MMAR (the session fixture stays untouched), exported once with the defaults."""
    root = copy_mmar(trained_seg_mmar, tmp_path_factory.mktemp("export") / "mmar")
    result = run_mmar("export", str(root))
    return root, result


def load_network(root):
    from mmar.archive import load_archive
    from mmar.predict import load_network

    return load_network(load_archive(root))


def test_export_writes_checked_torchscript_and_onnx(exported_seg):
    import onnx

    root, result = exported_seg
    models = root / "models"
    report = json.loads((models / "export.json").read_text())
    assert report["task"] == "segmentation" and report["input_shape"] == [1, 1, 16, 16, 16]  # from the config
    assert report["checkpoint"]["path"] == str(models / "model.ckpt") and len(report["checkpoint"]["sha256"]) == 64
    for name, file in (("torchscript", "model.ts"), ("onnx", "model.onnx")):
        entry = report["formats"][name]
        assert (models / file).is_file() and entry["file"] == file
        assert 0.0 <= entry["max_abs_diff"] <= entry["tolerance"] < 0.1
        assert [2, 1, 16, 16, 32] in entry["checked_shapes"]  # batch and spatial axes proven dynamic
    onnx_entry = report["formats"]["onnx"]
    assert onnx_entry["opset"] >= 17 and onnx_entry["dynamic_batch"] and onnx_entry["dynamic_spatial"]
    onnx.checker.check_model(str(models / "model.onnx"))
    assert not [p.name for p in models.iterdir() if p.name.startswith(".") and p.name != ".mmar.lock"], \
        "temp files left behind"
    if NO_TENSORRT:
        assert "tensorrt: skipped" in result.stdout and "the other formats are still written" in result.stdout
        assert report["formats"]["tensorrt"] == {"skipped": NO_TENSORRT} and not (models / "model.trt").exists()


def test_exported_models_match_pytorch_at_another_shape(exported_seg):
    from mmar.predict import load_file

    root, _ = exported_seg
    network = load_network(root)
    x = torch.randn(3, 1, 32, 16, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = network(x)
        for kind, file in (("ts", "model.ts"), ("onnx", "model.onnx")):
            output = load_file(root / "models" / file, kind)(x)
            assert output.shape == reference.shape
            assert float((output - reference).abs().max()) < 1e-3, kind


def test_validate_and_infer_through_each_format(exported_seg, tmp_path, capsys):
    root, _ = exported_seg
    dice = {}
    # the exported files are float32 graphs: the checkpoint in float32 is what they must match
    for model, extra in (("ckpt", ["--set", "amp=false"]), ("ts", []), ("onnx", []), ("ckpt-amp", [])):
        code, out, _ = cli(capsys, "validate", str(root), "--model", model.removesuffix("-amp"), *extra)
        assert code == 0
        metrics = json.loads((root / "eval" / "metrics.json").read_text())
        assert metrics["model"] == model.removesuffix("-amp")
        assert ("precision:" in out) == (model == "ckpt-amp" and cpu_bf16_supported())
        dice[model] = metrics["val_mean_dice"]
    assert dice["ts"] == pytest.approx(dice["ckpt"], abs=1e-4)
    assert dice["onnx"] == pytest.approx(dice["ckpt"], abs=1e-4)
    # the config's amp (the default): bf16 autocast where the CPU has it, as the per-epoch validation
    assert dice["ckpt-amp"] == pytest.approx(dice["ckpt"], abs=1e-2)

    masks = {}
    for model in ("ckpt", "onnx"):
        out = tmp_path / model
        assert cli(capsys, "infer", str(root), "--model", model, "--set", f"MMAR_EVAL_OUTPUT_PATH={out}",
                   "amp=false")[0] == 0
        # predictions keep the image's path under the data root (imagesTr/...): one file per image
        masks[model] = {p.relative_to(out).as_posix(): np.asarray(nib.load(p).dataobj)
                        for p in sorted(out.rglob("*_seg.nii.gz"))}
    assert masks["ckpt"] and masks["ckpt"].keys() == masks["onnx"].keys()
    for name, mask in masks["ckpt"].items():
        assert (mask == masks["onnx"][name]).mean() > 0.999, name


def test_ckpt_option_picks_an_exported_file(exported_seg, tmp_path, capsys):
    root, _ = exported_seg
    moved = tmp_path / "elsewhere.onnx"
    shutil.copy(root / "models" / "model.onnx", moved)
    assert cli(capsys, "validate", str(root), "--model", "onnx", "--ckpt", str(moved))[0] == 0
    assert json.loads((root / "eval" / "metrics.json").read_text())["checkpoint"] == str(moved)
    code, _, err = cli(capsys, "validate", str(root), "--model", "ts", "--ckpt", str(tmp_path / "none.ts"))
    assert code == 1 and "model file not found" in err and "none.ts" in err


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT and a GPU are present here")
def test_tensorrt_alone_without_a_gpu_is_a_clear_error(exported_seg, capsys):
    root, _ = exported_seg
    code, _, err = cli(capsys, "export", str(root), "--formats", "tensorrt")
    assert code == 1 and "nothing exported" in err and "tensorrt" in err
    code, _, err = cli(capsys, "validate", str(root), "--model", "trt")
    assert code == 1 and "TensorRT" in err


def test_parity_failure_fails_loudly_and_writes_nothing(trained_seg_mmar, tmp_path, capsys):
    root = copy_mmar(trained_seg_mmar, tmp_path / "mmar")
    models = root / "models"
    (models / "model.ts").write_bytes(b"previous export")  # must survive a failed export
    # ONNX Runtime's convolutions round differently from PyTorch's (~1e-6): a 1e-12 tolerance cannot hold
    code, _, err = cli(capsys, "export", str(root), "--formats", "torchscript,onnx", "--tolerance", "1e-12")
    assert code == 1
    assert "onnx" in err and "differ from PyTorch" in err and "nothing was written" in err
    assert (models / "model.ts").read_bytes() == b"previous export"  # torchscript passed, yet was not renamed
    assert not (models / "model.onnx").exists() and not (models / "export.json").exists()
    assert not [p.name for p in models.iterdir() if p.name.startswith(".") and p.name != ".mmar.lock"], \
        "temp files left behind"


def test_corrupt_or_missing_checkpoint_is_a_clear_error(trained_seg_mmar, tmp_path):
    root = copy_mmar(trained_seg_mmar, tmp_path / "mmar")
    result = run_mmar("export", str(root), "--ckpt", str(tmp_path / "nope.ckpt"), check=False)
    assert result.returncode == 1 and "checkpoint not found" in result.stderr and "nope.ckpt" in result.stderr
    (root / "models" / "model.ckpt").write_bytes(b"\x00not a checkpoint" * 10)
    result = run_mmar("export", str(root), check=False)
    assert result.returncode == 1 and "model.ckpt" in result.stderr and "corrupt" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / "models" / "model.onnx").exists() and not (root / "models" / "model.ts").exists()


def test_bad_arguments_are_named(trained_seg_mmar, tmp_path, capsys):
    root = copy_mmar(trained_seg_mmar, tmp_path / "mmar")
    code, _, err = cli(capsys, "export", str(root), "--input-shape", "1,2,16,16,16", "--formats", "onnx")
    assert code == 1 and "does not accept input shape [1, 2, 16, 16, 16]" in err
    code, _, err = cli(capsys, "export", str(root), "--formats", "onnx,savedmodel")
    assert code == 1 and "--formats" in err
    code, _, err = cli(capsys, "validate", str(root), "--model", "pb")
    assert code == 1 and "unknown model format" in err


def test_fixed_axes_are_checked_with_a_clear_message():
    from mmar.errors import MMARError
    from mmar.predict import check_fixed_axes

    check_fixed_axes("m.onnx", ["batch", 1, 96, 96, 96], (4, 1, 96, 96, 96), skip_batch=True)
    with pytest.raises(MMARError, match="roi_size"):
        check_fixed_axes("m.onnx", ["batch", 1, 96, 96, 96], (4, 1, 64, 96, 96), skip_batch=True)
    with pytest.raises(MMARError, match="4-D input"):
        check_fixed_axes("m.onnx", ["batch", 1, 96, 96], (4, 1, 64, 96, 96), skip_batch=True)


def test_fixed_batch_onnx_model_runs_any_batch(tmp_path):
    """A user's own ONNX file with a fixed batch of 1 still serves the sliding window's batches."""
    from mmar.predict import load_file

    network = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    torch.onnx.export(network, (x,), str(tmp_path / "fixed.onnx"), dynamo=True, external_data=False, verbose=False)
    predictor = load_file(tmp_path / "fixed.onnx", "onnx")
    assert predictor.input_shape[0] == 1
    batch = torch.randn(3, 1, 8, 8, 8)
    with torch.no_grad():
        assert float((predictor(batch) - network(batch)).abs().max()) < 1e-5


# ---- classification: the same export, a 2D network, batch axis dynamic only ------------------------



@pytest.fixture(scope="module")
def trained_cls(tmp_path_factory):
    synthetic = pytest.importorskip("mmar.synthetic")
    if not hasattr(synthetic, "write_classification_dataset"):
        pytest.skip("the classification task is not in this tree")
    from mmar.archive import load_archive
    from mmar.scaffold import init

    data = synthetic.write_classification_dataset(tmp_path_factory.mktemp("clsdata"), cases=12, size=32, seed=3)
    root = tmp_path_factory.mktemp("cls") / "mmar"
    init(root, task="classification", datalist=data, epochs=1, log=lambda *_: None)
    archive = load_archive(root, SMALL_CLASSIFICATION)
    (root / "config" / "config_train.json").write_text(json.dumps(archive.config, indent=2))
    run_mmar("train", str(root))
    return root


@pytest.mark.slow
def test_classification_export_and_validate(trained_cls, capsys):
    root = trained_cls
    assert cli(capsys, "export", str(root), "--formats", "torchscript,onnx")[0] == 0
    report = json.loads((root / "models" / "export.json").read_text())
    assert report["task"] == "classification" and report["input_shape"] == [1, 1, 32, 32]
    onnx_entry = report["formats"]["onnx"]
    assert onnx_entry["dynamic_batch"] and not onnx_entry["dynamic_spatial"]
    assert onnx_entry["max_abs_diff"] <= onnx_entry["tolerance"]
    assert report["formats"]["torchscript"]["max_abs_diff"] <= report["formats"]["torchscript"]["tolerance"]
    values = {}
    for model in ("ckpt", "ts", "onnx"):
        assert cli(capsys, "validate", str(root), "--model", model, "--set", "amp=false")[0] == 0
        metrics = json.loads((root / "eval" / "metrics.json").read_text())
        values[model] = metrics[metrics["key_metric"]]
    assert values["ts"] == pytest.approx(values["ckpt"], abs=1e-4)
    assert values["onnx"] == pytest.approx(values["ckpt"], abs=1e-4)
