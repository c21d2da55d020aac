"""Fixtures for the real-pods tier (`make test-cluster`, marker `cluster`): MMARJobs run by the operator
installed with the Helm chart as a pod, their steps in real containers from the project's images, on a
real node (tests/cluster/with-node.sh starts one: ../shared/k8s control-plane + node) or on KUBECONFIG's
cluster.

Without a cluster the tests skip, naming why (MMAR_CLUSTER_UNAVAILABLE, from with-node.sh); under
MMAR_CLUSTER_REQUIRED=1 (CI) that is a failure: CI must not go green by skipping what it exists to check.

Storage is what a one-node user has: hostPath PersistentVolumes, bound to the examples' claims
(demo-data, demo-workspace) by claimRef, in folders owned by uid/gid 1000 (the runtime's user: fsGroup
does not apply to hostPath). On the local node those folders are on this machine
(MMAR_CLUSTER_PV_ROOT); on another cluster that folder must be the same path on its node (kind:
extraMounts), see docs/deploy.md, "One machine, real pods".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "mmar-operator"
GROUP, VERSION, PLURAL = "mmar.dev", "v1alpha1", "mmarjobs"
RUNTIME_UID = 1000
RELEASE, OPERATOR_NS = "mmar", "mmar-system"
# Small requests, so that every step (and both pods of a 2-node step) fits a 2-core node beside the
# operator; the memory limits leave the demo's steps room (the chart's defaults are sized for real data).
STEP_RESOURCES = {
    kind: {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "4Gi"}}
    for kind in ("pull", "convert", "train", "finetune", "validate", "infer", "export", "push")
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/cluster/" in str(item.fspath):
            item.add_marker(pytest.mark.cluster)


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


class Ended(AssertionError):
    """What is waited for can no longer happen (an MMARJob ended in another phase): fail now."""


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, diagnose: Callable[[], str] = lambda: "",
             interval: float = 1.0) -> Any:
    """Poll until `predicate()` is truthy and return it; else fail naming `what` (and `diagnose()`)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Ended:
            raise
        except Exception as error:  # noqa: BLE001 - kept for the failure message
            last = error
        time.sleep(interval)
    detail = diagnose()
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last!r})" if last else "")
                         + (f"\n{detail}" if detail else ""))


def split_image(image: str) -> tuple[str, str]:
    repository, _, tag = image.rpartition(":")
    if not repository or "/" in tag:
        return image, "latest"
    return repository, tag


@pytest.fixture(scope="session")
def kubeconfig() -> str:
    reason = os.environ.get("MMAR_CLUSTER_UNAVAILABLE")
    path = os.environ.get("KUBECONFIG")
    if reason or not path:
        message = f"needs a cluster with a real node: {reason or 'set KUBECONFIG, or run `make test-cluster` (starts one)'}"
        if os.environ.get("MMAR_CLUSTER_REQUIRED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def images(kubeconfig) -> dict[str, str]:
    version = next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines() if line.startswith("version = "))
    return {"runtime": os.environ.get("MMAR_RUNTIME_IMAGE") or f"localhost/mmar:{version}",
            "operator": os.environ.get("MMAR_OPERATOR_IMAGE") or f"localhost/mmar-operator:{version}"}


def _tool(name: str) -> str:
    found = shutil.which(name, path=f"{ROOT / '.tools' / 'bin'}:{os.environ.get('PATH', '')}")
    if not found:
        pytest.fail(f"{name} not found: run `bash .ci/tools.sh` (installs it into .tools/bin)")
    return found


