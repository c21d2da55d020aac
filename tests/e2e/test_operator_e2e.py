"""End to end against a real cluster (kind, minikube, a dev cluster): runs only when KUBECONFIG is set.

Installs the CRD, checks the API server's own validation (schema + CEL), runs the operator in a
subprocess against a fresh namespace, applies an MMARJob and watches Jobs appear and the status move.

    kind create cluster --name mmar
    export KUBECONFIG="$(kind get kubeconfig-path --name mmar 2>/dev/null || echo ~/.kube/config)"
    # optional, to run a step to success: build the runtime image and load it into the cluster
    docker build --target runtime -t mmar:e2e . && kind load docker-image mmar:e2e --name mmar
    MMAR_E2E_IMAGE=mmar:e2e pytest -m e2e tests/e2e -v

Without MMAR_E2E_IMAGE the steps run in a stand-in image without `mmar`, so the first step fails:
the test then checks that the failure reaches the MMARJob's status with a readable message.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="needs a Kubernetes cluster: set KUBECONFIG"),
]

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "mmar.dev", "v1alpha1", "mmarjobs"
IMAGE = os.environ.get("MMAR_E2E_IMAGE")
STAND_IN = "busybox:1.36"  # any small image without `mmar`: the container fails to start its command
TIMEOUT = float(os.environ.get("MMAR_E2E_TIMEOUT", "600"))


@pytest.fixture(scope="module")
def api():
    from kubernetes import client, config

    config.load_kube_config()
    return client


@pytest.fixture(scope="module")
def crd(api):
    body = yaml.safe_load((ROOT / "crds" / "mmar.dev_mmarjobs.yaml").read_text())
    ext = api.ApiextensionsV1Api()
    try:
        ext.create_custom_resource_definition(body)
    except api.ApiException as error:
        if error.status != 409:
            raise
        live = ext.read_custom_resource_definition(body["metadata"]["name"])
        body["metadata"]["resourceVersion"] = live.metadata.resource_version
        ext.replace_custom_resource_definition(body["metadata"]["name"], body)
    wait_for(lambda: any(c.type == "Established" and c.status == "True"
                         for c in ext.read_custom_resource_definition("mmarjobs.mmar.dev").status.conditions or []), 60, "CRD established")
    return body


@pytest.fixture(scope="module")
def namespace(api, crd):
    name = f"mmar-e2e-{uuid.uuid4().hex[:6]}"
    core = api.CoreV1Api()
    core.create_namespace({"metadata": {"name": name}})
    for claim in ("e2e-workspace", "e2e-data"):
        core.create_namespaced_persistent_volume_claim(name, {
            "metadata": {"name": claim},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="module")
def operator(namespace):
    env = {**os.environ, "MMAR_OPERATOR_DEFAULT_IMAGE": IMAGE or STAND_IN, "MMAR_OPERATOR_METRICS_PORT": "18000",
           "MMAR_OPERATOR_LIVENESS_PORT": "18080", "MMAR_OPERATOR_RESYNC_SECONDS": "5"}
    proc = subprocess.Popen([sys.executable, "-m", "mmar_operator", "--namespace", namespace], env=env)
    wait_for(lambda: _healthy(), 60, "operator liveness endpoint")
    yield proc
    proc.terminate()
    proc.wait(timeout=30)


def _healthy() -> bool:
    import urllib.request

    try:
        return urllib.request.urlopen("http://127.0.0.1:18080/healthz", timeout=2).status == 200
    except OSError:
        return False


def wait_for(predicate, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    pytest.fail(f"timed out after {seconds}s waiting for {what}")


def prepare_data(api, namespace):
    """The data claim starts empty: write the synthetic dataset into it with the runtime image."""
    batch = api.BatchV1Api()
    batch.create_namespaced_job(namespace, {
        "metadata": {"name": "demo-data"},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "demo-data", "image": IMAGE, "command": ["mmar", "demo-data", "/data", "--task", "segmentation", "--cases", "6"],
                            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "e2e-data"}}]}}}})
    wait_for(lambda: (batch.read_namespaced_job("demo-data", namespace).status.succeeded or 0) > 0, TIMEOUT, "the demo data")


def mmarjob(name, steps):
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "MMARJob", "metadata": {"name": name},
        "spec": {"task": "segmentation", "gpusPerNode": 0, "shmSize": "256Mi",
                 "mmar": {"claimName": "e2e-workspace", "path": "demo"}, "data": {"claimName": "e2e-data"},
                 "steps": steps},
    }


def test_api_server_enforces_the_cel_rules(api, namespace):
    custom = api.CustomObjectsApi()
    with pytest.raises(api.ApiException) as info:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mmarjob("bad", [{"type": "infer", "nodes": 2}]))
    assert info.value.status == 422 and "only train and finetune steps may run on several nodes" in info.value.body


def test_jobs_are_created_and_status_moves(api, namespace, operator):
    custom, batch = api.CustomObjectsApi(), api.BatchV1Api()
    steps = [{"type": "train", "set": {"epochs": 1}}, {"type": "export", "formats": ["torchscript"]}]
    if IMAGE:
        prepare_data(api, namespace)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mmarjob("demo", steps))

    wait_for(lambda: batch.list_namespaced_job(namespace, label_selector="mmar.dev/mmarjob=demo").items, 60, "the first step's Job")
    jobs = batch.list_namespaced_job(namespace, label_selector="mmar.dev/mmarjob=demo").items
    assert [j.metadata.name for j in jobs] == ["demo-0-train"]
    assert jobs[0].metadata.owner_references[0].kind == "MMARJob"

    def status():
        return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "demo").get("status") or {}

    wait_for(lambda: status().get("phase") in ("Pending", "Running", "Succeeded", "Failed"), 60, "a status")
    if IMAGE:
        wait_for(lambda: status().get("phase") in ("Succeeded", "Failed"), TIMEOUT, "the job to finish")
        final = status()
        assert final["phase"] == "Succeeded", final
        assert final["results"].get("epochs") == 1 and final["results"].get("exported")
    else:
        wait_for(lambda: status().get("phase") == "Failed", TIMEOUT, "the stand-in image's failure to reach the status")
        final = status()
        assert final["steps"][0]["phase"] == "Failed" and final["steps"][1]["phase"] == "Waiting"
        assert any(c["type"] == "Failed" and c["status"] == "True" for c in final["conditions"])

    # deleting the MMARJob garbage-collects its Jobs
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "demo", propagation_policy="Foreground")
    wait_for(lambda: not batch.list_namespaced_job(namespace, label_selector="mmar.dev/mmarjob=demo").items, 120, "Jobs to be collected")
