"""status: observed Jobs and termination messages -> MMARJob status (pure, no cluster)."""

from __future__ import annotations

import jsonschema
import pytest

from mmar import job as contract
from mmar_operator import render, status
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
    assert [s["jobName"] for s in st["steps"]] == [render.child_name(three_steps(), n) for n in ("train", "validate", "export")]
    assert status.next_step(three_steps(), st) == 0
    assert {c["type"]: c["status"] for c in st["conditions"]} == {"Running": "False", "Suspended": "False", "Succeeded": "False", "Failed": "False"}
    assert all(c["observedGeneration"] == 1 for c in st["conditions"]) and st["observedGeneration"] == 1


def test_success_records_results_and_moves_on():
    job = three_steps()
    done = child("Complete", startTime="2026-01-01T00:00:00Z", completionTime="2026-01-01T01:00:00Z")
    message = '{"command":"train","epochs":5,"key_metric":"val_mean_dice","best_metric":0.9,"best_epoch":4}'
    st = check(status.compute(job, {}, {"train": status.Observed(done, message)}, NOW))
    assert st["phase"] == "Running" and st["currentStep"] == "validate"
    assert st["steps"][0]["phase"] == "Succeeded" and st["steps"][0]["result"]["best_metric"] == 0.9
    assert st["results"] == {"epochs": 5, "keyMetric": "val_mean_dice", "bestMetric": 0.9, "bestEpoch": 4}
    assert st["startTime"] == "2026-01-01T00:00:00Z"
    assert status.next_step(job, st) == 1


def test_a_finished_step_outlives_its_job():
    """ttlSecondsAfterFinished deletes the Job; the status remembers and the step never runs again."""
    job = three_steps()
    done = child("Complete", startTime="2026-01-01T00:00:00Z", completionTime="2026-01-01T01:00:00Z")
    first = status.compute(job, {}, {"train": status.Observed(done, '{"epochs": 3}')}, NOW)
    later = status.compute(job, first, {}, "2026-01-02T00:00:00Z")
    assert later["steps"][0] == first["steps"][0] and later["results"] == first["results"]
    assert status.next_step(job, later) == 1


def test_failure_keeps_the_log_tail_and_stops():
    job = three_steps()
    failed = child("Failed", startTime="2026-01-01T00:00:00Z")
    st = check(status.compute(job, {}, {"train": status.Observed(failed, "Traceback ...\n  File x\nRuntimeError: CUDA out of memory\n")}, NOW))
    assert st["phase"] == "Failed" and st["currentStep"] == "train"
    assert "RuntimeError: CUDA out of memory" in st["steps"][0]["message"] and "train failed" in st["message"]
    assert st["steps"][0]["completionTime"] == "2026-01-01T01:00:00Z"  # from the Failed condition
    failed_condition = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed_condition["status"] == "True" and failed_condition["reason"] == "StepFailed"
    assert status.next_step(job, st) is None
    assert st["completionTime"] == NOW


def test_a_json_error_message_is_used_as_is():
    st = status.compute(three_steps(), {}, {"train": status.Observed(child("Failed"), '{"command":"train","error":"datalist.json: item 3 has no label"}')}, NOW)
    assert st["steps"][0]["message"].endswith("datalist.json: item 3 has no label")


def test_all_done_is_succeeded():
    done = child("Complete", startTime="2026-01-01T00:00:00Z", completionTime="2026-01-01T01:00:00Z")
    st = check(status.compute(three_steps(), {}, {name: status.Observed(done, None) for name in ("train", "validate", "export")}, NOW))
    assert st["phase"] == "Succeeded" and st["currentStep"] == "export" and st["completionTime"] == NOW
    assert status.next_step(three_steps(), st) is None


def test_conditions_keep_their_transition_time():
    job = three_steps()
    running = {"train": status.Observed(child(startTime="2026-01-01T00:00:00Z"))}
    first = status.compute(job, {}, running, "2026-01-01T00:00:05Z")
    again = status.compute(job, first, running, "2026-01-01T00:10:00Z")
    assert again == first  # nothing moved: identical status, so no patch is sent
    condition = next(c for c in again["conditions"] if c["type"] == "Running")
    assert condition["status"] == "True" and condition["lastTransitionTime"] == "2026-01-01T00:00:05Z"


