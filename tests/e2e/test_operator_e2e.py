"""The operator end to end on a real Kubernetes API server: every example to Succeeded, failures in the
container's own words, restarts and kills without duplicates, deletion while the operator is down,
suspend/resume, Kueue admission, ttlSecondsAfterFinished: 0, and the step result contract.

The API server, the Job controller, the garbage collector and the TTL controller are real (`make test-e2e`
starts them: tests/e2e/with-cluster.sh; any cluster serves through KUBECONFIG). The real operator runs as
a subprocess (operator_process.py). The node side is the kubelet stand-in (kubelet.py): it binds the pods
the Job controller creates, runs init and main containers through `pods/status` as each test scripts them,
writes each step's termination message with the runtime's own result code, and plays Kueue's admission.

    PORT_BASE=28443 tests/e2e/with-cluster.sh .venv/bin/python -m pytest -q tests/e2e/test_operator_e2e.py
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml
from mmar import job as contract
from mmar_operator.render import child_name

from e2e.kubelet import STANDIN_VALIDATION, Kubelet, Outcome, _key_metric, realistic_result, termination_message
from e2e.operator_process import OperatorProcess

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
GROUP, VERSION, PLURAL = "mmar.dev", "v1alpha1", "mmarjobs"
LABEL = "mmar.dev/mmarjob"
KOPF_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"
TIMEOUT = 60.0
RESYNC_SECONDS = 2


def example_namespaces() -> set[str]:
    return {ns for path in EXAMPLES for ns in [yaml.safe_load(path.read_text())["metadata"].get("namespace")] if ns}


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def core(api):
    return api.CoreV1Api()


@pytest.fixture(scope="module")
def batch(api):
    return api.BatchV1Api()


@pytest.fixture(scope="module")
def custom(api):
    return api.CustomObjectsApi()


@pytest.fixture(scope="module")
def ns(api, crd, core) -> str:
    """This module's namespace (the one examples without a namespace go to)."""
    name = f"op-e2e-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    return name


@pytest.fixture(scope="module")
def kubelet(api, ns, core) -> Iterator[Kubelet]:
    stand_in = Kubelet(api, namespaces=[ns, *sorted(example_namespaces())]).start()
    yield stand_in
    # the namespace goes while the stand-in still confirms its pods' deletions (or they would hold it)
    core.delete_namespace(ns)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(n.metadata.name == ns for n in core.list_namespace().items):
        time.sleep(0.5)
    stand_in.stop()
    assert stand_in.errors == [], "the kubelet stand-in itself failed"


@pytest.fixture(scope="module")
def operator(kubeconfig, ns, kubelet) -> Iterator[OperatorProcess]:
    process = OperatorProcess([ns, *sorted(example_namespaces())], kubeconfig=kubeconfig, resync_seconds=RESYNC_SECONDS)
    process.start()
    yield process
    process.close()


