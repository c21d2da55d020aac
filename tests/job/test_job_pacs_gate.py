"""The MMARJob contract for the PACS loop (mmar.job): pull / push steps, infer's dicomSeg, the gate rule,
the credentials' Secret, and how a gate's skip reads in `mmar run` and the operator's status alike."""

from __future__ import annotations

import pytest

from mmar import job as contract
from mmar.errors import MMARError

URL = "http://orthanc:8042/dicom-web"
PULL = {"type": "pull", "dicomweb": {"url": URL, "credentialsSecret": "pacs-reader"},
        "query": {"modality": "CT", "studyDate": "20240101-20241231", "seriesDescription": "abd*"}, "output": "images"}
PUSH = {"type": "push", "dicomweb": {"url": URL, "credentialsSecret": "pacs-writer"},
        "gate": {"metric": "val_mean_dice", "atLeast": 0.85}}


def manifest(*steps, **spec):
    body = {"apiVersion": "mmar.dev/v1alpha1", "kind": "MMARJob", "metadata": {"name": "pacs"},
            "spec": {"mmar": {"claimName": "ws", "path": "spleen"}, "data": {"claimName": "data", "path": "pacs"},
                     "task": "segmentation", "steps": list(steps)}}
    body["spec"].update(spec)
    return body


def test_pull_argv_has_the_query_and_no_credentials():
    job = contract.parse(manifest({**PULL, "query": {**PULL["query"], "studyInstanceUIDs": ["1.2.3", "1.2.4"],
                                                     "accessionNumber": "A17"}, "key": "testing", "labelsFrom": "masks"}))
    argv = contract.step_argv(job, 0)
    assert argv[:2] == ["mmar", "pull"]
    pairs = dict(zip(argv[2::2], argv[3::2]))
    assert pairs["--url"] == URL and pairs["--dicom-dir"] == "/data/pacs/dicom" and pairs["--output"] == "/data/pacs/images"
    assert pairs["--datalist"] == "/data/pacs/datalist.json" and pairs["--key"] == "testing" and pairs["--labels"] == "/data/pacs/masks"
    assert argv.count("--study-uid") == 2 and "1.2.4" in argv
    assert pairs["--modality"] == "CT" and pairs["--study-date"] == "20240101-20241231" and pairs["--accession"] == "A17"
    assert "pacs-reader" not in " ".join(argv)
    assert contract.gpus_of(job, 0) == 0 and contract.credentials_secret(job, 0) == "pacs-reader"


def test_infer_dicom_seg_and_gated_push_argv():
    job = contract.parse(manifest({"type": "infer", "dicomSeg": True, "key": "test",
                                   "gate": {"metric": "val_mean_dice", "atLeast": 0.8}}, PUSH))
    infer = contract.step_argv(job, 0)
    assert infer[:4] == ["mmar", "--gate", "val_mean_dice>=0.8", "infer"] and "--dicom-seg" in infer
    assert contract.step_argv(job, 1) == ["mmar", "--gate", "val_mean_dice>=0.85", "push", "/workspace/spleen", "--url", URL]
    assert contract.gpus_of(job, 1) == 0  # push moves files


@pytest.mark.parametrize("text, gate", [
    ("val_mean_dice>=0.85", {"metric": "val_mean_dice", "atLeast": 0.85}),
    ("val_loss<=0.2", {"metric": "val_loss", "atMost": 0.2}),
    ("auc>=1", {"metric": "auc", "atLeast": 1}),
])
def test_gate_text_round_trips(text, gate):
    assert contract.parse_gate_text(text) == gate
    assert contract.gate_text(gate) == text


@pytest.mark.parametrize("text", ["val_mean_dice", "dice>=high", ">=0.5", "dice==0.5", "dice>=nan", "a b>=1"])
def test_bad_gate_text_names_the_option(text):
    with pytest.raises(MMARError, match="--gate: expected METRIC>=NUMBER"):
        contract.parse_gate_text(text)


def test_gate_decision_passes_blocks_and_says_why():
    gate = {"metric": "val_mean_dice", "atLeast": 0.85}
    passed = contract.gate_decision(gate, {"val_mean_dice": 0.91, "num_cases": 4})
    assert passed["passed"] is True and passed["value"] == 0.91 and passed["message"] == "val_mean_dice 0.91 >= 0.85 (eval/metrics.json)"
    blocked = contract.gate_decision(gate, {"val_mean_dice": 0.8123})
    assert blocked["passed"] is False and blocked["message"].startswith("val_mean_dice 0.8123 < 0.85")
    assert contract.gate_decision({"metric": "val_loss", "atMost": 0.2}, {"val_loss": 0.3})["message"].startswith("val_loss 0.3 > 0.2")
    assert contract.gate_decision(gate, {"val_mean_dice": 0.9}, stale="model.ckpt was replaced")["passed"] is False


def test_gate_without_a_number_does_not_pass():
    gate = {"metric": "val_mean_dice", "atLeast": 0.5}
    missing = contract.gate_decision(gate, None)
    assert missing["passed"] is False and "run a validate step first" in missing["message"]
    undefined = contract.gate_decision(gate, {"val_mean_dice": None})  # NaN is written as null
    assert undefined["passed"] is False and undefined["value"] is None and "undefined" in undefined["message"]
    with pytest.raises(MMARError, match="gate.metric: 'val_dice' is not in eval/metrics.json .*val_mean_dice"):
        contract.gate_decision({"metric": "val_dice", "atLeast": 0.5}, {"val_mean_dice": 0.9})


