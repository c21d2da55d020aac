"""A step's identity, its child's name and who owns a Job, end to end on a real API server (issue 32 items
1, 4, 5): an edit that would insert, reorder or remove started steps is refused by the CRD's transition rule
(and an append runs after the others, one Job at a time); two MMARJobs whose children were once named alike
both run, and a name taken by an object that is not the MMARJob's is a condition, never a frozen status;
Jobs left by a deleted MMARJob of the same name are never taken as a new one's results; an MMARJob whose
Jobs an older operator named `<mmarjob>-<index>-<step>` runs on without re-running a finished step.

Fixtures (namespace, kubelet stand-in, operator process) as in test_operator_e2e.py, which explains them.

    PORT_BASE=28443 tests/e2e/with-cluster.sh .venv/bin/python -m pytest -q tests/e2e/test_operator_identity_e2e.py
"""

from __future__ import annotations

import copy
import time

import pytest
from mmar import job as contract
from mmar_operator import render
from mmar_operator.config import Config

from e2e.kubelet import Outcome
# the shared fixtures and helpers (imported fixtures are this module's own: its namespace, its operator)
from e2e.test_operator_e2e import (GROUP, PLURAL, RESYNC_SECONDS, VERSION, _events, batch, condition, core,  # noqa: F401
                                   custom, k8s, kubelet, manifest, ns, operator, step_of)

pytestmark = pytest.mark.e2e


def job_names(k8s, namespace: str, name: str) -> list[str]:
    return sorted(j.metadata.name for j in k8s.jobs(namespace, name))


def assert_one_at_a_time(k8s, namespace: str, name: str) -> None:
    """No two of the MMARJob's Jobs ran at once: each started after the one before it completed."""
    jobs = sorted(k8s.jobs(namespace, name), key=lambda j: j.status.start_time)
    for before, after in zip(jobs, jobs[1:]):
        assert before.status.completion_time <= after.status.start_time, (before.metadata.name, after.metadata.name)


def test_started_steps_keep_their_places_and_an_appended_step_runs_last(ns, kubelet, k8s, kubectl):
    """Issue 32 item 1: inserting `convert-extra` before a running step used to rename every later child and
    run both converts twice, two at once. The CRD now refuses an insertion, a reorder, a rename and a removal
    of steps already there, in the API server's words; an appended step is taken and runs after the others."""
    steps = [{"name": "convert-images", "type": "convert", "input": "raw/images", "output": "images"},
             {"name": "convert-labels", "type": "convert", "input": "raw/labels", "output": "labels"},
             {"type": "train"}]
    held = kubelet.script(step_of("t2", "convert-labels"), Outcome.running())
    k8s.create(ns, manifest("t2", steps))
    labels = k8s.child(ns, "t2", "convert-labels")
    k8s.wait(lambda: k8s.pod_running(ns, labels), "convert-labels' pod to run", ns, "t2")

    extra = '{"name":"convert-extra","type":"convert","input":"raw/extra","output":"extra"}'
    for patch in (f'[{{"op":"add","path":"/spec/steps/0","value":{extra}}}]',  # the repro
                  '[{"op":"move","from":"/spec/steps/1","path":"/spec/steps/0"}]',
                  '[{"op":"remove","path":"/spec/steps/2"}]',
                  '[{"op":"add","path":"/spec/steps/2/name","value":"train-2"}]'):
        refused = kubectl("patch", "mmarjob", "t2", "-n", ns, "--type=json", "-p", patch, check=False)
        assert refused.returncode != 0 and "add new steps at the end only" in refused.stderr, (patch, refused.stderr)
    assert [s.get("name", s["type"]) for s in k8s.get(ns, "t2")["spec"]["steps"]] == ["convert-images", "convert-labels", "train"]

    kubectl("patch", "mmarjob", "t2", "-n", ns, "--type=json", "-p", f'[{{"op":"add","path":"/spec/steps/-","value":{extra}}}]')
    time.sleep(2 * RESYNC_SECONDS)  # reconciled meanwhile: nothing starts beside the running step
    assert job_names(k8s, ns, "t2") == sorted(k8s.child(ns, "t2", s) for s in ("convert-images", "convert-labels"))
    kubelet.release(held)
    status = k8s.wait_phase(ns, "t2", "Succeeded", "Failed")
    assert [(s["name"], s["phase"]) for s in status["steps"]] == [
        ("convert-images", "Succeeded"), ("convert-labels", "Succeeded"), ("train", "Succeeded"), ("convert-extra", "Succeeded")]
    assert job_names(k8s, ns, "t2") == sorted(k8s.child(ns, "t2", s) for s in ("convert-images", "convert-labels", "train", "convert-extra"))
    for job in k8s.jobs(ns, "t2"):  # each step ran once
        assert len(k8s.pods(ns, job.metadata.name)) == 1, job.metadata.name
    assert_one_at_a_time(k8s, ns, "t2")