def test_suspended_and_queued():
    job = three_steps(runPolicy={"suspend": True})
    st = status.compute(job, {}, {}, NOW)
    assert st["phase"] == "Suspended" and status.next_step(job, st) is None
    kueue = manifest({"type": "train"}, {"type": "validate"}, {"type": "export"})
    kueue["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpu-queue"}
    queued = check(status.compute(contract.parse(kueue), {}, {"train": status.Observed(child(suspend=True))}, NOW))
    assert queued["phase"] == "Pending" and queued["steps"][0]["phase"] == "Pending" and queued["steps"][0]["reason"] == "Queued"
    running = next(c for c in queued["conditions"] if c["type"] == "Running")
    assert (running["status"], running["reason"]) == ("False", "Queued")  # the documented reason, where it applies
    assert "waits for admission by Kueue (queue gpu-queue)" in queued["message"]


def test_a_job_whose_pod_has_not_started_is_step_pending():
    st = check(status.compute(three_steps(), {}, {"train": status.Observed(child())}, NOW))
    running = next(c for c in st["conditions"] if c["type"] == "Running")
    assert st["phase"] == "Pending" and (running["status"], running["reason"]) == ("False", "StepPending")
    assert st["message"] == "step train is pending (its Job has no running pod yet)"
    assert all(c["reason"] == f"Not{c['type']}" for c in st["conditions"] if c["type"] != "Running")


def test_a_suspended_job_without_kueue_never_claims_to_wait_for_kueue():
    """Resumed (spec.runPolicy.suspend false again) while its Job is still suspended: it is resuming."""
    st = check(status.compute(three_steps(), {}, {"train": status.Observed(child(suspend=True, startTime="2026-01-01T00:00:00Z"))}, NOW))
    assert "Kueue" not in st["message"] and "admission" not in st["message"]
    assert st["steps"][0]["phase"] == "Suspended" and "resuming" in st["message"]
    held = check(status.compute(three_steps(runPolicy={"suspend": True}), {}, {"train": status.Observed(child(suspend=True))}, NOW))
    assert held["phase"] == "Suspended" and held["steps"][0]["message"] == "its Job is suspended (spec.runPolicy.suspend)"


def test_every_timestamp_is_rfc3339_with_z():
    """The client serializes the Job's times as +00:00 (and a status from an older operator may hold
    such): every time the status writes ends in Z."""
    done = child("Complete", startTime="2026-01-01T00:00:00+00:00", completionTime="2026-01-01T01:00:00.123456+00:00")
    old = {"steps": [{"name": "train", "type": "train", "jobName": "spleen-0-train", "phase": "Succeeded",
                      "startTime": "2026-01-01T00:00:00+00:00", "completionTime": "2026-01-01T01:00:00+00:00"}],
           "startTime": "2026-01-01T00:00:00+00:00",
           "conditions": [{"type": "Running", "status": "True", "reason": "StepRunning", "message": "", "lastTransitionTime": "2026-01-01T00:00:00+00:00"}]}
    for previous, observed in (({}, {"train": status.Observed(done), "validate": status.Observed(child(startTime="2026-01-01T01:00:01+00:00"))}),
                               (old, {"validate": status.Observed(child(startTime="2026-01-01T01:00:01+00:00"))})):
        st = check(status.compute(three_steps(), previous, observed, NOW))
        times = [st["startTime"], *(c["lastTransitionTime"] for c in st["conditions"])]
        times += [s[k] for s in st["steps"] for k in ("startTime", "completionTime") if k in s]
        assert len(times) >= 7 and all(t.endswith("Z") and "+" not in t and "." not in t for t in times), times
    assert status.rfc3339("2026-01-01T01:00:00.5+00:00") == "2026-01-01T01:00:00Z"


def failed_pod(*, init=None, main=None, phase="Failed", finished="2026-01-01T01:00:00Z"):
    def statuses(spec, name):
        if spec is None:
            return [{"name": name, "state": {"waiting": {"reason": "PodInitializing"}}}]
        code, reason, message = spec
        return [{"name": name, "state": {"terminated": {"exitCode": code, "reason": reason, "finishedAt": finished, "message": message}}}]
    st = {"phase": phase, "containerStatuses": statuses(main, "mmar")}
    if init is not None:
        st["initContainerStatuses"] = statuses(init, "mmar-init")
    return {"metadata": {"annotations": {}}, "status": st}


