"""validate / infer never lose or mix results: a name per image, one set per validation, no stale exports.

Through the real CLI on the session's tiny trained MMAR (copied: these tests write eval/ and models/).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import run_mmar


@pytest.fixture
def mmar(trained_seg_mmar, tmp_path):
    root = tmp_path / "mmar"
    shutil.copytree(trained_seg_mmar, root)
    for stale in ("model.ts", "model.onnx", "model.trt", "export.json"):
        (root / "models" / stale).unlink(missing_ok=True)
    shutil.rmtree(root / "eval", ignore_errors=True)
    return root


@pytest.fixture
def kits(seg_data, tmp_path):
    """The KiTS layout: every case a folder holding `imaging.nii.gz` and `segmentation.nii.gz`. Case b is
    cropped to another shape, so a prediction written under the wrong case shows in its shape."""
    data = json.loads(seg_data.read_text())
    first, second = data["validation"][0], data["training"][0]
    root = tmp_path / "kits"
    items = []
    for case, item, crop in (("case_a", first, None), ("case_b", second, 12)):
        (root / case).mkdir(parents=True)
        for key, name in (("image", "imaging.nii.gz"), ("label", "segmentation.nii.gz")):
            image = nib.load(seg_data.parent / item[key])
            if crop:
                image = image.slicer[:, :, :crop]
            nib.save(image, str(root / case / name))
        items.append({"image": f"{case}/imaging.nii.gz", "label": f"{case}/segmentation.nii.gz"})
    # the originals too, from outside the data root: they keep their bare names
    originals = [str(seg_data.parent / first["image"]), str(seg_data.parent / second["image"])]
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"validation": items, "everything": [i["image"] for i in items] + originals}))
    return datalist


def mask(path):
    return np.asarray(nib.load(path).dataobj)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---- a name per image ----------------------------------------------------------------------------------


def test_infer_gives_images_sharing_a_file_name_their_own_predictions(mmar, kits, seg_data, tmp_path):
    out = tmp_path / "out"
    result = run_mmar("infer", str(mmar), "--key", "everything", "--set", f"DATASET_JSON={kits}",
                      f"MMAR_EVAL_OUTPUT_PATH={out}")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    originals = [json.loads(seg_data.read_text())[k][0]["image"].split("/")[-1] for k in ("validation", "training")]
    expected = ["predictions/case_a/imaging_seg.nii.gz", "predictions/case_b/imaging_seg.nii.gz",
                *("predictions/" + name.replace(".nii.gz", "_seg.nii.gz") for name in originals)]
    assert files == sorted(expected), result.stdout  # four images, four files, no temp files left behind
    assert "4 predictions (4 files)" in result.stdout
    out = out / "predictions"
    # each prediction is its own image's: the shape of its image, the mask of the same volume elsewhere
    for case, original in zip(("case_a", "case_b"), originals):
        prediction = out / case / "imaging_seg.nii.gz"
        assert prediction.is_file()
        assert mask(prediction).shape == nib.load(kits.parent / case / "imaging.nii.gz").shape
    np.testing.assert_array_equal(mask(out / "case_a" / "imaging_seg.nii.gz"),
                                  mask(out / originals[0].replace(".nii.gz", "_seg.nii.gz")))
    assert mask(out / "case_b" / "imaging_seg.nii.gz").shape[-1] == 12


def test_validate_gives_images_sharing_a_file_name_their_own_rows_and_overlays(mmar, kits, tmp_path):
    out = tmp_path / "eval"
    run_mmar("validate", str(mmar), "--set", f"DATASET_JSON={kits}", f"MMAR_EVAL_OUTPUT_PATH={out}")
    rows = read_rows(out / "cases.csv")
    assert [r["image"] for r in rows] == [str(kits.parent / c / "imaging.nii.gz") for c in ("case_a", "case_b")]
    # 2 cases, 3 best and 3 worst asked for: each case is both, and each overlay has its own file
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [
        "best_case_a_imaging.png", "best_case_b_imaging.png", "worst_case_a_imaging.png", "worst_case_b_imaging.png"]


# ---- one set per validation ----------------------------------------------------------------------------


@pytest.mark.slow  # four CLI runs: about a minute on a loaded 2-core machine
def test_validate_replaces_its_set_as_a_whole_and_leaves_infer_alone(mmar, seg_data, tmp_path):
    eval_dir = mmar / "eval"
    run_mmar("infer", str(mmar))  # infer's predictions share eval/ with validate's results
    predictions = sorted(p for p in (eval_dir / "predictions").rglob("*_seg.nii.gz"))
    assert len(predictions) == len(json.loads(seg_data.read_text())["validation"])
    run_mmar("validate", str(mmar))
    assert json.loads((eval_dir / "metrics.json").read_text())["num_cases"] == len(predictions)

    # a second validation over one case, where the old overlays/ cannot be written into (a file is in its way):
    # the old code wrote the new cases.csv, then failed on the overlays beside the old metrics.json
    one = tmp_path / "one.json"
    data = json.loads(seg_data.read_text())
    first = {key: str(seg_data.parent / value) for key, value in data["validation"][0].items()}
    one.write_text(json.dumps({"validation": [first]}))
    shutil.rmtree(eval_dir / "overlays")
    (eval_dir / "overlays").write_text("not a folder")
    run_mmar("validate", str(mmar), "--set", f"DATASET_JSON={one}")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["num_cases"] == 1 and len(read_rows(eval_dir / "cases.csv")) == 1  # one set, not two halves
    assert (eval_dir / "overlays").is_dir() and len(list((eval_dir / "overlays").glob("*.png"))) == 2
    # infer's files are infer's: still there, and a new infer leaves validate's set alone
    assert all(p.is_file() for p in predictions)
    before = {name: (eval_dir / name).read_bytes() for name in ("metrics.json", "cases.csv")}
    run_mmar("infer", str(mmar))
    assert {name: (eval_dir / name).read_bytes() for name in before} == before
    assert not [p.name for p in eval_dir.iterdir() if p.name.startswith(".mmar-")], "staging folders left behind"


def test_a_failed_validation_leaves_the_previous_set_and_cleans_a_dead_runs_staging(mmar, seg_data, tmp_path):
    eval_dir = mmar / "eval"
    run_mmar("validate", str(mmar))
    before = {p.relative_to(eval_dir): p.read_bytes() for p in eval_dir.rglob("*") if p.is_file()}
    # a run killed mid-write (SIGKILL, power loss) leaves its staging folder; one of a live process is kept
    host = socket.gethostname().replace("-", "_")
    dead = eval_dir / f".mmar-staging-validate-{host}-{2 ** 22 + 12345}-abc"
    live = eval_dir / f".mmar-staging-validate-{host}-{os.getpid()}-def"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "cases.csv").write_text("half")

    data = json.loads(seg_data.read_text())
    broken = tmp_path / "broken.nii.gz"
    content = (seg_data.parent / data["validation"][1]["image"]).read_bytes()
    broken.write_bytes(content[: len(content) // 2])
    items = [{k: str(seg_data.parent / v) for k, v in item.items()} for item in data["validation"]]
    items[1]["image"] = str(broken)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"validation": items}))
    result = run_mmar("validate", str(mmar), "--set", f"DATASET_JSON={bad}", check=False)
    assert result.returncode == 1 and "broken.nii.gz" in result.stderr
    after = {p.relative_to(eval_dir): p.read_bytes() for p in eval_dir.rglob("*") if p.is_file()
             and not p.relative_to(eval_dir).parts[0].startswith(".")}
    assert after == before
    assert not dead.exists() and live.is_dir()
    shutil.rmtree(live)


# ---- stale exports -------------------------------------------------------------------------------------


def retrain(models):
    """What a new training or fine-tune does to models/model.ckpt: other weights, same file name."""
    data = torch.load(models / "model.ckpt", map_location="cpu", weights_only=False)
    key = next(k for k, v in data["model"].items() if v.is_floating_point())
    data["model"][key] = data["model"][key] + 0.5
    torch.save(data, models / "model.ckpt")


@pytest.mark.slow
def test_an_export_of_another_checkpoint_is_refused_until_re_exported(mmar):
    from mmar.predict import file_sha256

    models, eval_dir = mmar / "models", mmar / "eval"
    run_mmar("export", str(mmar), "--formats", "torchscript,onnx")
    exported_from = file_sha256(models / "model.ckpt")
    run_mmar("validate", str(mmar), "--model", "onnx")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["export"]["status"] == "current"

    retrain(models)
    now = file_sha256(models / "model.ckpt")
    before = (eval_dir / "metrics.json").read_bytes()
    for command in ("validate", "infer"):
        result = run_mmar(command, str(mmar), "--model", "onnx", check=False)
        assert result.returncode == 1, result.stdout
        message = result.stderr
        assert "model.onnx is stale" in message and exported_from in message and now in message
        assert f"mmar export {mmar} --ckpt {models / 'model.ckpt'} --formats onnx" in message
        assert "Traceback" not in message
    assert (eval_dir / "metrics.json").read_bytes() == before  # the refused run wrote nothing

    # deliberately, and loudly
    result = run_mmar("validate", str(mmar), "--model", "onnx", "--allow-stale-export")
    assert "WARNING" in result.stderr and "stale" in result.stderr
    assert json.loads((eval_dir / "metrics.json").read_text())["export"]["status"] == "stale"

    # re-exporting one format: the other is named as still stale, and still refused
    result = run_mmar("export", str(mmar), "--formats", "torchscript")
    assert "model.onnx was not re-exported" in result.stdout
    run_mmar("validate", str(mmar), "--model", "ts")
    assert json.loads((eval_dir / "metrics.json").read_text())["export"]["status"] == "current"
    assert run_mmar("validate", str(mmar), "--model", "onnx", check=False).returncode == 1


def test_an_export_replaced_after_the_export_is_refused(mmar, tmp_path):
    models = mmar / "models"
    run_mmar("export", str(mmar), "--formats", "torchscript")
    original = models / "model.ts"
    # another model's TorchScript file copied over it (here: the same network, other weights)
    from mmar.archive import load_archive
    from mmar.predict import load_network

    network = load_network(load_archive(mmar))
    with torch.no_grad():
        next(network.parameters()).add_(1.0)
    torch.jit.save(torch.jit.script(network), str(tmp_path / "other.ts"))
    shutil.copy(tmp_path / "other.ts", original)
    result = run_mmar("validate", str(mmar), "--model", "ts", check=False)
    assert result.returncode == 1 and "replaced after the export" in result.stderr and "model.ts" in result.stderr


# ---- the rules themselves (no model) -------------------------------------------------------------------


def test_case_names_are_unique_and_follow_the_data_root(tmp_path):
    from mmar.eval_output import case_names, short_names

    root = tmp_path / "data"
    images = [root / "case_a/imaging.nii.gz", root / "case_b/imaging.nii.gz", root / "case_a/imaging.nii.gz",
              root / "x.nii", root / "x.nii.gz", tmp_path / "elsewhere/imagesTs/x.nii.gz"]
    names = case_names([str(p) for p in images], root)
    assert names == {str(images[0]): "case_a/imaging", str(images[1]): "case_b/imaging", str(images[3]): "x",
                     str(images[4]): "x.nii.gz", str(images[5]): "x_2"}  # never one name for two files
    assert short_names(["case_a/imaging", "case_b/imaging"]) == ["case_a_imaging", "case_b_imaging"]
    assert short_names(["imagesTr/a", "imagesTr/b"]) == ["a", "b"]


def test_a_swap_that_fails_half_way_puts_the_old_set_back(tmp_path, monkeypatch):
    from mmar import eval_output
    from mmar.errors import MMARError

    target = tmp_path / "eval"
    (target / "overlays").mkdir(parents=True)
    (target / "predictions").mkdir()
    for name, text in (("metrics.json", "old metrics"), ("cases.csv", "old cases"), ("overlays/a.png", "old png"),
                       ("predictions/case_seg.nii.gz", "infer's")):
        (target / name).write_text(text)
    real, calls = eval_output._rename, []

    def failing_rename(source, destination):
        calls.append(destination)
        if len(calls) == 5:  # old set moved away (3), new cases.csv moved in (4), overlays fail (5)
            raise MMARError(f"cannot move {source} to {destination}: No space left on device")
        real(source, destination)

    monkeypatch.setattr(eval_output, "_rename", failing_rename)
    with pytest.raises(MMARError, match="No space left"):
        with eval_output.Staging(target, "validate") as staging:
            (staging.path / "overlays").mkdir()
            for name in ("metrics.json", "cases.csv", "overlays/b.png"):
                (staging.path / name).write_text("new")
            staging.replace_set(["cases.csv", "overlays"], last="metrics.json")
    contents = {p.relative_to(target).as_posix(): p.read_text() for p in target.rglob("*") if p.is_file()}
    assert contents == {"metrics.json": "old metrics", "cases.csv": "old cases", "overlays/a.png": "old png",
                        "predictions/case_seg.nii.gz": "infer's"}
    assert not [p.name for p in target.iterdir() if p.name.startswith(".mmar-")]


def test_a_staging_folder_of_this_pid_not_made_by_this_process_is_abandoned(tmp_path):
    """A restarted container numbers its processes alike: our own PID on a folder we did not make is a
    dead run's."""
    from mmar.eval_output import Staging, remove_abandoned

    host = socket.gethostname().replace("-", "_")
    old = tmp_path / f".mmar-staging-infer-{host}-{os.getpid()}-xyz"
    other_host = tmp_path / f".mmar-staging-infer-otherhost-{2 ** 22 + 1}-xyz"
    old.mkdir()
    other_host.mkdir()
    with Staging(tmp_path, "infer") as staging:
        assert not old.exists() and other_host.is_dir()  # another machine's run may be at work on a shared volume
        assert remove_abandoned(tmp_path) == [] and staging.path.is_dir()  # ours is not abandoned
    assert not staging.path.exists()
