"""MMARJobs in real pods: the operator installed by the chart runs as a pod, every step runs in a real
container from the runtime image on a real node (kubelet, containerd, scheduler, cluster DNS).

    make test-cluster       (tests/cluster/with-node.sh starts the node, loads the images, stops it after)

The demo runs first: the later scenarios train on the data its convert steps wrote to the PV.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
import yaml

from cluster.conftest import OPERATOR_NS, ROOT, RUNTIME_UID, log, operator_pod, wait_for

DEMO = ROOT / "examples" / "demo-job.yaml"
EPOCHS = 2


def demo_manifest(name: str, **spec: Any) -> dict[str, Any]:
    """examples/demo-job.yaml, renamed, with fewer epochs through its own `set` field, `spec` laid over."""
    job = yaml.safe_load(DEMO.read_text())
    job["metadata"]["name"] = name
    for step in job["spec"]["steps"]:
        if step["type"] == "train":
            step["set"]["epochs"] = EPOCHS
    job["spec"].update(spec)
    return job


def train_only(name: str, path: str, epochs: int, **step: Any) -> dict[str, Any]:
    """A train step on the demo's converted data, into its own MMAR folder of the workspace claim."""
    job = demo_manifest(name)
    job["spec"]["mmar"]["path"] = path
    job["spec"]["steps"] = [{"type": "train", "set": {"epochs": epochs}, **step}]
    return job


def step(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in status["steps"] if s["name"] == name)


def step_of(kube, namespace: str, name: str, step_name: str) -> dict[str, Any]:
    """The step's status as the MMARJob shows it now ({} before it has one)."""
    steps = (((kube.mmarjob(namespace, name) or {}).get("status") or {}).get("steps")) or []
    return next((s for s in steps if s["name"] == step_name), {})


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in obj["status"].get("conditions") or [] if c["type"] == kind)


def terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cs in pod["status"].get("containerStatuses") or []:
        if cs["name"] == "mmar" and cs["state"].get("terminated"):
            return cs["state"]["terminated"]
    return None


def test_demo_job_in_real_pods_and_the_operator_pod_replaced_mid_run(kube, operator, space):
    """examples/demo-job.yaml (2 epochs) to Succeeded: every step a real container; status.results are the
    figures the runtime wrote to the PV; `kubectl logs` of the train step shows its epochs; the files on the
    PV belong to uid 1000. Mid-run (train running) the operator pod is deleted: the Deployment's next pod
    takes over, with no duplicate Job or pod."""
    ns, start = space["namespace"], time.monotonic()
    kube.apply({**demo_manifest("demo"), "metadata": {"name": "demo", "namespace": ns}})

    wait_for(lambda: step_of(kube, ns, "demo", "train").get("phase") == "Running", 300, "the demo's train step Running", lambda: kube.describe(ns, "demo"), interval=2)
    log(f"demo: train running after {time.monotonic() - start:.0f} s; deleting the operator pod")
    old = operator_pod(kube)["metadata"]["name"]
    kube.kubectl("delete", "pod", "-n", OPERATOR_NS, old, "--wait=false")
    new = wait_for(lambda: (p := operator_pod(kube)) and p["metadata"]["name"] != old and p, 180,
                   "a new Ready operator pod", lambda: kube.kubectl("get", "pods", "-n", OPERATOR_NS, check=False).stdout)
    log(f"demo: operator pod {new['metadata']['name']} Ready (replaced {old})")

    job = kube.wait_phase(ns, "demo", ("Succeeded",), 900)
    log(f"demo: Succeeded in {time.monotonic() - start:.0f} s")
    st = job["status"]
    assert [s["phase"] for s in st["steps"]] == ["Succeeded"] * 6, st["steps"]
    # one Job per step and one pod per Job: the new operator adopted, it duplicated nothing
    jobs = kube.get("jobs", namespace=ns, selector="mmar.dev/mmarjob=demo")
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(s["jobName"] for s in st["steps"])
    for j in jobs:
        pods = kube.pods_of_job(ns, j["metadata"]["name"])
        assert len(pods) == 1 and pods[0]["status"]["phase"] == "Succeeded", (j["metadata"]["name"], [p["metadata"]["name"] for p in pods])
        assert pods[0]["spec"]["containers"][0]["image"] == operator["values"]["runtime"]["image"]["repository"] + ":" + operator["values"]["runtime"]["image"]["tag"]

    # status.results: the runtime's own figures, as on the PV
    mmar = space["workspace"] / "seg-demo"
    metrics = json.loads((mmar / "eval" / "metrics.json").read_text())
    validation = st["results"]["validation"]
    assert validation and all(validation[k] == pytest.approx(metrics[k]) for k in validation), (validation, metrics)
    assert st["results"]["epochs"] == EPOCHS and st["results"]["conversion"]["failed"] == 0
    for name in ("models/model.ckpt", "models/model.ts", "models/model.onnx", "eval/metrics.json"):
        path = mmar / name
        assert path.stat().st_size > 0 and path.stat().st_uid == RUNTIME_UID, name
    # one StepSucceeded Event per step on the MMARJob (the replaced operator repeated none)
    events = kube.get("events", namespace=ns)
    succeeded = sorted(e["message"] for e in events if e["involvedObject"].get("name") == "demo" and e["reason"] == "StepSucceeded")
    assert succeeded == sorted(f"step {s['name']} succeeded" for s in st["steps"]), succeeded
    # kubectl logs of the train step: its epoch lines
    logs = kube.kubectl("logs", "-n", ns, f"job/{step(st, 'train')['jobName']}", "-c", "mmar").stdout
    assert all(f"epoch {e}/{EPOCHS}" in logs for e in range(1, EPOCHS + 1)), logs[-2000:]