def test_children_of_two_mmarjobs_never_share_a_name(ns, kubelet, k8s):
    """Issue 32 item 4: `a` (step x-1-train) and `a-0-x` (steps validate, train) both wanted the Job
    `a-0-x-1-train`, and `a-0-x` showed a running validate forever. Names carry a hash of the owner's uid."""
    k8s.create(ns, manifest("a", [{"name": "x-1-train", "type": "train"}]))
    k8s.create(ns, manifest("a-0-x", [{"type": "validate"}, {"type": "train"}]))
    for name in ("a", "a-0-x"):
        status = k8s.wait_phase(ns, name, "Succeeded", "Failed")
        assert status["phase"] == "Succeeded" and all(s.get("result") for s in status["steps"]), status
        uid = k8s.get(ns, name)["metadata"]["uid"]
        for job in k8s.jobs(ns, name):
            assert job.metadata.labels[render.LABEL_UID] == uid
            assert [r.uid for r in job.metadata.owner_references] == [uid]
    assert job_names(k8s, ns, "a") == [k8s.child(ns, "a", "x-1-train")]
    assert job_names(k8s, ns, "a-0-x") == sorted(k8s.child(ns, "a-0-x", s) for s in ("validate", "train"))


def test_a_name_taken_by_another_object_is_a_condition_until_it_is_free(ns, kubelet, k8s, custom, batch, core):
    """A clash that still happens (a Job of the wanted name that is not this MMARJob's): the step waits
    (Pending, reason ChildNameConflict), the MMARJob has condition ChildNameConflict and a Warning Event, the
    other Job is left alone; once the name is free the step runs."""
    body = manifest("squat", [{"type": "train"}], runPolicy={"suspend": True})
    k8s.create(ns, body)
    wanted = k8s.child(ns, "squat", "train")
    k8s.wait_phase(ns, "squat", "Suspended")
    batch.create_namespaced_job(ns, {"metadata": {"name": wanted}, "spec": {"suspend": True, "template": {"spec": {
        "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox", "command": ["true"]}]}}}})
    custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "squat", {"spec": {"runPolicy": {"suspend": False}}})
    status = k8s.wait_step(ns, "squat", 0, "Pending", "ChildNameConflict")
    assert (status["phase"], status["reason"]) == ("Pending", "ChildNameConflict")
    conflict = condition(status, "ChildNameConflict")
    assert conflict["status"] == "True" and f"Job {ns}/{wanted} exists and has no controller" in conflict["message"], conflict
    k8s.wait(lambda: [e for e in _events(core, ns, "squat") if e.reason == "ChildNameConflict" and e.type == "Warning"],
             "a ChildNameConflict Event")
    assert not batch.read_namespaced_job(wanted, ns).metadata.owner_references  # not taken over
    assert f"reconcile of {ns}/squat failed" not in k8s.operator.log_text()  # a status, not a crash loop

    batch.delete_namespaced_job(wanted, ns, propagation_policy="Background")
    status = k8s.wait_phase(ns, "squat", "Succeeded", "Failed", timeout=90)  # retried with back-off
    assert status["phase"] == "Succeeded" and condition(status, "ChildNameConflict")["status"] == "False"
    assert [r.uid for r in batch.read_namespaced_job(wanted, ns).metadata.owner_references] == [k8s.get(ns, "squat")["metadata"]["uid"]]