class Kube:
    """kubectl and helm against the cluster, and what the tests read from it."""

    def __init__(self, kubeconfig: str):
        self.env = {**os.environ, "KUBECONFIG": kubeconfig}
        self.kubectl_bin, self.helm_bin = _tool("kubectl"), _tool("helm")

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run([self.kubectl_bin, *args], input=input, capture_output=True, text=True, timeout=timeout, env=self.env, cwd=ROOT)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([self.helm_bin, *args], capture_output=True, text=True, timeout=timeout, env=self.env, cwd=ROOT)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def get(self, kind: str, name: str | None = None, namespace: str | None = None, selector: str | None = None) -> Any:
        args = ["get", kind, *([name] if name else []), "-o", "json"]
        if namespace:
            args += ["-n", namespace]
        if selector:
            args += ["-l", selector]
        result = self.kubectl(*args, check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}")
        data = json.loads(result.stdout)
        return data.get("items", []) if name is None else data

    def apply(self, obj: dict[str, Any] | list[dict[str, Any]]) -> None:
        docs = obj if isinstance(obj, list) else [obj]
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))

    def mmarjob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("mmarjobs.mmar.dev", name, namespace)

    def describe(self, namespace: str, name: str) -> str:
        """What a failure message shows: the MMARJob's status, its Jobs and pods, the operator's log tail."""
        parts = []
        job = self.mmarjob(namespace, name)
        parts.append("MMARJob status: " + json.dumps((job or {}).get("status"), indent=1)[:4000])
        parts.append(self.kubectl("get", "jobs,pods", "-n", namespace, "-o", "wide", check=False).stdout)
        parts.append(self.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False).stdout[-3000:])
        parts.append("operator log:\n" + self.kubectl("logs", "-n", OPERATOR_NS, f"deploy/{RELEASE}-mmar-operator", "--tail=40", check=False).stdout)
        return "\n".join(parts)

    def wait_phase(self, namespace: str, name: str, phases: tuple[str, ...], timeout: float) -> dict[str, Any]:
        def reached():
            job = self.mmarjob(namespace, name)
            phase = ((job or {}).get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed") and phase not in phases:
                raise Ended(f"MMARJob {namespace}/{name} ended {phase}, not {phases}:\n{self.describe(namespace, name)}")
            return job if phase in phases else None
        return wait_for(reached, timeout, f"MMARJob {namespace}/{name} phase in {phases}", lambda: self.describe(namespace, name), interval=2)

    def pods_of_job(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        return self.get("pods", namespace=namespace, selector=f"batch.kubernetes.io/job-name={job_name}")


@pytest.fixture(scope="session")
def kube(kubeconfig) -> Kube:
    return Kube(kubeconfig)


@pytest.fixture(scope="session")
def operator(kube, images) -> Iterator[dict[str, Any]]:
    """The operator as a user installs it: `helm install` of the chart (CRD, ServiceAccount, RBAC,
    Deployment), its image and the runtime image as loaded on the node (pullPolicy IfNotPresent), Ready
    through its own probes. A short resync, so that pod states (which make no Job event) show in seconds."""
    repository, tag = split_image(images["operator"])
    runtime_repository, runtime_tag = split_image(images["runtime"])
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
        "runtime": {"image": {"repository": runtime_repository, "tag": runtime_tag}, "stepResources": STEP_RESOURCES},
        "operator": {"resyncSeconds": 5},
    }
    values_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"mmar-cluster-values-{uuid.uuid4().hex[:6]}.yaml"
    values_file.write_text(yaml.safe_dump(values))
    kube.helm("uninstall", RELEASE, "-n", OPERATOR_NS, "--wait", check=False)
    start = time.monotonic()
    kube.helm("install", RELEASE, str(CHART), "-n", OPERATOR_NS, "--create-namespace", "-f", str(values_file),
              "--wait", "--timeout", "240s")
    values_file.unlink()
    pods = kube.get("pods", namespace=OPERATOR_NS, selector="app.kubernetes.io/name=mmar-operator")
    assert len(pods) == 1, pods
    log(f"operator installed and Ready in {time.monotonic() - start:.0f} s: pod {pods[0]['metadata']['name']}")
    # its metrics answer on the pod (through the API server's proxy to the pod's port)
    port = yaml.safe_load((CHART / "values.yaml").read_text())["metrics"]["port"]
    scrape = kube.kubectl("get", "--raw", f"/api/v1/namespaces/{OPERATOR_NS}/pods/{pods[0]['metadata']['name']}:{port}/proxy/metrics").stdout
    assert "mmar_operator_reconcile_errors_total" in scrape, scrape[:1000]
    yield {"namespace": OPERATOR_NS, "deployment": f"{RELEASE}-mmar-operator", "values": values}
    kube.helm("uninstall", RELEASE, "-n", OPERATOR_NS, "--wait", check=False)
    kube.kubectl("delete", "namespace", OPERATOR_NS, "--wait=false", check=False)


def operator_pod(kube: Kube) -> dict[str, Any] | None:
    pods = [p for p in kube.get("pods", namespace=OPERATOR_NS, selector="app.kubernetes.io/name=mmar-operator")
            if not p["metadata"].get("deletionTimestamp")]
    ready = [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])]
    return ready[0] if len(ready) == 1 else None