class Cluster:
    """The few reads and waits the scenarios share; a timeout shows the MMARJob and the operator's log."""

    def __init__(self, custom, batch, core, operator: OperatorProcess):
        self.custom, self.batch, self.core, self.operator = custom, batch, core, operator

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return (self.get(namespace, name) or {}).get("status") or {}

    def jobs(self, namespace: str, name: str) -> list[Any]:
        return self.batch.list_namespaced_job(namespace, label_selector=f"{LABEL}={name}").items

    def pods(self, namespace: str, job_name: str) -> list[Any]:
        return self.core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}").items

    def wait(self, predicate: Callable[[], Any], what: str, namespace: str | None = None, name: str | None = None,
             timeout: float = TIMEOUT, interval: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        shown = yaml.safe_dump(self.status(namespace, name)) if name else ""
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{shown}\n--- operator log (tail):\n{self.operator.log_text()[-3000:]}")

    def wait_phase(self, namespace: str, name: str, *phases: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        def reached():
            status = self.status(namespace, name)
            return status if status.get("phase") in phases else None
        return self.wait(reached, f"{namespace}/{name} to reach {' or '.join(phases)}", namespace, name, timeout)

    def wait_step(self, namespace: str, name: str, index: int, phase: str, reason: str | None = None) -> dict[str, Any]:
        def reached():
            status = self.status(namespace, name)
            steps = status.get("steps") or []
            if len(steps) > index and steps[index]["phase"] == phase and reason in (None, steps[index].get("reason")):
                return status
            return None
        return self.wait(reached, f"step {index} of {namespace}/{name} to be {phase}", namespace, name)

    def child(self, namespace: str, name: str, step: str) -> str:
        """The name of the Job of MMARJob `name`'s step `step` (`<mmarjob>-<step>-<hash of its uid and step>`)."""
        uid = self.wait(lambda: (self.get(namespace, name) or {}).get("metadata", {}).get("uid"), f"MMARJob {name}")
        return child_name({"metadata": {"name": name, "uid": uid}}, step)

    def pod_running(self, namespace: str, job_name: str) -> bool:
        return any(p.status.phase == "Running" and not p.metadata.deletion_timestamp for p in self.pods(namespace, job_name))


@pytest.fixture(scope="module")
def k8s(custom, batch, core, operator) -> Cluster:
    return Cluster(custom, batch, core, operator)


def manifest(name: str, steps: list[dict[str, Any]], labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MMARJob", "metadata": {"name": name},
            "spec": {"mmar": {"claimName": "workspace"}, "data": {"claimName": "data"}, "gpusPerNode": 0, "steps": steps, **spec}}
    if labels:
        body["metadata"]["labels"] = labels
    return body


def step_of(mmarjob: str, step: str) -> Callable[[dict[str, Any]], bool]:
    """The kubelet stand-in's matcher of the pods of one MMARJob's step (their Job's name depends on the
    MMARJob's uid, not known before it is created)."""
    def match(obj: dict[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return labels.get(LABEL) == mmarjob and labels.get("mmar.dev/step") == step
    return match


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def ensure_namespace(core, name: str) -> bool:
    """Create namespace `name` unless it exists (waiting out a deletion another test started); True if made."""
    from kubernetes.client.exceptions import ApiException

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if core.read_namespace(name).status.phase == "Active":
                return False
        except ApiException as error:
            if error.status != 404:
                raise
            try:
                core.create_namespace({"metadata": {"name": name}})
                return True
            except ApiException as race:
                if race.status != 409:
                    raise
        time.sleep(0.5)
    raise AssertionError(f"namespace {name} stayed Terminating")


def claim(core, namespace: str, name: str) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        core.create_namespaced_persistent_volume_claim(namespace, {
            "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    except ApiException as error:
        if error.status != 409:
            raise


def assert_no_duplicates(k8s: Cluster, namespace: str, name: str, steps: list[dict[str, Any]]) -> None:
    """One Job per step, named by the step, and one pod per node of it (backoffLimit 0: no retries)."""
    jobs = k8s.jobs(namespace, name)
    expected = [k8s.child(namespace, name, s.get("name", s["type"])) for s in steps]
    assert sorted(j.metadata.name for j in jobs) == sorted(expected)
    for job, step in zip(sorted(jobs, key=lambda j: expected.index(j.metadata.name)), steps):
        assert len(k8s.pods(namespace, job.metadata.name)) == step.get("nodes", 1), job.metadata.name


# ------------------------------------------------------------------------------------------------ scenarios


def expected_phases(body: dict[str, Any]) -> list[str]:
    """Each step's final phase when the stand-in runs it: Succeeded, or Skipped from the first step whose gate
    the stand-in MMAR's validation (kubelet.STANDIN_VALIDATION) does not reach."""
    key = _key_metric(body["spec"].get("task", "segmentation"))
    phases = []
    for step in body["spec"]["steps"]:
        blocked = bool(phases and phases[-1] == "Skipped")
        if not blocked and "gate" in step:
            blocked = not contract.gate_decision(step["gate"], {key: STANDIN_VALIDATION})["passed"]
        phases.append("Skipped" if blocked else "Succeeded")
    return phases


def test_every_example_reaches_succeeded(kubectl, core, ns, kubelet, k8s):
    made = [n for n in sorted(example_namespaces()) if ensure_namespace(core, n)]
    applied: list[tuple[str, dict[str, Any]]] = []
    try:
        for path in EXAMPLES:
            body = yaml.safe_load(path.read_text())
            namespace = body["metadata"].get("namespace") or ns
            for claim_name in {body["spec"]["mmar"]["claimName"], body["spec"]["data"]["claimName"]}:
                claim(core, namespace, claim_name)
            kubectl("apply", "-n", namespace, "-f", str(path))  # as a user does: the file unchanged
            applied.append((namespace, body))

        for namespace, body in applied:
            name, steps = body["metadata"]["name"], body["spec"]["steps"]
            status = k8s.wait_phase(namespace, name, "Succeeded", "Failed")
            assert status["phase"] == "Succeeded", yaml.safe_dump(status)
            phases = expected_phases(body)
            assert [s["phase"] for s in status["steps"]] == phases
            ran = [s for s in status["steps"] if not s.get("message", "").startswith("not run:")]
            assert all(s.get("result", {}).get("command") for s in ran), "every step's result is recorded"
            reason = "GateNotMet" if "Skipped" in phases else "AllStepsSucceeded"
            assert (condition(status, "Succeeded")["status"], condition(status, "Succeeded")["reason"]) == ("True", reason)
            assert all(condition(status, kind)["status"] == "False" for kind in ("Running", "Suspended", "Failed"))
            assert status["observedGeneration"] == k8s.get(namespace, name)["metadata"]["generation"]
            times = [status["startTime"], status["completionTime"], *(c["lastTransitionTime"] for c in status["conditions"]),
                     *(s[k] for s in status["steps"] for k in ("startTime", "completionTime"))]
            assert all(t.endswith("Z") for t in times), times
            assert_no_duplicates(k8s, namespace, name, steps)

            # kubectl's printer columns show the run
            table = kubectl("get", "mmarjobs", name, "-n", namespace, "-o", "wide").stdout.splitlines()
            header, row = table[0].split(), table[1].split()
            assert header == ["NAME", "PHASE", "STEP", "EPOCHS", "BEST", "GATE", "AGE", "REASON", "MESSAGE"]
            assert table[1].rstrip().endswith(f"{status['reason']}   {status['message']}"), table  # -o wide: why, in words
            epochs = next((s["set"]["epochs"] for s in steps if s["type"] in ("train", "finetune")), None)
            if epochs is not None:
                assert row[:5] == [name, "Succeeded", status["currentStep"], str(epochs), str(status["results"]["bestMetric"])]
            else:  # no training step: the Epochs and Best cells are empty
                assert row[:3] == [name, "Succeeded", status["currentStep"]]
            if "gate" in status["results"]:
                assert status["results"]["gate"]["message"] in table[1]

            queue = (body["metadata"].get("labels") or {}).get("kueue.x-k8s.io/queue-name")
            policy = body["spec"].get("runPolicy") or {}
            for job in k8s.jobs(namespace, name):
                annotations = job.metadata.annotations or {}
                # Kueue-queued Jobs were created suspended and admitted (by the stand-in's Kueue) exactly then
                assert ("mmar.dev/kubelet-standin-admitted" in annotations) == bool(queue)
                # the TTL was set once the result was recorded (not at creation: see test_ttl_zero_keeps_every_result)
                assert job.spec.ttl_seconds_after_finished == policy.get("ttlSecondsAfterFinished")
    finally:
        for namespace, body in applied:
            kubectl("delete", "mmarjob", body["metadata"]["name"], "-n", namespace, "--wait=false", check=False)
        for namespace in made:
            core.delete_namespace(namespace)


FAILURES = {
    # name: (outcome of its first step's pod, task (None: no init container), what the status must say)
    "fail-main": (Outcome.fail("label shape (1, 96, 96, 96) != image shape (1, 64, 64, 64) for case spleen_3"), None,
                  "container mmar exited with code 1: label shape (1, 96, 96, 96) != image shape (1, 64, 64, 64) for case spleen_3"),
    "fail-init": (Outcome.init_fail("/workspace/mmar is not empty and holds no MMAR (config/config_train.json missing)"), "segmentation",
                  "init container mmar-init exited with code 1: /workspace/mmar is not empty and holds no MMAR (config/config_train.json missing)"),
    "fail-oom": (Outcome.crash("epoch 3/30 loss 0.4127\nKilled"), None, "container mmar was OOMKilled (exit code 137): Killed"),
    "fail-start": (Outcome.start_error("CreateContainerError", 'exec: "mmar": executable file not found in $PATH'), None,
                   'container mmar failed (StartError, exit code 128): exec: "mmar": executable file not found in $PATH'),
}


def test_a_failing_container_fails_the_job_with_its_own_message(ns, kubelet, k8s):
    for name, (outcome, task, _) in FAILURES.items():
        kubelet.script(step_of(name, "train"), outcome)
        spec = {"task": task} if task else {}
        k8s.create(ns, manifest(name, [{"type": "train"}, {"type": "export"}], **spec))
    for name, (_, _, expected) in FAILURES.items():
        status = k8s.wait_phase(ns, name, "Failed", "Succeeded")
        assert status["phase"] == "Failed"
        assert [s["phase"] for s in status["steps"]] == ["Failed", "NotRun"]  # export never runs (as `mmar run` says)
        assert (status["steps"][1]["reason"], status["steps"][1]["message"]) == ("PreviousStepFailed", "not run: step train failed")
        assert status["reason"] == "StepFailed"  # kubectl get -o wide: the Reason column
        step = status["steps"][0]
        # the Job controller's reason, then the failing container's own words
        assert step["message"] == f"Job has reached the specified backoff limit; {expected}"
        assert status["message"] == f"step train failed: {step['message']}"
        failed = condition(status, "Failed")
        assert (failed["status"], failed["reason"]) == ("True", "StepFailed") and expected in failed["message"]
        assert [j.metadata.name for j in k8s.jobs(ns, name)] == [k8s.child(ns, name, "train")]  # export never created


def test_operator_killed_mid_run_and_restarted_makes_no_duplicates(ns, kubelet, k8s, operator):
    steps = [{"type": "convert", "input": "raw", "output": "nifti"}, {"type": "train", "set": {"epochs": 2}}, {"type": "validate"}]
    first = kubelet.script(step_of("restart", "convert"), Outcome.running())
    second = kubelet.script(step_of("restart", "train"), Outcome.running())
    k8s.create(ns, manifest("restart", steps))
    convert, train = k8s.child(ns, "restart", "convert"), k8s.child(ns, "restart", "train")
    k8s.wait(lambda: k8s.pod_running(ns, convert), "the convert step's pod to run", ns, "restart")
    uids = {j.metadata.name: j.metadata.uid for j in k8s.jobs(ns, "restart")}

    # SIGTERM while a step runs; the step finishes while no operator watches
    assert operator.terminate() == 0
    kubelet.release(first)
    k8s.wait(lambda: (k8s.batch.read_namespaced_job(convert, ns).status.succeeded or 0) == 1, "convert's Job to complete")
    operator.start()
    k8s.wait(lambda: k8s.pod_running(ns, train), "the train step's pod to run", ns, "restart")
    uids.update({j.metadata.name: j.metadata.uid for j in k8s.jobs(ns, "restart")})

    # SIGKILL while the next one runs: no cleanup at all
    operator.kill()
    kubelet.release(second)
    k8s.wait(lambda: (k8s.batch.read_namespaced_job(train, ns).status.succeeded or 0) == 1, "train's Job to complete")
    operator.start()
    status = k8s.wait_phase(ns, "restart", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded" and all(s.get("result") for s in status["steps"])
    assert_no_duplicates(k8s, ns, "restart", steps)
    # the Jobs that existed before each restart were adopted, not deleted and made again
    assert {n: u for n, u in ((j.metadata.name, j.metadata.uid) for j in k8s.jobs(ns, "restart")) if n in uids} == uids

    # SIGKILL right after the first child appears (the operator may be mid-reconcile), then a restart
    k8s.create(ns, manifest("burst", [{"type": "train"}, {"type": "export"}]))
    k8s.wait(lambda: k8s.jobs(ns, "burst"), "burst's first Job", interval=0.02)
    operator.kill()
    operator.start()
    assert k8s.wait_phase(ns, "burst", "Succeeded", "Failed")["phase"] == "Succeeded"
    assert_no_duplicates(k8s, ns, "burst", [{"type": "train"}, {"type": "export"}])


def test_an_mmarjob_deleted_while_the_operator_is_down_goes_at_once(ns, kubelet, k8s, operator, kubectl):
    hold = kubelet.script(step_of("orphan", "train"), Outcome.running())
    k8s.create(ns, manifest("orphan", [{"type": "train"}, {"type": "export"}]))
    train = k8s.child(ns, "orphan", "train")
    k8s.wait(lambda: k8s.pod_running(ns, train), "the train step's pod to run", ns, "orphan")
    k8s.wait_phase(ns, "orphan", "Running")
    # no finalizer on any MMARJob, finished or not (docs/operator.md: no finalizer may ever be added)
    for item in k8s.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]:
        assert not item["metadata"].get("finalizers"), item["metadata"]["name"]

    operator.kill()
    try:
        started = time.monotonic()
        kubectl("delete", "mmarjob", "orphan", "-n", ns, "--wait=false")
        k8s.wait(lambda: k8s.get(ns, "orphan") is None, "the MMARJob to be gone", timeout=10, interval=0.05)
        assert time.monotonic() - started < 5
        # its Job and pod follow through their ownerReferences (the garbage collector; the kubelet confirms the pod)
        k8s.wait(lambda: not k8s.jobs(ns, "orphan") and not k8s.pods(ns, train), "the children to be collected", timeout=30)

        # an MMARJob that an older operator gave kopf's finalizer: deletable once this operator has seen it
        legacy = manifest("legacy", [{"type": "train"}])
        legacy["metadata"]["finalizers"] = [KOPF_FINALIZER]
        k8s.create(ns, legacy)
    finally:
        kubelet.release(hold)
        operator.start()
    k8s.wait(lambda: not (k8s.get(ns, "legacy") or {}).get("metadata", {}).get("finalizers"), "kopf's old finalizer to be removed")
    kubectl("delete", "mmarjob", "legacy", "-n", ns, "--wait=false")
    k8s.wait(lambda: k8s.get(ns, "legacy") is None, "the legacy MMARJob to be gone", timeout=10)


class StatusRecorder:
    """Every status the API server holds for one MMARJob, in order (a watch: no transient is missed)."""

    def __init__(self, custom, namespace: str, name: str):
        self.custom, self.namespace, self.name = custom, namespace, name
        self.seen: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "StatusRecorder":
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from kubernetes import watch

        version = None
        while not self._stop.is_set():
            stream = watch.Watch()
            kwargs = {"field_selector": f"metadata.name={self.name}", "timeout_seconds": 2}
            if version:
                kwargs["resource_version"] = version
            for event in stream.stream(self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, **kwargs):
                obj = event["object"]
                version = obj["metadata"]["resourceVersion"]
                if obj.get("status"):
                    self.seen.append(obj["status"])
                if self._stop.is_set():
                    break


def test_suspend_and_resume(ns, kubelet, k8s, kubectl, custom):
    hold = kubelet.script(step_of("pause", "train"), Outcome.running())
    k8s.create(ns, manifest("pause", [{"type": "train"}, {"type": "validate"}]))
    train = k8s.child(ns, "pause", "train")
    with StatusRecorder(custom, ns, "pause") as recorder:
        k8s.wait(lambda: k8s.pod_running(ns, train), "the train step's pod to run", ns, "pause")
        kubectl("patch", "mmarjob", "pause", "-n", ns, "--type", "merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
        status = k8s.wait_phase(ns, "pause", "Suspended")
        assert (condition(status, "Suspended")["status"], condition(status, "Suspended")["reason"]) == ("True", "Suspended")
        # the running step's Job is suspended: the Job controller removes its pod
        k8s.wait(lambda: k8s.batch.read_namespaced_job(train, ns).spec.suspend is True, "the Job to be suspended")
        k8s.wait(lambda: not k8s.pods(ns, train), "the suspended Job's pod to be gone")
        status = k8s.wait_step(ns, "pause", 0, "Suspended")
        assert status["steps"][0]["message"] == "its Job is suspended (spec.runPolicy.suspend)"

        kubectl("patch", "mmarjob", "pause", "-n", ns, "--type", "merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
        k8s.wait(lambda: k8s.batch.read_namespaced_job(train, ns).spec.suspend is False, "the Job to be resumed")
        k8s.wait(lambda: k8s.pod_running(ns, train), "the resumed step's new pod to run", ns, "pause")
        assert k8s.wait_phase(ns, "pause", "Running")["steps"][0]["phase"] == "Running"
        kubelet.release(hold)
        status = k8s.wait_phase(ns, "pause", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded"
    assert sorted(j.metadata.name for j in k8s.jobs(ns, "pause")) == sorted([train, k8s.child(ns, "pause", "validate")])
    phases = [s["phase"] for s in recorder.seen]
    assert "Suspended" in phases and "Running" in phases[phases.index("Suspended"):]
    # no status ever claimed a Kueue admission for a job without Kueue (the resume used to say so briefly)
    said = [s.get("message", "") for s in recorder.seen] + [st.get("message", "") for s in recorder.seen for st in s.get("steps", [])]
    assert not [m for m in said if "Kueue" in m or "admission" in m]


def test_a_kueue_job_is_pending_queued_until_admitted(ns, kubelet, k8s):
    kubelet.hold_admission("queued")  # a queue without quota: nothing is admitted until the test says so
    labels = {"kueue.x-k8s.io/queue-name": "gpu-queue"}
    k8s.create(ns, manifest("queued", [{"type": "train"}, {"type": "validate"}], labels=labels))

    for index, step in enumerate(("train", "validate")):
        job_name = k8s.child(ns, "queued", step)
        job = k8s.wait(lambda: next((j for j in k8s.jobs(ns, "queued") if j.metadata.name == job_name), None), f"Job {job_name}")
        assert job.spec.suspend is True and job.metadata.labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        status = k8s.wait_step(ns, "queued", index, "Pending", reason="Queued")
        time.sleep(RESYNC_SECONDS + 0.5)  # a resync later: still queued, and the operator left suspend to Kueue
        status = k8s.status(ns, "queued")
        running = condition(status, "Running")
        assert status["phase"] == "Pending" and (running["status"], running["reason"]) == ("False", "Queued")
        assert status["message"] == f"step {step} is queued: its Job waits for admission by Kueue (queue gpu-queue)"
        assert k8s.batch.read_namespaced_job(job_name, ns).spec.suspend is True
        assert not k8s.pods(ns, job_name)
        kubelet.admit(ns, job_name)
        k8s.wait_step(ns, "queued", index, "Succeeded")
    assert k8s.wait_phase(ns, "queued", "Succeeded", "Failed")["phase"] == "Succeeded"


DEMO_STEPS = yaml.safe_load((ROOT / "examples" / "demo-job.yaml").read_text())["spec"]["steps"]


def test_ttl_zero_keeps_every_result(ns, kubelet, k8s):
    """ttlSecondsAfterFinished: 0 deletes each finished Job (and its pods) at once; every result is kept."""
    k8s.create(ns, manifest("ttl", DEMO_STEPS, task="segmentation", runPolicy={"ttlSecondsAfterFinished": 0}))
    status = k8s.wait_phase(ns, "ttl", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded"
    assert [s["result"]["command"] for s in status["steps"]] == ["convert", "convert", "train", "validate", "infer", "export"]
    assert {"epochs", "keyMetric", "bestMetric", "bestEpoch", "validation", "predictions", "exported", "conversion"} <= set(status["results"])
    # and the TTL still applies: the TTL controller deletes every Job once its result is recorded
    k8s.wait(lambda: not k8s.jobs(ns, "ttl"), "the TTL controller to delete the finished Jobs", ns, "ttl")
    assert k8s.status(ns, "ttl") == status  # nothing lost with the Jobs


def test_step_results_from_the_runtime_to_the_status(ns, kubelet, k8s):
    """runtime result code -> termination message -> status.steps[].result and status.results."""
    steps = [{"type": "train", "set": {"epochs": 3}}, {"type": "validate"}, {"type": "infer"},
             {"type": "export", "formats": ["torchscript", "onnx"], "inputShape": [1, 1, 64, 64, 64]}]
    k8s.create(ns, manifest("contract", steps, task="segmentation", mmar={"claimName": "workspace", "path": "spleen"}))
    status = k8s.wait_phase(ns, "contract", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded"

    written = {}
    for job in k8s.jobs(ns, "contract"):
        main = job.spec.template.spec.containers[0]
        result = realistic_result([*main.command, *main.args], "segmentation")
        message = termination_message(result)  # what the runtime's write_result leaves in /dev/termination-log
        written[job.metadata.labels["mmar.dev/step"]] = json.loads(message)
    for step in status["steps"]:
        assert step["result"] == written[step["name"]], step["name"]

    train, validate, infer, export = (written[n] for n in ("train", "validate", "infer", "export"))
    results = status["results"]
    assert (results["epochs"], results["keyMetric"], results["bestMetric"], results["bestEpoch"]) == \
        (3, train["key_metric"], train["best_metric"], train["best_epoch"])
    assert results["validation"] == {validate["key_metric"]: validate["metric"]}  # metrics only
    assert results["predictions"] == {"cases": infer["num_cases"], "files": infer["outputs"], "dir": "/workspace/spleen/eval"}
    assert results["exported"] == export["files"] == ["/workspace/spleen/models/model.ts", "/workspace/spleen/models/model.onnx"]


def test_a_gate_passes_or_skips_the_rest_of_the_job(ns, kubelet, k8s, kubectl):
    """The gate as the operator runs it: the step's pod decides (the stand-in with the runtime's own rule,
    mmar.job.gate_decision, over its validation's 0.8047); a pass runs on, a block skips the step and every
    later one (no Job is created for those) and the job still ends Succeeded, reason GateNotMet."""
    base = [{"type": "train", "set": {"epochs": 2}}, {"type": "validate"}]
    passing = base + [{"type": "export", "formats": ["onnx"], "gate": {"metric": "val_mean_dice", "atLeast": 0.8}}]
    blocking = base + [{"type": "infer", "dicomSeg": True, "gate": {"metric": "val_mean_dice", "atLeast": 0.9}},
                       {"type": "push", "dicomweb": {"url": "http://orthanc:8042/dicom-web", "credentialsSecret": "pacs"}}]
    k8s.create(ns, manifest("gate-pass", passing, task="segmentation"))
    k8s.create(ns, manifest("gate-block", blocking, task="segmentation"))

    passed = k8s.wait_phase(ns, "gate-pass", "Succeeded", "Failed")
    assert [s["phase"] for s in passed["steps"]] == ["Succeeded"] * 3
    assert condition(passed, "Succeeded")["reason"] == "AllStepsSucceeded"
    assert passed["results"]["gate"] == {"metric": "val_mean_dice", "atLeast": 0.8, "value": 0.8047, "passed": True,
                                         "message": "val_mean_dice 0.8047 >= 0.8 (eval/metrics.json)"}
    assert passed["results"]["exported"]  # the export ran

    blocked = k8s.wait_phase(ns, "gate-block", "Succeeded", "Failed")
    assert [s["phase"] for s in blocked["steps"]] == ["Succeeded", "Succeeded", "Skipped", "Skipped"]
    infer, push = blocked["steps"][2:]
    assert infer["reason"] == push["reason"] == "GateNotMet"
    assert infer["message"] == "skipped by its gate: val_mean_dice 0.8047 < 0.9 (eval/metrics.json)"
    assert push["message"] == "not run: step infer was skipped by its gate" and "result" not in push
    assert condition(blocked, "Succeeded")["reason"] == "GateNotMet"
    assert "predictions" not in blocked["results"] and blocked["results"]["gate"]["passed"] is False
    assert sorted(j.metadata.name for j in k8s.jobs(ns, "gate-block")) == sorted(k8s.child(ns, "gate-block", s) for s in ("train", "validate", "infer"))
    line = kubectl("get", "mmarjob", "gate-block", "-n", ns, "-o", "wide").stdout.splitlines()[1]
    assert "val_mean_dice 0.8047 < 0.9 (eval/metrics.json)" in line


@pytest.mark.parametrize("argv", [
    ["mmar", "pull", "--url", "http://pacs/dicom-web", "--dicom-dir", "/data/dicom", "--output", "/data/images", "--datalist", "/data/d.json"],
    ["mmar", "push", "/workspace/m", "--url", "http://pacs/dicom-web"],
    ["mmar", "infer", "/workspace/m", "--dicom-seg"],
    ["mmar", "--gate", "val_mean_dice>=0.99", "export", "/workspace/m"],
    ["mmar", "--gate", "val_mean_dice>=0.5", "infer", "/workspace/m"],
    ["mmar", "convert", "-d", "/data/raw", "-o", "/data/nifti"],
    ["mmar", "train", "/workspace/m", "--set", "DATASET_JSON=/data/d.json", "epochs=4", "--file_root", "/data"],
    ["torchrun", "--nnodes=2", "--nproc_per_node=4", "-m", "mmar", "train", "/workspace/m", "--finetune", "--set", "epochs=2"],
    ["mmar", "validate", "/workspace/m", "--set", "DATASET_JSON=/data/d.json"],
    ["mmar", "infer", "/workspace/m"],
    ["mmar", "export", "/workspace/m", "--formats", "torchscript,onnx,tensorrt", "--precision", "fp16"],
])
def test_the_stand_ins_results_pass_the_runtimes_own_check(argv):
    """No cluster needed: each result the kubelet stand-in reports is one `mmar.results.check` accepts
    (report.write_result runs it), so the stand-in cannot drift from the runtime's contract unnoticed."""
    from mmar import results

    result = realistic_result(argv, "segmentation", processes=8 if argv[0] == "torchrun" else None)
    message = termination_message(result)
    assert json.loads(message) == results.check(result).to_dict() == results.decode(message)


def _events(core, namespace: str, name: str) -> list[Any]:
    return core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items


def test_a_step_job_the_server_refuses_is_shown_on_the_mmarjob(ns, kubelet, k8s, core):
    """422 (a Job the Job API finds invalid, though the CRD and mmar.job let it through): the step and the
    MMARJob fail with reason JobCreateFailed in the server's words, a Warning Event, no retry. 403 (a quota of
    no Jobs): Pending with the quota's words, retried with back-off, created once the quota goes."""
    # tolerationSeconds needs effect NoExecute: a rule of the pod spec the MMARJob schema does not repeat
    toleration = {"key": "k", "operator": "Equal", "value": "v", "effect": "NoSchedule", "tolerationSeconds": 60}
    k8s.create(ns, manifest("refused-invalid", [{"type": "train"}, {"type": "export"}], tolerations=[toleration]))
    status = k8s.wait_phase(ns, "refused-invalid", "Failed")
    step = status["steps"][0]
    assert (step["phase"], step["reason"]) == ("Failed", "JobCreateFailed"), step
    assert f"refused to create Job {ns}/{k8s.child(ns, 'refused-invalid', 'train')} (422)" in step["message"] and "tolerationSeconds" in step["message"]
    assert condition(status, "Failed")["reason"] == "JobCreateFailed" and "tolerationSeconds" in condition(status, "Failed")["message"]
    warned = k8s.wait(lambda: [e for e in _events(core, ns, "refused-invalid") if e.reason == "JobCreateFailed"], "a JobCreateFailed Event")
    assert warned[0].type == "Warning" and "tolerationSeconds" in warned[0].message
    assert k8s.jobs(ns, "refused-invalid") == []

    core.create_namespaced_resource_quota(ns, {"metadata": {"name": "no-jobs"}, "spec": {"hard": {"count/jobs.batch": "0"}}})
    try:
        k8s.wait(lambda: (core.read_namespaced_resource_quota("no-jobs", ns).status.hard or {}).get("count/jobs.batch"), "the quota's status")
        k8s.create(ns, manifest("refused-quota", [{"type": "train"}]))
        status = k8s.wait_step(ns, "refused-quota", 0, "Pending", "JobCreateFailed")
        assert status["phase"] == "Pending" and "exceeded quota" in status["steps"][0]["message"], status
        assert "exceeded quota" in status["message"] and condition(status, "Running")["reason"] == "JobCreateFailed"
        k8s.wait(lambda: [e for e in _events(core, ns, "refused-quota") if e.reason == "JobCreateFailed" and e.type == "Warning"], "a JobCreateFailed Event")
        time.sleep(3 * RESYNC_SECONDS)  # retried meanwhile: still one Event, one line per try, no traceback
        assert len([e for e in _events(core, ns, "refused-quota") if e.reason == "JobCreateFailed"]) == 1
        log = k8s.operator.log_text()
        assert f"MMARJob {ns}/refused-quota: step train: cannot create Job" in log
        assert f"reconcile of {ns}/refused-quota failed" not in log
    finally:
        core.delete_namespaced_resource_quota("no-jobs", ns)
    status = k8s.wait_phase(ns, "refused-quota", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded" and [j.metadata.name for j in k8s.jobs(ns, "refused-quota")] == [k8s.child(ns, "refused-quota", "train")]


def test_an_edit_of_a_running_step_is_reported_on_the_mmarjob(ns, kubelet, k8s, core, custom):
    """set.epochs 30 -> 5 while train runs: the Job keeps 30, and the MMARJob says so (condition
    SpecChangeIgnored naming the step, a Warning Event); an edit of a step not started yet applies."""
    held = kubelet.script(step_of("edited", "train"), Outcome.running())
    k8s.create(ns, manifest("edited", [{"type": "train", "set": {"epochs": 30}}, {"type": "validate", "set": {"epochs": 30}}]))
    train = k8s.child(ns, "edited", "train")
    k8s.wait(lambda: k8s.pod_running(ns, train), "train's pod to run", ns, "edited")
    # a merge patch (a list is replaced whole): both steps' epochs 30 -> 5
    custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "edited", {"spec": {"steps": [
        {"type": "train", "set": {"epochs": 5}}, {"type": "validate", "set": {"epochs": 5}}]}})

    def reported():
        status = k8s.status(ns, "edited")
        found = [c for c in status.get("conditions") or [] if c["type"] == "SpecChangeIgnored" and c["status"] == "True"]
        return status if found and status.get("observedGeneration") == 2 else None

    status = k8s.wait(reported, "condition SpecChangeIgnored", ns, "edited")
    ignored = condition(status, "SpecChangeIgnored")
    assert ignored["reason"] == "StepAlreadyStarted" and f"train (Job {train})" in ignored["message"], ignored
    assert "validate" not in ignored["message"]
    args = k8s.batch.read_namespaced_job(train, ns).spec.template.spec.containers[0].args
    assert "epochs=30" in args and "epochs=5" not in args, args
    warned = k8s.wait(lambda: [e for e in _events(core, ns, "edited") if e.reason == "SpecChangeIgnored"], "a SpecChangeIgnored Event")
    assert warned[0].type == "Warning" and "edits apply only to steps not yet started" in warned[0].message
    kubelet.release(held)
    status = k8s.wait_phase(ns, "edited", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded"
    args = k8s.batch.read_namespaced_job(k8s.child(ns, "edited", "validate"), ns).spec.template.spec.containers[0].args
    assert "epochs=5" in args, args  # the step not started yet ran with the edit