def test_jobs_left_by_a_deleted_mmarjob_are_not_a_new_ones_results(ns, kubelet, k8s, kubectl, core):
    """Issue 32 item 5: `reuse` deleted with --cascade=orphan and made again with other settings was Succeeded
    at once with the old results. Its Jobs are now the ones its uid controls; the old one is named in
    condition ForeignJobsIgnored (and a Warning Event), never adopted, and left where it is."""
    k8s.create(ns, manifest("reuse", [{"type": "train", "set": {"epochs": 2}}]))
    assert k8s.wait_phase(ns, "reuse", "Succeeded", "Failed")["phase"] == "Succeeded"
    (old,) = job_names(k8s, ns, "reuse")
    kubectl("delete", "mmarjob", "reuse", "-n", ns, "--cascade=orphan")
    k8s.wait(lambda: k8s.get(ns, "reuse") is None and not k8s.batch.read_namespaced_job(old, ns).metadata.owner_references,
             "the MMARJob gone, its Job orphaned")

    held = kubelet.script(step_of("reuse", "train"), Outcome.running())
    k8s.create(ns, manifest("reuse", [{"type": "train", "set": {"epochs": 500}}]))
    new = k8s.child(ns, "reuse", "train")
    assert new != old
    k8s.wait(lambda: k8s.pod_running(ns, new), "the new MMARJob's own train pod to run", ns, "reuse")
    status = k8s.wait(lambda: (lambda st: st if any(c["type"] == "ForeignJobsIgnored" for c in st.get("conditions") or []) else None)(
        k8s.status(ns, "reuse")), "condition ForeignJobsIgnored", ns, "reuse")
    assert status["phase"] == "Running" and status["steps"][0]["jobName"] == new
    foreign = condition(status, "ForeignJobsIgnored")
    assert foreign["status"] == "True" and old in foreign["message"] and "left alone" in foreign["message"]
    k8s.wait(lambda: [e for e in _events(core, ns, "reuse") if e.reason == "ForeignJobsIgnored" and old in e.message],
             "a ForeignJobsIgnored Event")
    kubelet.release(held)
    status = k8s.wait_phase(ns, "reuse", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded" and "epochs=500" in k8s.batch.read_namespaced_job(new, ns).spec.template.spec.containers[0].args
    assert not k8s.batch.read_namespaced_job(old, ns).metadata.owner_references  # left alone, not adopted
    k8s.batch.delete_namespaced_job(old, ns, propagation_policy="Background")


def test_an_mmarjob_of_an_older_operator_runs_on_without_rerunning_a_finished_step(ns, kubelet, k8s, custom, batch):
    """After an operator upgrade, an MMARJob whose Jobs the older operator made (`<mmarjob>-<index>-<step>`, no
    uid label) is matched by step name and owner uid: a finished step is not run again, only what is left."""
    steps = [{"type": "convert", "input": "raw", "output": "nifti"}, {"type": "train"}]
    k8s.create(ns, manifest("upgrade", steps, runPolicy={"suspend": True}))
    k8s.wait_phase(ns, "upgrade", "Suspended")
    body = contract.parse(k8s.get(ns, "upgrade"))
    old = render.render_job(body, 0, Config())  # the Job as the older operator made it
    old["metadata"]["name"] = "upgrade-0-convert"
    old["spec"]["suspend"] = False
    for labels in (old["metadata"]["labels"], old["spec"]["template"]["metadata"]["labels"]):
        del labels[render.LABEL_UID]
        labels["mmar.dev/step-index"] = "0"
    # it ran before the upgrade: made without the MMARJob's label (the suspended MMARJob would hold it),
    # labelled once it completed
    unlabelled = copy.deepcopy(old)
    del unlabelled["metadata"]["labels"][render.LABEL_JOB]
    batch.create_namespaced_job(ns, unlabelled)
    k8s.wait(lambda: (batch.read_namespaced_job("upgrade-0-convert", ns).status.succeeded or 0) == 1, "the old convert Job to complete")
    batch.patch_namespaced_job("upgrade-0-convert", ns, {"metadata": {"labels": old["metadata"]["labels"]}},
                               _content_type="application/merge-patch+json")
    k8s.wait_step(ns, "upgrade", 0, "Succeeded")  # recorded while suspended: nothing started
    custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "upgrade", {"spec": {"runPolicy": {"suspend": False}}})
    status = k8s.wait_phase(ns, "upgrade", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded"
    assert [(s["name"], s["jobName"]) for s in status["steps"]] == [
        ("convert", "upgrade-0-convert"), ("train", k8s.child(ns, "upgrade", "train"))]
    assert job_names(k8s, ns, "upgrade") == sorted(["upgrade-0-convert", k8s.child(ns, "upgrade", "train")])
    assert len(k8s.pods(ns, "upgrade-0-convert")) == 1  # convert ran once