@pytest.mark.parametrize("pod, expected", [
    (failed_pod(init=(1, "Error", "scaffolding\nerror: /workspace/mmar exists and is not an MMAR"), main=None),
     "init container mmar-init exited with code 1: /workspace/mmar exists and is not an MMAR"),
    (failed_pod(init=(0, "Completed", ""), main=(1, "Error", '{"command":"train","error":"label shape (1, 96) != image shape (1, 64)"}')),
     "container mmar exited with code 1: label shape (1, 96) != image shape (1, 64)"),
    (failed_pod(main=(137, "OOMKilled", "epoch 3/30\nKilled")), "container mmar was OOMKilled (exit code 137): Killed"),
    (failed_pod(main=(128, "StartError", 'exec: "mmar": executable file not found in $PATH')),
     'container mmar failed (StartError, exit code 128): exec: "mmar": executable file not found in $PATH'),
    ({"metadata": {}, "status": {"phase": "Failed", "reason": "Evicted", "message": "The node was low on memory."}}, "Evicted; The node was low on memory."),
    (failed_pod(main=(0, "Completed", "{}"), phase="Succeeded"), None),
])
def test_pod_failure_is_told_in_the_failing_containers_own_words(pod, expected):
    assert status.pod_failure([pod]) == expected


def test_a_failed_init_container_reaches_the_step_and_job_messages():
    failed = child("Failed", startTime="2026-01-01T00:00:00Z")
    why = status.pod_failure([failed_pod(init=(1, "Error", "error: cannot write /workspace/mmar: read-only file system"))])
    st = check(status.compute(three_steps(), {}, {"train": status.Observed(failed, message=None, failure=why)}, NOW))
    assert st["phase"] == "Failed"
    assert st["steps"][0]["message"] == "m; init container mmar-init exited with code 1: cannot write /workspace/mmar: read-only file system"
    assert st["message"].startswith("step train failed: m; init container mmar-init")


def test_invalid_spec_is_failed_not_raised():
    body = manifest({"type": "infer", "nodes": 4})
    st = check(status.invalid(body, {}, "spec.steps[0].nodes: only train and finetune steps may run on several nodes", NOW))
    assert st["phase"] == "Failed"
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.steps[0].nodes" in failed["message"]


def test_finished_steps_reports_each_transition_once():
    job = three_steps()
    done = child("Complete", startTime="2026-01-01T00:00:00Z", completionTime="2026-01-01T01:00:00Z")
    first = status.compute(job, {}, {"train": status.Observed(done)}, NOW)
    assert [s["name"] for s in status.finished_steps({}, first)] == ["train"]
    assert status.finished_steps(first, status.compute(job, first, {"train": status.Observed(done)}, NOW)) == []


def test_a_convert_that_failed_says_why_in_the_runtimes_own_words(tmp_path):
    """Issue 30: `{converted 0, failed 24}` with the cause only in `kubectl logs`. The real converter's
    termination message (its producer) carries the first failure, and the pod's failure line shows it."""
    import subprocess
    import sys

    import nibabel as nib
    import numpy as np

    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "in" / "a.nii.gz"))
    (tmp_path / "blocker").write_text("a file where the output folder should be")
    term = tmp_path / "termination-log"
    done = subprocess.run([sys.executable, "-m", "mmar", "convert", "-d", "in", "-o", "blocker/out", "-s", ".nii.gz"],
                          cwd=tmp_path, env={**__import__("os").environ, "MMAR_TERMINATION_LOG": str(term)},
                          capture_output=True, text=True)
    assert done.returncode == 1, done.stdout + done.stderr
    why = status.pod_failure([failed_pod(main=(1, "Error", term.read_text()))])
    assert why == "container mmar exited with code 1: a.nii.gz: [Errno 20] Not a directory: 'blocker/out'"


# ----------------------------------------------------------------------------- a step's identity is its name


def named(name, *conditions, **st):
    job = child(*conditions, **st)
    job["metadata"]["name"] = name
    return job


DONE = {"startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T01:00:00Z"}