def test_skipped_by_gate_reads_only_a_gate_that_did_not_pass():
    record = {"metric": "d", "atLeast": 0.9, "value": 0.5, "passed": False, "message": "d 0.5 < 0.9"}
    assert contract.skipped_by_gate({"command": "push", "gate": record}) == record
    assert contract.skipped_by_gate({"command": "push", "gate": {**record, "passed": True}}) is None
    assert contract.skipped_by_gate({"command": "convert", "skipped": 3}) is None and contract.skipped_by_gate(None) is None


BAD = [
    ({**PULL, "query": {}}, r"spec.steps\[0\].query: must have at least 1 of studyInstanceUIDs, modality"),
    ({k: v for k, v in PULL.items() if k != "dicomweb"}, r"spec.steps\[0\]: a pull step needs dicomweb, query and output"),
    ({k: v for k, v in PULL.items() if k != "output"}, r"spec.steps\[0\]: a pull step needs dicomweb, query and output"),
    ({**PULL, "query": {"studyInstanceUIDs": ["1.2.x"]}}, r"query.studyInstanceUIDs\[0\]: must be a DICOM UID"),
    ({**PULL, "query": {"studyInstanceUIDs": ["1.2", "1.2"]}}, r"query.studyInstanceUIDs: lists an item twice"),
    ({**PULL, "query": {"modality": "ct"}}, r"query.modality: must be a DICOM modality code"),
    ({**PULL, "query": {"studyDate": "2024-01-01"}}, r"query.studyDate: must be YYYYMMDD"),
    ({**PULL, "query": {"studyDate": "20241231-20240101"}}, r"query.studyDate: the range ends before it starts"),
    ({**PULL, "query": {"patientName": "x"}}, r"query.patientName: unknown field"),
    ({**PULL, "dicomweb": {"url": "http://user:secret@pacs/dicom-web"}}, r"dicomweb.url: credentials never go in the URL"),
    ({**PULL, "dicomweb": {"url": "ftp://pacs/dicom-web"}}, r"dicomweb.url: must be an http:// or https:// URL"),
    ({**PULL, "dicomweb": {"url": URL, "credentialsSecret": "Bad_Name"}}, r"dicomweb.credentialsSecret: must be a lower-case DNS-1123 subdomain .the name of a PersistentVolumeClaim, Secret"),
    ({**PULL, "dicomweb": {"url": URL, "password": "x"}}, r"dicomweb.password: unknown field"),
    ({**PULL, "dicomOutput": "../elsewhere"}, r"spec.steps\[0\].dicomOutput: must be a relative path without '..'"),
    ({"type": "push"}, r"spec.steps\[0\]: a push step needs dicomweb"),
    ({**PUSH, "gate": {"metric": "val_mean_dice"}}, r"spec.steps\[0\].gate: needs exactly one of atLeast, atMost"),
    ({**PUSH, "gate": {"metric": "d", "atLeast": 0.5, "atMost": 0.9}}, r"gate: needs exactly one of atLeast, atMost"),
    ({**PUSH, "gate": {"metric": "d", "atLeast": "high"}}, r"gate.atLeast: must be a number"),
    ({**PUSH, "gate": {"atLeast": 0.5}}, r"gate.metric: is required"),
    ({"type": "train", "gate": {"metric": "d", "atLeast": 0.5}}, r"spec.steps\[0\].gate: gate is an option of infer, export and push steps only"),
    ({"type": "validate", "dicomSeg": True}, r"spec.steps\[0\].dicomSeg: dicomSeg is an option of infer steps only"),
    ({"type": "infer", "dicomSeg": "yes"}, r"spec.steps\[0\].dicomSeg: must be true or false"),
]


@pytest.mark.parametrize("step, message", BAD, ids=[m for _, m in BAD])
def test_invalid_pacs_steps_name_the_field(step, message):
    with pytest.raises(MMARError, match=message):
        contract.parse(manifest(step))


def test_a_url_with_a_password_is_never_echoed():
    with pytest.raises(MMARError) as error:
        contract.parse(manifest({**PULL, "dicomweb": {"url": "https://ann:hunter2@pacs.example.org/dicom-web"}}))
    assert "hunter2" not in str(error.value) and "ann" not in str(error.value)
    assert "spec.steps[0].dicomweb.url: credentials never go in the URL" in str(error.value)


def test_a_pull_cannot_write_a_read_only_data_claim():
    body = manifest(PULL)
    body["spec"]["data"]["readOnly"] = True
    with pytest.raises(MMARError, match="spec.data.readOnly: a convert or pull step writes into the data claim"):
        contract.parse(body)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_metric_never_passes_the_operators_gate(value):
    """The operator's rule (mmar.job.gate_decision) as the runtime's: Infinity in metrics.json is no pass."""
    record = contract.gate_decision({"metric": "val_mean_dice", "atLeast": 0.5}, {"val_mean_dice": value})
    assert record["passed"] is False and record["value"] is None and "undefined" in record["message"]


def test_a_gate_on_the_lower_bound_renders_the_runtimes_interval_name():
    """Issue 35: `gate: {metric, atLeast, bound: lower}` -> `--gate val_mean_dice.lower>=0.8`, which mmar.gate
    compares with eval/metrics.json's interval; the text reads back as the gate on that name."""
    gate = {"metric": "val_mean_dice", "atLeast": 0.8, "bound": "lower"}
    contract.check_gate(gate, "spec.steps[0].gate")
    text = contract.gate_text(gate)
    assert text == "val_mean_dice.lower>=0.8"
    assert contract.parse_gate_text(text) == {"metric": "val_mean_dice.lower", "atLeast": 0.8}


def test_a_gate_bound_other_than_an_interval_end_is_refused():
    with pytest.raises(MMARError, match=r"spec.steps\[0\].gate.bound: must be one of lower, upper"):
        contract.check_gate({"metric": "val_mean_dice", "atLeast": 0.8, "bound": "middle"}, "spec.steps[0].gate")