class Storage:
    """hostPath PersistentVolumes bound (claimRef) to claims of one namespace; folders owned by uid 1000."""

    def __init__(self, kube: Kube, namespace: str, root: Path):
        self.kube, self.namespace, self.root = kube, namespace, root
        self.volumes: list[str] = []

    def claim(self, name: str, size: str = "5Gi") -> Path:
        folder = self.root / self.namespace / name
        folder.mkdir(parents=True, exist_ok=True)
        os.chown(folder, RUNTIME_UID, RUNTIME_UID)
        pv = f"{self.namespace}-{name}"
        self.kube.apply([
            {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv, "labels": {"mmar.dev/test": self.namespace}},
             "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"], "persistentVolumeReclaimPolicy": "Retain",
                      "storageClassName": "", "hostPath": {"path": str(folder), "type": "Directory"},
                      "claimRef": {"namespace": self.namespace, "name": name}}},
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": self.namespace},
             "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": pv,
                      "resources": {"requests": {"storage": size}}}},
        ])
        self.volumes.append(pv)
        wait_for(lambda: (self.kube.get("pvc", name, self.namespace) or {}).get("status", {}).get("phase") == "Bound", 60,
                 f"PVC {self.namespace}/{name} Bound")
        return folder

    def cleanup(self) -> None:
        for pv in self.volumes:
            self.kube.kubectl("delete", "pv", pv, "--wait=false", check=False)
        shutil.rmtree(self.root / self.namespace, ignore_errors=True)


@pytest.fixture(scope="session")
def space(kube, operator) -> Iterator[dict[str, Any]]:
    """One namespace with the demo's two claims, and the demo's data generated into demo-data (raw volumes
    with thick slices, as `make demo` makes them), owned by uid 1000."""
    if os.environ.get("MMAR_CLUSTER_LOCAL_NODE") != "1" and not os.environ.get("MMAR_CLUSTER_PV_ROOT"):
        pytest.fail("on KUBECONFIG's cluster set MMAR_CLUSTER_PV_ROOT: a folder of this machine that is the same path on "
                    "the cluster's node (kind: extraMounts), for the hostPath PersistentVolumes")
    root = Path(os.environ.get("MMAR_CLUSTER_PV_ROOT") or "/var/tmp/mmar-cluster-pv")
    namespace = f"mmar-real-{uuid.uuid4().hex[:5]}"
    kube.kubectl("create", "namespace", namespace)
    storage = Storage(kube, namespace, root)
    data = storage.claim("demo-data")
    workspace = storage.claim("demo-workspace")
    mmar = ROOT / ".venv" / "bin" / "mmar"
    subprocess.run([str(mmar), "demo-data", str(data), "--task", "segmentation", "--cases", os.environ.get("MMAR_CLUSTER_CASES", "8"),
                    "--size", "32", "--raw"], check=True, capture_output=True, text=True, timeout=300)
    for path in [data, *data.rglob("*")]:
        os.chown(path, RUNTIME_UID, RUNTIME_UID)
    yield {"namespace": namespace, "data": data, "workspace": workspace}
    kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    storage.cleanup()