def test_a_step_inserted_before_finished_ones_reruns_nothing_and_waits_for_the_running_one():
    """Issue 32 item 1: steps are matched by name, so an insertion renames nothing; the finished step stays
    finished and the inserted one starts only once no step's Job runs (never two at once)."""
    before = contract.parse(manifest({"type": "convert", "name": "images", "input": "raw", "output": "a"},
                                     {"type": "convert", "name": "labels", "input": "raw", "output": "b"}, {"type": "train"}))
    first = status.compute(before, {}, {"images": status.Observed(named("j-images", "Complete", **DONE), '{"command":"convert"}'),
                                        "labels": status.Observed(named("j-labels", startTime="2026-01-01T01:00:01Z"))}, NOW)
    assert [s["phase"] for s in first["steps"]] == ["Succeeded", "Running", "Waiting"]
    after = contract.parse(manifest({"type": "convert", "name": "extra", "input": "raw/extra", "output": "c"},
                                    *contract.steps_of(before)))
    st = status.compute(after, first, {"labels": status.Observed(named("j-labels", startTime="2026-01-01T01:00:01Z"))}, NOW)
    assert [(s["name"], s["phase"], s["jobName"]) for s in st["steps"]] == [
        ("extra", "Waiting", render.child_name(after, "extra")), ("images", "Succeeded", "j-images"),
        ("labels", "Running", "j-labels"), ("train", "Waiting", render.child_name(after, "train"))]
    assert status.next_step(after, st) is None  # labels still runs
    done = status.compute(after, st, {"labels": status.Observed(named("j-labels", "Complete", **DONE), '{"command":"convert"}')}, NOW)
    assert status.next_step(after, done) == 0  # then the inserted step, never images again


def test_steps_recorded_by_an_older_operator_are_matched_by_name():
    """An MMARJob whose status an older operator wrote (Jobs `<mmarjob>-<index>-<step>`): its finished steps
    stay finished, its running step's Job is the one observed, nothing is created twice."""
    job = three_steps()
    old = {"steps": [{"name": "train", "type": "train", "jobName": "spleen-0-train", "phase": "Succeeded", **DONE},
                     {"name": "validate", "type": "validate", "jobName": "spleen-1-validate", "phase": "Running"},
                     {"name": "export", "type": "export", "jobName": "spleen-2-export", "phase": "Waiting"}]}
    st = status.compute(job, old, {"validate": status.Observed(named("spleen-1-validate", startTime="2026-01-01T01:00:01Z"))}, NOW)
    assert [(s["phase"], s["jobName"]) for s in st["steps"]] == [
        ("Succeeded", "spleen-0-train"), ("Running", "spleen-1-validate"), ("Waiting", render.child_name(job, "export"))]
    assert status.next_step(job, st) is None


def test_a_name_taken_by_another_object_is_pending_with_a_condition_until_it_is_free():
    job = three_steps()
    refused = status.Observed(refused=(409, "Job ns/x", "Job ns/x exists and has no controller, not by MMARJob spleen"))
    st = check(status.compute(job, {}, {"train": refused}, NOW))
    assert (st["phase"], st["reason"], st["steps"][0]["reason"]) == ("Pending", "ChildNameConflict", "ChildNameConflict")
    conflict = next(c for c in st["conditions"] if c["type"] == "ChildNameConflict")
    assert conflict["status"] == "True" and "has no controller" in conflict["message"]
    assert status.next_step(job, st) == 0  # retried
    free = check(status.compute(job, st, {"train": status.Observed(named("j", startTime="2026-01-01T01:00:01Z"))}, NOW))
    assert next(c for c in free["conditions"] if c["type"] == "ChildNameConflict")["status"] == "False"


def test_foreign_jobs_are_a_condition_kept_until_looked_at_again():
    job = three_steps()
    st = check(status.compute(job, {}, {}, NOW, foreign=["spleen-0-train"]))
    foreign = next(c for c in st["conditions"] if c["type"] == "ForeignJobsIgnored")
    assert foreign["status"] == "True" and "spleen-0-train" in foreign["message"] and "left alone" in foreign["message"]
    assert next(c for c in status.compute(job, st, {}, NOW)["conditions"] if c["type"] == "ForeignJobsIgnored") == foreign
    gone = status.compute(job, st, {}, NOW, foreign=[])
    assert next(c for c in gone["conditions"] if c["type"] == "ForeignJobsIgnored")["status"] == "False"
    assert not [c for c in status.compute(job, {}, {}, NOW, foreign=[])["conditions"] if c["type"] == "ForeignJobsIgnored"]
