"""A gated step that its gate skipped, as the operator records it (pure), and the pull/push pods' credentials."""

from __future__ import annotations

import jsonschema

from mmar import job as contract
from mmar_operator import render, status
from mmar_operator.config import Config
from operator_helpers import crd_schema, manifest

NOW = "2026-01-01T02:00:00Z"
URL = "http://orthanc:8042/dicom-web"
GATE = {"metric": "val_mean_dice", "atLeast": 0.85}
BLOCKED = {"metric": "val_mean_dice", "atLeast": 0.85, "value": 0.81, "passed": False,
           "message": "val_mean_dice 0.81 < 0.85 (eval/metrics.json)"}


def pacs_job():
    return contract.parse(manifest(
        {"type": "pull", "dicomweb": {"url": URL, "credentialsSecret": "pacs-creds"}, "query": {"modality": "CT"}, "output": "images"},
        {"type": "infer", "dicomSeg": True, "key": "test", "gate": GATE},
        {"type": "push", "dicomweb": {"url": URL, "credentialsSecret": "pacs-creds"}},
    ))


def done():
    return {"metadata": {"name": "x"}, "spec": {},
            "status": {"startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T01:00:00Z",
                       "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T01:00:00Z"}]}}


def check(st):
    jsonschema.Draft4Validator(crd_schema()["properties"]["status"]).validate(st)
    return st


def test_a_blocked_gate_skips_the_step_and_every_later_one_and_the_job_succeeds():
    job = pacs_job()
    pulled = '{"command":"pull","series":1}'
    skipped = '{"command":"infer","gate":%s}' % __import__("json").dumps(BLOCKED)
    st = check(status.compute(job, {}, {"pull": status.Observed(done(), pulled), "infer": status.Observed(done(), skipped)}, NOW))
    assert [s["phase"] for s in st["steps"]] == ["Succeeded", "Skipped", "Skipped"]
    assert st["steps"][1]["reason"] == st["steps"][2]["reason"] == "GateNotMet"
    assert st["steps"][1]["message"] == "skipped by its gate: val_mean_dice 0.81 < 0.85 (eval/metrics.json)"
    assert st["steps"][2]["message"] == "not run: step infer was skipped by its gate"
    assert st["phase"] == "Succeeded" and status.next_step(job, st) is None
    succeeded = next(c for c in st["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "True" and succeeded["reason"] == "GateNotMet"
    assert "val_mean_dice 0.81 < 0.85" in succeeded["message"] and "1 step(s) succeeded, 2 skipped" in succeeded["message"]
    assert st["results"]["gate"]["passed"] is False and st["results"]["gate"]["value"] == 0.81
    # remembered: a later pass (Jobs gone) changes nothing and creates nothing
    again = status.compute(job, st, {}, "2026-01-02T00:00:00Z")
    assert again["steps"] == st["steps"] and again["phase"] == "Succeeded" and status.next_step(job, again) is None
    assert [s["phase"] for s in status.finished_steps({}, st)] == ["Succeeded", "Skipped", "Skipped"]
    assert status.finished_steps(st, again) == []


def test_a_passed_gate_runs_on_and_shows_in_the_results():
    job = pacs_job()
    passed = {**BLOCKED, "value": 0.9, "passed": True, "message": "val_mean_dice 0.9 >= 0.85 (eval/metrics.json)"}
    infer = '{"command":"infer","num_cases":2,"outputs":2,"eval_dir":"/workspace/mmar/eval","gate":%s}' % __import__("json").dumps(passed)
    st = check(status.compute(job, {}, {"pull": status.Observed(done(), '{"command":"pull"}'), "infer": status.Observed(done(), infer)}, NOW))
    assert [s["phase"] for s in st["steps"]] == ["Succeeded", "Succeeded", "Waiting"]
    assert st["phase"] == "Running" and status.next_step(job, st) == 2
    assert st["results"]["gate"]["message"] == "val_mean_dice 0.9 >= 0.85 (eval/metrics.json)"


def test_pull_and_push_pods_read_credentials_from_the_secret_only():
    job = pacs_job()
    for index in (0, 2):
        [rendered] = render.render_step(job, index, Config())
        container = rendered["spec"]["template"]["spec"]["containers"][0]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}
        assert refs == {"MMAR_DICOMWEB_USERNAME": {"name": "pacs-creds", "key": "username", "optional": True},
                        "MMAR_DICOMWEB_PASSWORD": {"name": "pacs-creds", "key": "password", "optional": True},
                        "MMAR_DICOMWEB_TOKEN": {"name": "pacs-creds", "key": "token", "optional": True}}
        assert "pacs-creds" not in " ".join(container["args"])
        assert "nvidia.com/gpu" not in str(container.get("resources"))
    [infer] = render.render_step(job, 1, Config())
    assert not any("valueFrom" in e and "secretKeyRef" in e["valueFrom"] for e in infer["spec"]["template"]["spec"]["containers"][0]["env"])