def test_a_step_that_cannot_start_says_why_and_fails_in_bounded_time(kube, operator, space):
    """What only a kubelet and a scheduler produce: an image that is not on the node (imagePullPolicy
    Never: ErrImageNeverPull) and a request no node meets (Unschedulable: Insufficient cpu). The MMARJob
    is Pending with their reason and words within seconds, never a silent Running, and Failed with that
    reason once spec.runPolicy.pendingTimeoutSeconds passed; the stuck Job is stopped (its pod gone)."""
    ns, start = space["namespace"], time.monotonic()
    timeout = 30
    no_image = demo_manifest("no-image", image="localhost/mmar-not-loaded:0", imagePullPolicy="Never",
                             runPolicy={"pendingTimeoutSeconds": timeout})
    no_image["spec"]["steps"] = no_image["spec"]["steps"][:1]
    no_room = demo_manifest("no-room", runPolicy={"pendingTimeoutSeconds": timeout})
    no_room["spec"]["steps"] = [{**no_room["spec"]["steps"][0], "resources": {"requests": {"cpu": "64"}}}]
    for job in (no_image, no_room):
        job["metadata"]["namespace"] = ns
        kube.apply(job)

    for name, reason, words in (("no-image", "ErrImageNeverPull", "localhost/mmar-not-loaded:0"),
                                ("no-room", "Unschedulable", "Insufficient cpu")):
        def shows():
            job = kube.mmarjob(ns, name) or {}
            st = job.get("status") or {}
            running = next((c for c in st.get("conditions") or [] if c["type"] == "Running"), {})
            return st.get("phase") == "Pending" and running.get("reason") == reason and job
        job = wait_for(shows, 60, f"MMARJob {name} Pending with reason {reason}", lambda: kube.describe(ns, name), interval=1)
        assert words in job["status"]["message"] and reason in job["status"]["message"], job["status"]["message"]
        assert step(job["status"], "convert-images")["reason"] == reason
        log(f"{name}: Pending ({reason}) after {time.monotonic() - start:.0f} s: {job['status']['message']}")

    for name, reason in (("no-image", "ErrImageNeverPull"), ("no-room", "Unschedulable")):
        job = kube.wait_phase(ns, name, ("Failed",), timeout + 60)
        failed = step(job["status"], "convert-images")
        assert (failed["phase"], failed["reason"]) == ("Failed", reason), failed
        assert f"did not start within {timeout} s (spec.runPolicy.pendingTimeoutSeconds)" in job["status"]["message"]
        assert condition(job, "Failed")["status"] == "True"
        # the operator stopped the Job: the Job controller failed it and removed its pod
        wait_for(lambda: not [p for p in kube.pods_of_job(ns, failed["jobName"]) if not p["metadata"].get("deletionTimestamp")], 60,
                 f"the pods of {failed['jobName']} gone")
        # (the Job controller writes FailureTarget first, then Failed once the pod is gone)
        wait_for(lambda: any(c["type"] == "Failed" and c["status"] == "True"
                             for c in kube.get("job", failed["jobName"], ns)["status"].get("conditions") or []), 60,
                 f"Job {failed['jobName']} Failed", lambda: json.dumps(kube.get("job", failed["jobName"], ns)["status"]))
        log(f"{name}: Failed ({reason}) after {time.monotonic() - start:.0f} s")


