"""status: observed Jobs and termination messages -> MMARJob status (pure, no cluster)."""

from __future__ import annotations

import jsonschema
import pytest

from mmar import job as contract
from mmar_operator import status
from operator_helpers import crd_schema, manifest

NOW = "2026-01-01T02:00:00Z"
STATUS_SCHEMA = crd_schema()["properties"]["status"]


def three_steps(**spec):
    return contract.parse(manifest({"type": "train"}, {"type": "validate"}, {"type": "export"}, **spec))


def child(*conditions, suspend=False, **st):
    return {"metadata": {"name": "x"}, "spec": {"suspend": suspend},
            "status": {**st, "conditions": [{"type": t, "status": "True", "lastTransitionTime": "2026-01-01T01:00:00Z", "message": "m", "reason": "R"} for t in conditions]}}


def check(st):
    jsonschema.Draft4Validator(STATUS_SCHEMA).validate(st)
    return st


@pytest.mark.parametrize("obj, phase", [
    (child(), "Pending"),
    (child(startTime="t"), "Running"),
    (child(active=1), "Running"),
    (child(suspend=True), "Suspended"),
    (child("Complete", startTime="t"), "Succeeded"),
    (child("Failed", startTime="t"), "Failed"),
    (child("Suspended", suspend=False), "Pending"),  # a stale Suspended condition after resume
])
def test_job_phase(obj, phase):
    assert status.job_phase(obj)[0] == phase


