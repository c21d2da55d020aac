"""The MMARJob contract (mmar.job): parsing, defaults, validation messages, and each step's argv."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from mmar import job as contract
from mmar.errors import MMARError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def manifest(*steps, **spec):
    body = {
        "apiVersion": "mmar.dev/v1alpha1",
        "kind": "MMARJob",
        "metadata": {"name": "spleen"},
        "spec": {"mmar": {"claimName": "ws"}, "data": {"claimName": "data"}, "steps": list(steps) or [{"type": "train"}]},
    }
    body["spec"].update(spec)
    return body


def test_defaults_are_applied_without_touching_the_input():
    body = manifest()
    before = copy.deepcopy(body)
    job = contract.parse(body)
    assert body == before
    spec = job["spec"]
    assert spec["imagePullPolicy"] == "IfNotPresent" and spec["gpusPerNode"] == 1 and spec["shmSize"] == "2Gi"
    assert spec["runPolicy"] == {"backoffLimit": 0, "suspend": False}
    assert spec["mmar"]["path"] == "mmar" and spec["data"] == {"claimName": "data", "path": "", "datalist": "datalist.json", "readOnly": False}
    assert spec["steps"][0] == {"type": "train", "nodes": 1, "name": "train"}


def test_parse_yaml_text_and_files(tmp_path):
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text("---\napiVersion: v1\nkind: ConfigMap\n---\n" + yaml.safe_dump(manifest()))
    assert contract.parse(path)["metadata"]["name"] == "spleen"
    assert contract.parse(yaml.safe_dump(manifest()))["spec"]["steps"][0]["name"] == "train"


@pytest.mark.parametrize("text, fragment", [
    ("a: [", "not valid YAML"),
    ("apiVersion: v1\nkind: Pod\n", "expected exactly one document of kind MMARJob, found Pod"),
])
def test_bad_files_name_the_file(tmp_path, text, fragment):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(MMARError, match=fragment) as info:
        contract.parse(path)
    assert str(path) in str(info.value)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(MMARError, match="missing.yaml: cannot read"):
        contract.parse(tmp_path / "missing.yaml")


BAD = [
    (lambda b: b.update(apiVersion="mmar.dev/v1"), "apiVersion: must be mmar.dev/v1alpha1"),
    (lambda b: b["metadata"].update(name="9lives"), "metadata.name must be a lower-case DNS label"),
    (lambda b: b["metadata"].update(name="a" * 37), "at most 36"),
    (lambda b: b["spec"].update(bogus=1), "spec.bogus: unknown field"),
    (lambda b: b["spec"].update(task="detection"), "spec.task: must be one of segmentation, classification"),
    (lambda b: b["spec"].pop("mmar"), "spec.mmar: is required"),
    (lambda b: b["spec"]["data"].update(claimName="Data_Set"), "spec.data.claimName: must be a lower-case DNS-1123 subdomain .the name of a PersistentVolumeClaim"),
    (lambda b: b["spec"].update(image=""), "spec.image: must be a non-empty string"),
    (lambda b: b["spec"]["mmar"].update(path="../escape"), "spec.mmar.path: must be relative to the claim's root, without '..'"),
    (lambda b: b["spec"]["data"].update(datalist="/etc/passwd"), "spec.data.datalist: must be relative to the data root"),
    (lambda b: b["spec"].update(gpusPerNode=-1), "spec.gpusPerNode: must be >= 0"),
    (lambda b: b["spec"].update(gpusPerNode=True), "spec.gpusPerNode: must be an integer"),
    (lambda b: b["spec"].update(shmSize="lots"), "spec.shmSize: must be a Kubernetes quantity"),
    (lambda b: b["spec"].update(resources={"requests": {"cpu": "two"}}), r"spec.resources.requests.cpu"),
    (lambda b: b["spec"].update(runPolicy={"backoffLimit": -1}), "spec.runPolicy.backoffLimit: must be >= 0"),
    (lambda b: b["spec"].update(runPolicy={"retries": 3}), "spec.runPolicy.retries: unknown field"),
    (lambda b: b["spec"].update(steps=[]), "spec.steps: must list at least 1 item"),
    (lambda b: b["spec"].update(steps=[{"type": "deploy"}]), r"spec.steps\[0\].type: must be one of pull, convert"),
    (lambda b: b["spec"].update(steps=[{"type": "infer", "nodes": 2}]), r"spec.steps\[0\].nodes: only train and finetune"),
    (lambda b: b["spec"].update(steps=[{"type": "train"}, {"type": "train"}]), r"spec.steps: step names must be unique"),
    (lambda b: b["spec"].update(steps=[{"type": "convert", "input": "dicom"}]), r"spec.steps\[0\]: a convert step needs input and output"),
    (lambda b: b["spec"].update(steps=[{"type": "convert", "input": "../x", "output": "y"}]), r"spec.steps\[0\].input: must be a relative path without '..'"),
    (lambda b: b["spec"].update(steps=[{"type": "convert", "input": "x", "output": "y", "resolution": [1, 1]}]), r"spec.steps\[0\].resolution: one isotropic spacing or three"),
    (lambda b: b["spec"].update(steps=[{"type": "train", "formats": ["onnx"]}]), r"spec.steps\[0\]: formats, precision and inputShape are options of export steps only"),
    (lambda b: b["spec"].update(steps=[{"type": "export", "formats": ["onnx", "onnx"]}]), r"spec.steps\[0\].formats: lists an item twice"),
    (lambda b: b["spec"].update(steps=[{"type": "export", "inputShape": [1, 96]}]), r"spec.steps\[0\].inputShape: must list at least 3 items"),
    (lambda b: b["spec"].update(steps=[{"type": "validate", "model": "tflite"}]), r"model: must be one of ckpt, ts, onnx, trt"),
    (lambda b: b["spec"].update(steps=[{"type": "train", "set": {"a=b": 1}}]), r"spec.steps\[0\].set: must be a mapping"),
    (lambda b: b["spec"].update(steps=[{"type": "train", "name": "Train"}]), r"spec.steps\[0\].name: must be a lower-case DNS label"),
    (lambda b: (b["spec"]["data"].update(readOnly=True), b["spec"].update(steps=[{"type": "convert", "input": "a", "output": "b"}])), "spec.data.readOnly: a convert or pull step writes"),
]


@pytest.mark.parametrize("mutate, message", BAD, ids=[m for _, m in BAD])
def test_invalid_manifests_name_the_field(mutate, message):
    body = manifest()
    mutate(body)
    with pytest.raises(MMARError, match=message):
        contract.parse(body)


def test_examples_parse():
    names = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
    assert {"demo-job.yaml", "segmentation-job.yaml", "classification-job.yaml"} <= set(names)
    for name in names:
        contract.parse(EXAMPLES / name)


# ------------------------------------------------------------------------------------------------ argv


def argv(*steps, **spec):
    job = contract.parse(manifest(*steps, **spec))
    return [contract.step_argv(job, i) for i in range(len(job["spec"]["steps"]))]


def test_convert_argv():
    step = {"type": "convert", "input": "dicom", "output": "nifti", "resolution": [1, 1.5, 2.0], "inputExt": ".dcm",
            "outputExt": ".nii.gz", "force": True, "labels": True}
    assert argv(step, data={"claimName": "d", "path": "spleen"})[0] == [
        "mmar", "convert", "-d", "/data/spleen/dicom", "-o", "/data/spleen/nifti", "-r", "1", "1.5", "2.0",
        "-s", ".dcm", "-e", ".nii.gz", "-f", "-l"]
    assert argv({"type": "convert", "input": "a", "output": "b", "resolution": [0.8]})[0] == ["mmar", "convert", "-d", "/data/a", "-o", "/data/b", "-r", "0.8"]


def test_train_argv_overrides_and_data_root():
    out = argv({"type": "train", "set": {"epochs": 5, "train#batch_size": 2, "amp": True, "spatial_size": [96, 96, 96], "learning_rate": 1e-4}},
               mmar={"claimName": "ws", "path": "runs/spleen"}, data={"claimName": "d", "path": "spleen", "datalist": "lists/ds.json"})[0]
    assert out == ["mmar", "train", "/workspace/runs/spleen", "--set", "DATASET_JSON=/data/spleen/lists/ds.json", "epochs=5",
                   "train#batch_size=2", "amp=true", "spatial_size=[96,96,96]", "learning_rate=0.0001", "--file_root", "/data/spleen"]


def test_user_set_wins_over_the_manifest_datalist():
    out = argv({"type": "validate", "set": {"DATASET_JSON": "/data/other.json"}})[0]
    sets = out[out.index("--set") + 1: out.index("--file_root")]
    assert sets == ["DATASET_JSON=/data/other.json"]


def test_finetune_validate_infer_export_argv():
    out = argv({"type": "finetune", "ckpt": "models/pretrained.pt"}, {"type": "validate", "model": "onnx", "ckpt": "models/model.onnx"},
               {"type": "infer", "key": "testing"}, {"type": "export", "formats": ["torchscript", "onnx"], "precision": "fp16", "inputShape": [1, 1, 96, 96, 96]})
    assert out[0][:6] == ["mmar", "train", "/workspace/mmar", "--finetune", "--ckpt", "/workspace/mmar/models/pretrained.pt"]
    assert out[1][:7] == ["mmar", "validate", "/workspace/mmar", "--ckpt", "/workspace/mmar/models/model.onnx", "--model", "onnx"]
    assert out[2][:5] == ["mmar", "infer", "/workspace/mmar", "--key", "testing"]
    assert out[3] == ["mmar", "export", "/workspace/mmar", "--formats", "torchscript,onnx", "--precision", "fp16", "--input-shape", "1,1,96,96,96"]


def test_multi_gpu_single_node_uses_standalone_torchrun():
    out = argv({"type": "train", "gpusPerNode": 4})[0]
    assert out[:6] == ["torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=4", "-m", "mmar"]
    assert out[6:9] == ["train", "/workspace/mmar", "--set"]
    # validation on several GPUs is not distributed: plain mmar
    assert argv({"type": "validate", "gpusPerNode": 4})[0][0] == "mmar"


def test_multi_node_train_uses_pet_variables():
    out = argv({"type": "finetune", "nodes": 3}, gpusPerNode=8)[0]
    assert out[:9] == ["torchrun", "--nnodes=3", "--nproc_per_node=8", "--node_rank=$(PET_NODE_RANK)", "--master_addr=$(PET_MASTER_ADDR)",
                       "--master_port=$(PET_MASTER_PORT)", "-m", "mmar", "train"]
    assert "--finetune" in out
    # CPU multi-node still runs one process per node
    assert "--nproc_per_node=1" in argv({"type": "train", "nodes": 2}, gpusPerNode=0)[0]


def test_init_runs_once_before_the_first_mmar_step():
    job = contract.parse(manifest({"type": "convert", "input": "a", "output": "b"}, {"type": "train"}, {"type": "export"}, task="segmentation"))
    assert contract.init_argv(job, 0) is None
    assert contract.init_argv(job, 1) == ["mmar", "init", "/workspace/mmar", "--task", "segmentation", "--datalist", "/data/datalist.json", "--exist-ok"]
    assert contract.init_argv(job, 2) is None
    assert contract.init_argv(contract.parse(manifest()), 0) is None  # no task: the MMAR must exist already


def test_gpus_default_skips_convert():
    job = contract.parse(manifest({"type": "convert", "input": "a", "output": "b"}, {"type": "train"}, {"type": "infer", "gpusPerNode": 0}, gpusPerNode=2))
    assert [contract.gpus_of(job, i) for i in range(3)] == [0, 2, 0]


@pytest.mark.parametrize("overrides, words", [
    ({"epochs": "abc"}, ["spec.steps[0].set.epochs", "whole number", '"abc"']),
    ({"epoch": 5}, ["spec.steps[0].set.epoch", "unknown config key 'epoch'", "'epochs'"]),
    ({"train#batchsize": 4}, ["unknown config key 'train#batchsize'", "'train#batch_size'"]),
    ({"train#cache#rate": 2}, ["train#cache#rate must be", "got 2"]),
    ({"learning_rate": "$__import__('os').getcwd()"}, ["spec.steps[0].set.learning_rate", "Python expression"]),
    ({"train#loss": {"_target_": "subprocess.run"}}, ["`_target_` makes a component"]),
], ids=["type", "unknown", "section-key", "range", "expression", "component"])
def test_set_values_are_checked_when_the_manifest_is_loaded(overrides, words):
    """Issue 31: a bad `set:` of a later step was found only when that step started, after the earlier ones."""
    with pytest.raises(MMARError) as caught:
        argv({"type": "train", "set": overrides})
    assert all(word in str(caught.value) for word in words), str(caught.value)


def test_set_values_the_runtime_reads_as_such_pass():
    out = argv({"type": "train", "set": {"epochs": "5", "network#channels": [8, 16], "validate#inferer#sw_batch_size": 2,
                                         "train#cache": {"rate": 0}}})[0]
    assert "epochs=5" in out and "network#channels=[8,16]" in out