def test_a_step_over_its_memory_limit_fails_with_oomkilled_named(kube, operator, space):
    ns, start = space["namespace"], time.monotonic()
    job = train_only("oom", "oom", 1, resources={"requests": {"cpu": "100m", "memory": "96Mi"}, "limits": {"memory": "96Mi"}})
    job["metadata"]["namespace"] = ns
    kube.apply(job)
    done = kube.wait_phase(ns, "oom", ("Failed",), 300)
    message = step(done["status"], "train")["message"]
    assert "container mmar was OOMKilled (exit code 137)" in message, message
    assert "OOMKilled" in done["status"]["message"]
    log(f"oom: Failed in {time.monotonic() - start:.0f} s: {message}")


def test_a_train_pod_deleted_mid_run_resumes_on_the_jobs_next_pod(kube, operator, space):
    """Preemption: the train pod is deleted while it trains. SIGTERM: the runtime saves its state to the PV
    and exits 143 within the grace period; the Job's podFailurePolicy ignores that exit (no backoff count),
    its next pod resumes from the state on the PV, and the MMARJob succeeds."""
    ns, start, epochs = space["namespace"], time.monotonic(), 4
    job = train_only("preempt", "preempt", epochs)
    job["metadata"]["namespace"] = ns
    kube.apply(job)
    job_name = wait_for(lambda: step_of(kube, ns, "preempt", "train").get("jobName"), 60, "the train step's Job")

    def first_epoch_done():
        pods = kube.pods_of_job(ns, job_name)
        if len(pods) != 1 or pods[0]["status"].get("phase") != "Running":
            return None
        out = kube.kubectl("logs", "-n", ns, pods[0]["metadata"]["name"], "-c", "mmar", check=False).stdout
        return pods[0] if f"epoch 1/{epochs}" in out else None
    first = wait_for(first_epoch_done, 400, "the train pod's first epoch", lambda: kube.describe(ns, "preempt"), interval=2)
    log(f"preempt: epoch 1 done after {time.monotonic() - start:.0f} s; deleting pod {first['metadata']['name']}")
    stopped = time.monotonic()
    kube.kubectl("delete", "pod", "-n", ns, first["metadata"]["name"], "--wait=false")

    done = kube.wait_phase(ns, "preempt", ("Succeeded",), 900)
    log(f"preempt: Succeeded in {time.monotonic() - start:.0f} s ({time.monotonic() - stopped:.0f} s after the deletion)")
    train = step(done["status"], "train")
    assert train["result"]["epochs"] == epochs, train
    pods = kube.pods_of_job(ns, job_name)
    assert [p["metadata"]["name"] for p in pods if p["status"]["phase"] == "Succeeded"], pods
    second = next(p for p in pods if p["status"]["phase"] == "Succeeded")
    assert second["metadata"]["name"] != first["metadata"]["name"]
    out = kube.kubectl("logs", "-n", ns, second["metadata"]["name"], "-c", "mmar").stdout
    # it resumed from the state the stopped pod saved on the PV: epoch 1 (logged before the deletion) is kept,
    # so at most the interrupted epoch was lost
    resumed = re.search(r"resuming .*? after epoch (\d+)", out)
    assert resumed and int(resumed.group(1)) >= 1, out[-2000:]
    child = kube.get("job", job_name, ns)
    assert child["status"].get("failed", 0) <= 1 and child["status"].get("succeeded") == 1, child["status"]


