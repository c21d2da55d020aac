"""The step result contract (`mmar.results`), end to end: runtime -> termination message -> status.

The fast tests pin the definition itself: the writer's strict check, the 4096-byte encoding, the
readers' tolerance. The slow ones run the real CLI (convert, train, validate, infer, export) on tiny
generated data with MMAR_TERMINATION_LOG set, then hand each real message to the operator
(`mmar_operator.status.compute`, the step's Job Complete) and to `mmar run` (its own reader and fold, the
command replayed), and check `status.results` on both sides against the files on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import ROOT, make_seg_mmar, run_mmar
from mmar import job as contract
from mmar import local_run, report, results

# ------------------------------------------------------------------------------------ the definition

TRAIN = {"command": "train", "epochs": 5, "key_metric": "val_mean_dice", "best_metric": 0.8, "best_epoch": 4,
         "minutes": 1.5, "models_dir": "/workspace/mmar/models"}
VALIDATE = {"command": "validate", "key_metric": "val_mean_dice", "metric": 0.79, "num_cases": 6, "eval_dir": "/workspace/mmar/eval"}
INFER = {"command": "infer", "num_cases": 6, "outputs": 6, "eval_dir": "/workspace/mmar/eval"}
EXPORT = {"command": "export", "formats": ["torchscript", "onnx"], "skipped": ["tensorrt"],
          "files": ["/workspace/mmar/models/model.ts", "/workspace/mmar/models/model.onnx"], "input_shape": [1, 1, 96, 96, 96],
          "precision": "fp32", "max_abs_diff": {"torchscript": 0.0, "onnx": 3.6e-6}}
CONVERT = {"command": "convert", "converted": 6, "skipped": 1, "failed": 0}
PUSH = {"command": "push", "found": 3, "stored": 2, "skipped": 1, "failed": 0, "url": "https://pacs.example/dicom-web"}
PUSH_FAILED = {**PUSH, "stored": 1, "failed": 1,
               "first_error": "1 of 3 DICOM SEG(s) not stored (1 stored, 1 already there): ... (HTTP 400 Bad Request)"}


def test_every_command_has_a_definition():
    assert set(results.DEFINITIONS) == set(contract.STEP_TYPES)  # a new step type needs its result defined


@pytest.mark.parametrize("data", [TRAIN, VALIDATE, INFER, EXPORT, CONVERT, PUSH, PUSH_FAILED, {"command": "train", "error": "boom"}],
                         ids=lambda d: d["command"] + ("-error" if "error" in d else "-first-error" if "first_error" in d else ""))
def test_a_result_survives_the_message(data):
    message = results.encode(results.check(data))
    assert len(message.encode()) <= results.MAX_BYTES
    assert results.decode(message) == data


@pytest.mark.parametrize("data, match", [
    ({**EXPORT, "exported": EXPORT["files"]}, r"ExportResult \('export'\): unknown keys \['exported'\]"),
    ({k: v for k, v in INFER.items() if k != "outputs"}, r"missing keys \['outputs'\]"),
    ({**VALIDATE, "num_cases": "6"}, r"ValidateResult.num_cases: expected int, got '6'"),
    ({**TRAIN, "epochs": True}, r"TrainResult.epochs: expected int"),
    ({**EXPORT, "files": ["a", 3]}, r"ExportResult.files\[1\]: expected str"),
    ({"command": "predict"}, r"unknown command 'predict'"),
    ({"epochs": 3}, r"unknown command None"),
    ({k: v for k, v in PUSH.items() if k != "failed"}, r"PushResult \('push'\): missing keys \['failed'\]"),
])
def test_the_writer_refuses_a_result_that_does_not_match(data, match):
    with pytest.raises(results.ResultError, match=match):
        results.check(data)


def test_write_result_checks_on_every_rank_and_writes_on_rank_zero(tmp_path, monkeypatch):
    log = tmp_path / "termination-log"
    monkeypatch.setenv("MMAR_TERMINATION_LOG", str(log))
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(results.ResultError):
        report.write_result({**INFER, "predictions": 6})
    report.write_result(INFER)
    assert not log.exists()
    monkeypatch.setenv("RANK", "0")
    report.write_result(INFER)
    assert json.loads(log.read_text()) == INFER
    report.write_failure("infer", "datalist.json: validation[0].image: file not found", "SIGTERM")
    assert json.loads(log.read_text()) == {"command": "infer", "error": "datalist.json: validation[0].image: file not found",
                                           "signal": "SIGTERM"}


def test_numpy_numbers_are_plain_json_and_nan_is_null():
    np = pytest.importorskip("numpy")
    data = {**VALIDATE, "metric": np.float32(0.5), "num_cases": np.int64(6), "metrics": {"dice_1": float("nan")}}
    message = results.encode(results.check(data))
    assert json.loads(message)["metric"] == 0.5 and json.loads(message)["metrics"] == {"dice_1": None}
    assert "NaN" not in message
    # a metric that is not a number is no number in the summary either (the status schema wants numbers)
    assert results.fold({}, "validate", {**VALIDATE, "metric": None, "metrics": {"dice_1": None, "dice_2": 0.7}}) == {"validation": {"dice_2": 0.7}}


def test_a_message_too_big_drops_the_least_needed_fields_first():
    many = {f"format_{i}": float(i) for i in range(300)}
    message = results.encode(results.check({**EXPORT, "max_abs_diff": many}))
    data = json.loads(message)
    assert len(message.encode()) <= results.MAX_BYTES
    assert data["dropped"] == ["max_abs_diff"] and data["files"] == EXPORT["files"]
    assert results.fold({}, "export", data) == {"exported": EXPORT["files"]}


def test_a_long_error_is_cut_and_the_message_stays_valid_json():
    message = results.encode(results.failure("train", "x" * 10_000, "SIGTERM"))
    data = json.loads(message)
    assert len(message.encode()) <= results.MAX_BYTES
    assert data["error"].startswith("xxx") and data["error"].endswith("...") and data["signal"] == "SIGTERM"
    huge = results.encode(results.check({**TRAIN, "key_metric": "k" * 5000, "models_dir": "m" * 5000}), limit=600)
    assert len(huge.encode()) <= 600 and json.loads(huge)["command"] == "train"
    escaped = results.encode(results.failure("train", "\u00e9" * 3000), limit=300)  # 6 bytes a character in JSON
    assert len(escaped.encode()) <= 300 and json.loads(escaped)["error"].startswith("\u00e9")


def test_a_push_s_long_first_error_is_cut_and_its_counts_kept():
    encoded = json.loads(results.encode(results.check({**PUSH_FAILED, "first_error": "y" * 10_000})))
    assert len(encoded["first_error"]) == results.ERROR_MAX and encoded["first_error"].endswith("...")
    assert (encoded["stored"], encoded["skipped"], encoded["failed"]) == (1, 1, 1)


def test_readers_tolerate_what_they_do_not_know():
    assert results.decode("Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory") is None
    assert results.decode("[1, 2]") is None and results.decode("") is None and results.decode(None) is None
    newer = {**TRAIN, "resumed_from": 3, "epochs": "five"}  # a newer runtime's key, and a value of the wrong type
    read = results.read("train", newer)
    assert isinstance(read, results.TrainResult) and read.epochs is None and read.best_metric == 0.8
    assert results.read("train", {"epochs": 3}).command == "train"  # no command: the step's type says which
    assert results.read("export", {"command": "export", "error": "no model"}).error == "no model"
    assert results.read("validate", None) is None


def test_the_summary_across_steps():
    summary = {}
    for step_type, data in (("convert", CONVERT), ("train", TRAIN), ("validate", VALIDATE), ("infer", INFER), ("export", EXPORT)):
        summary = results.fold(summary, step_type, results.decode(json.dumps(data)))
    assert summary == {
        "conversion": {"converted": 6, "skipped": 1, "failed": 0},
        "epochs": 5, "keyMetric": "val_mean_dice", "bestMetric": 0.8, "bestEpoch": 4,
        "validation": {"val_mean_dice": 0.79},  # metrics only: no num_cases, no eval_dir
        "predictions": {"cases": 6, "files": 6, "dir": "/workspace/mmar/eval"},
        "exported": EXPORT["files"],
    }
    assert results.fold(summary, "train", {"command": "train", "error": "boom"}) == summary


@pytest.mark.parametrize("text, line", [
    ("loading...\nerror: datalist.json: training[0].image: file not found\n  warning: late\n",
     "datalist.json: training[0].image: file not found"),
    ("Traceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\n\n", "RuntimeError: CUDA out of memory"),
    ("epoch 3 \r epoch 4 \r", "epoch 4"),
    ("", None),
])
def test_the_error_line_of_a_log_tail(text, line):
    assert results.error_line(text) == line


# ---------------------------------------------------------------------------------------- end to end

STEPS = [
    {"name": "convert-images", "type": "convert", "input": "raw/imagesTr", "output": "imagesTr", "inputExt": ".nii.gz",
     "resolution": [1.0], "force": True},
    {"name": "convert-labels", "type": "convert", "input": "raw/labelsTr", "output": "labelsTr", "inputExt": ".nii.gz",
     "resolution": [1.0], "labels": True, "force": True},
    {"type": "train"},
    {"type": "validate"},
    {"type": "infer"},
    {"type": "export", "formats": ["torchscript"]},
]


def contract_job() -> dict:
    return contract.parse({"apiVersion": contract.API_VERSION, "kind": contract.KIND,
                           "metadata": {"name": "contract", "generation": 1, "uid": "u"},
                           "spec": {"mmar": {"claimName": "ws", "path": "mmar"}, "data": {"claimName": "data"},
                                    "gpusPerNode": 0, "steps": STEPS}})


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """Each step of the job run with the real CLI, as its argv (paths mapped) says; the message each wrote."""
    from mmar.synthetic import write_segmentation_dataset

    root = tmp_path_factory.mktemp("contract")
    volumes = {"ws": root / "ws", "data": root / "data"}
    datalist = write_segmentation_dataset(volumes["data"], cases=6, size=16, seed=3, raw=True)
    job = contract_job()
    mounts = local_run.mount_map(job, volumes)
    messages = []
    for index, argvs in enumerate(local_run.plan(job, mounts)):
        if contract.steps_of(job)[index]["type"] == "train":  # the user's own small MMAR, not the scaffold
            make_seg_mmar(volumes["ws"] / "mmar", datalist, epochs=1)
        (argv,) = argvs
        log = root / f"{index}.termination-log"
        run_mmar(*argv[3:], env={"MMAR_TERMINATION_LOG": str(log)})
        messages.append(log.read_text())
    return {"job": job, "volumes": volumes, "messages": messages, "mmar": volumes["ws"] / "mmar"}


def _status_schema() -> dict:
    crd = yaml.safe_load((ROOT / "crds" / "mmar.dev_mmarjobs.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def _operator_status(run) -> dict:
    status = pytest.importorskip("mmar_operator.status")
    complete = {"metadata": {"name": "x"}, "spec": {},
                "status": {"startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:01:00Z",
                           "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T00:01:00Z"}]}}
    observed = {step["name"]: status.Observed(complete, message)  # by step name: a step's identity
                for step, message in zip(contract.steps_of(run["job"]), run["messages"])}
    return status.compute(run["job"], {}, observed, "2026-01-01T00:02:00Z")


def _local_status(run, tmp_path) -> dict:
    """`mmar run` of the same job, each command replayed: it writes the real message where `mmar run` reads."""
    replay = iter(run["messages"])

    def runner(argv, env, interrupt):
        Path(env["MMAR_TERMINATION_LOG"]).write_text(next(replay))
        return local_run.Finished(0)

    status_path = tmp_path / "status.json"
    assert local_run.run(run["job"], run["volumes"], runner=runner, out=lambda _: None, status_path=status_path) == 0
    return json.loads(status_path.read_text())


@pytest.mark.slow
def test_each_real_message_matches_its_definition(real_run):
    for step, message in zip(STEPS, real_run["messages"]):
        assert len(message.encode()) <= results.MAX_BYTES
        data = results.decode(message)
        assert data is not None and "dropped" not in data, message
        assert type(results.check(data)) is results.DEFINITIONS[step["type"]]


@pytest.mark.slow
def test_the_operator_and_mmar_run_summarize_the_real_messages_alike(real_run, tmp_path):
    operator = _operator_status(real_run)
    local = _local_status(real_run, tmp_path)
    assert operator["phase"] == local["phase"] == "Succeeded"
    assert operator["results"] == local["results"]
    jsonschema.Draft4Validator(_status_schema()).validate(operator)
    summary = operator["results"]
    mmar = real_run["mmar"]

    assert summary["conversion"] == {"converted": 6, "skipped": 0, "failed": 0}
    assert summary["epochs"] == 1 and summary["keyMetric"] == "val_mean_dice" and summary["bestEpoch"] == 1
    assert 0.0 <= summary["bestMetric"] <= 1.0

    metrics = json.loads((mmar / "eval" / "metrics.json").read_text())
    assert summary["validation"] == {"val_mean_dice": pytest.approx(metrics["val_mean_dice"])}  # metrics only

    predictions = summary["predictions"]
    assert predictions["dir"] == str(mmar / "eval") and predictions["cases"] == 2  # the datalist's validation list
    written = [p for p in (mmar / "eval").rglob("*.nii.gz") if "overlays" not in p.parts]
    assert predictions["files"] == 2 and len(written) >= 2

    assert summary["exported"] == [str(mmar / "models" / "model.ts")]
    assert all(Path(f).is_file() for f in summary["exported"])


@pytest.mark.slow
def test_a_failed_step_is_reported_in_its_own_words(real_run, tmp_path):
    """A user error: no termination message, the log tail (FallbackToLogsOnError) has the `error:` line."""
    missing = tmp_path / "nope.ckpt"
    proc = run_mmar("validate", str(real_run["mmar"]), "--ckpt", str(missing), check=False,
                    env={"MMAR_TERMINATION_LOG": str(tmp_path / "log")})
    assert proc.returncode == 1
    line = results.error_line(proc.stderr)
    assert line and str(missing) in line and not line.startswith("error:")
    written = tmp_path / "log"
    assert results.decode(written.read_text() if written.exists() else None) in (None, {"command": "validate", "error": line})


def test_outside_the_tests_a_mismatch_warns_and_the_finished_work_is_still_reported(tmp_path, monkeypatch, capsys):
    """A user's run must not fail at its very end over a result key: strict only under MMAR_STRICT_RESULTS=1."""
    log = tmp_path / "termination-log"
    monkeypatch.setenv("MMAR_TERMINATION_LOG", str(log))
    monkeypatch.setenv("MMAR_STRICT_RESULTS", "0")
    report.write_result({**INFER, "a_key_nobody_defined": 1})
    assert json.loads(log.read_text()) == INFER
    assert "a_key_nobody_defined" in capsys.readouterr().err