def pod(index, exit_code, message, finished="2026-01-01T01:00:00Z", container="mmar"):
    return {"metadata": {"annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "status": {"containerStatuses": [{"name": container, "state": {"terminated": {"exitCode": exit_code, "finishedAt": finished, "message": message}}}]}}


def test_termination_message_comes_from_rank_zero_and_the_matching_attempt():
    pods = [pod(1, 0, "rank1"), pod(0, 1, "crash", "2026-01-01T00:30:00Z"), pod(0, 0, "ok", "2026-01-01T00:50:00Z"), pod(0, 0, "sidecar", container="other")]
    assert status.termination_message(pods, succeeded=True) == "ok"
    assert status.termination_message(pods, succeeded=False) == "crash"
    assert status.termination_message([{"metadata": {}, "status": {}}], True) is None


def test_nothing_created_yet_is_pending_and_waiting():
    st = check(status.compute(three_steps(), {}, {}, NOW))
    assert st["phase"] == "Pending" and st["currentStep"] == "train"
    assert [s["phase"] for s in st["steps"]] == ["Waiting"] * 3
    assert [s["jobName"] for s in st["steps"]] == ["spleen-0-train", "spleen-1-validate", "spleen-2-export"]
    assert status.next_step(three_steps(), st) == 0
    assert {c["type"]: c["status"] for c in st["conditions"]} == {"Running": "False", "Suspended": "False", "Succeeded": "False", "Failed": "False"}
    assert all(c["observedGeneration"] == 1 for c in st["conditions"]) and st["observedGeneration"] == 1


def test_success_records_results_and_moves_on():
    job = three_steps()
    done = child("Complete", startTime="2026-01-01T00:00:00Z", completionTime="2026-01-01T01:00:00Z")
    message = '{"command":"train","epochs":5,"key_metric":"val_mean_dice","best_metric":0.9,"best_epoch":4}'
    st = check(status.compute(job, {}, {0: status.Observed(done, message)}, NOW))
    assert st["phase"] == "Running" and st["currentStep"] == "validate"
    assert st["steps"][0]["phase"] == "Succeeded" and st["steps"][0]["result"]["best_metric"] == 0.9
    assert st["results"] == {"epochs": 5, "keyMetric": "val_mean_dice", "bestMetric": 0.9, "bestEpoch": 4}
    assert st["startTime"] == "2026-01-01T00:00:00Z"
    assert status.next_step(job, st) == 1


def test_a_finished_step_outlives_its_job():
    """ttlSecondsAfterFinished deletes the Job; the status remembers and the step never runs again."""
    job = three_steps()
    done = child("Complete", startTime="2026-01-01T00:00:00Z", completionTime="2026-01-01T01:00:00Z")
    first = status.compute(job, {}, {0: status.Observed(done, '{"epochs": 3}')}, NOW)
    later = status.compute(job, first, {}, "2026-01-02T00:00:00Z")
    assert later["steps"][0] == first["steps"][0] and later["results"] == first["results"]
    assert status.next_step(job, later) == 1


def test_failure_keeps_the_log_tail_and_stops():
    job = three_steps()
    failed = child("Failed", startTime="2026-01-01T00:00:00Z")
    st = check(status.compute(job, {}, {0: status.Observed(failed, "Traceback ...\n  File x\nRuntimeError: CUDA out of memory\n")}, NOW))
    assert st["phase"] == "Failed" and st["currentStep"] == "train"
    assert "RuntimeError: CUDA out of memory" in st["steps"][0]["message"] and "train failed" in st["message"]
    assert st["steps"][0]["completionTime"] == "2026-01-01T01:00:00Z"  # from the Failed condition
    failed_condition = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed_condition["status"] == "True" and failed_condition["reason"] == "StepFailed"
    assert status.next_step(job, st) is None
    assert st["completionTime"] == NOW


def test_a_json_error_message_is_used_as_is():
    st = status.compute(three_steps(), {}, {0: status.Observed(child("Failed"), '{"command":"train","error":"datalist.json: item 3 has no label"}')}, NOW)
    assert st["steps"][0]["message"].endswith("datalist.json: item 3 has no label")


def test_all_done_is_succeeded():
    done = child("Complete", startTime="2026-01-01T00:00:00Z", completionTime="2026-01-01T01:00:00Z")
    st = check(status.compute(three_steps(), {}, {i: status.Observed(done, None) for i in range(3)}, NOW))
    assert st["phase"] == "Succeeded" and st["currentStep"] == "export" and st["completionTime"] == NOW
    assert status.next_step(three_steps(), st) is None


def test_conditions_keep_their_transition_time():
    job = three_steps()
    running = {0: status.Observed(child(startTime="2026-01-01T00:00:00Z"))}
    first = status.compute(job, {}, running, "2026-01-01T00:00:05Z")
    again = status.compute(job, first, running, "2026-01-01T00:10:00Z")
    assert again == first  # nothing moved: identical status, so no patch is sent
    condition = next(c for c in again["conditions"] if c["type"] == "Running")
    assert condition["status"] == "True" and condition["lastTransitionTime"] == "2026-01-01T00:00:05Z"


def test_suspended_and_queued():
    job = three_steps(runPolicy={"suspend": True})
    st = status.compute(job, {}, {}, NOW)
    assert st["phase"] == "Suspended" and status.next_step(job, st) is None
    queued = status.compute(three_steps(), {}, {0: status.Observed(child(suspend=True))}, NOW)
    assert queued["phase"] == "Pending" and next(c for c in queued["conditions"] if c["type"] == "Running")["status"] == "False"
    assert "waits for admission" in queued["message"]


def test_invalid_spec_is_failed_not_raised():
    body = manifest({"type": "infer", "nodes": 4})
    st = check(status.invalid(body, {}, "spec.steps[0].nodes: only train and finetune steps may run on several nodes", NOW))
    assert st["phase"] == "Failed"
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.steps[0].nodes" in failed["message"]


def test_finished_steps_reports_each_transition_once():
    job = three_steps()
    done = child("Complete", startTime="2026-01-01T00:00:00Z", completionTime="2026-01-01T01:00:00Z")
    first = status.compute(job, {}, {0: status.Observed(done)}, NOW)
    assert [s["name"] for s in status.finished_steps({}, first)] == ["train"]
    assert status.finished_steps(first, status.compute(job, first, {0: status.Observed(done)}, NOW)) == []