def test_two_node_training_rendezvous_through_the_headless_service(kube, operator, space):
    """A train step with nodes: 2 (gloo on CPU): two real pods of an Indexed Job find rank 0 by its
    headless-Service name (cluster DNS), both train, rank 0 writes the result."""
    ns, start = space["namespace"], time.monotonic()
    job = train_only("two-node", "two-node", EPOCHS, nodes=2)
    job["metadata"]["namespace"] = ns
    kube.apply(job)
    done = kube.wait_phase(ns, "two-node", ("Succeeded",), 900)
    log(f"two-node: Succeeded in {time.monotonic() - start:.0f} s")
    train = step(done["status"], "train")
    assert train["result"]["processes"] == 2 and train["result"]["epochs"] == EPOCHS, train["result"]
    pods = kube.pods_of_job(ns, train["jobName"])
    indexes = sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods)
    assert indexes == ["0", "1"] and all(p["status"]["phase"] == "Succeeded" for p in pods)
    for pod in pods:  # each waited for rank 0's name, then trained
        wait = kube.kubectl("logs", "-n", ns, pod["metadata"]["name"], "-c", "rendezvous").stdout
        assert f"rank 0 ({train['jobName']}-0.{train['jobName']}) is at" in wait, wait
    assert (space["workspace"] / "two-node" / "models" / "model.ckpt").stat().st_uid == RUNTIME_UID


def test_deleting_the_mmarjob_mid_run_removes_its_pods_and_keeps_the_data(kube, operator, space):
    """`kubectl delete mmarjob` while a step runs: the garbage collector removes its Jobs and pods (owner
    references), the MMAR on the PV stays."""
    ns, start = space["namespace"], time.monotonic()
    job = train_only("deleted", "deleted", 20)
    job["metadata"]["namespace"] = ns
    kube.apply(job)
    # the main container runs (its Job counts a ready pod): `mmar init` has written the MMAR
    job_name = wait_for(lambda: step_of(kube, ns, "deleted", "train").get("jobName"), 60, "the train step's Job")
    wait_for(lambda: (kube.get("job", job_name, ns) or {}).get("status", {}).get("ready") == 1, 300, "the train pod ready",
             lambda: kube.describe(ns, "deleted"), interval=2)
    wait_for(lambda: step_of(kube, ns, "deleted", "train")["phase"] == "Running", 60, "the train step Running")
    kube.kubectl("delete", "mmarjob", "deleted", "-n", ns, "--wait=true", timeout=120)
    wait_for(lambda: not kube.get("pods", namespace=ns, selector="mmar.dev/mmarjob=deleted")
             and not kube.get("jobs", namespace=ns, selector="mmar.dev/mmarjob=deleted"), 180,
             "the deleted MMARJob's Jobs and pods gone", lambda: kube.kubectl("get", "jobs,pods", "-n", ns, check=False).stdout)
    mmar = space["workspace"] / "deleted"
    assert (mmar / "config" / "config_train.json").is_file(), sorted(str(p) for p in mmar.rglob("*"))[:20]
    log(f"deleted: pods gone, MMAR kept, {time.monotonic() - start:.0f} s")


def test_a_command_that_exits_1_shows_its_own_error_line(kube, operator, space):
    """A validate step on an MMAR that holds no trained model: `mmar validate` exits 1; the MMARJob's
    message carries the runtime's own error line (its result's `error`), the one `kubectl logs` shows."""
    ns, start = space["namespace"], time.monotonic()
    job = demo_manifest("no-model")
    job["metadata"]["namespace"] = ns
    job["spec"]["mmar"]["path"] = "no-model"
    job["spec"]["steps"] = [{"type": "validate"}]
    kube.apply(job)
    done = kube.wait_phase(ns, "no-model", ("Failed",), 300)
    message = step(done["status"], "validate")["message"]
    assert "container mmar exited with code 1: " in message, message
    words = message.split("container mmar exited with code 1: ", 1)[1]
    logs = kube.kubectl("logs", "-n", ns, f"job/{step(done['status'], 'validate')['jobName']}", "-c", "mmar").stdout
    assert words and f"error: {words}" in logs, (words, logs[-1500:])
    log(f"no-model: Failed in {time.monotonic() - start:.0f} s: {message}")
