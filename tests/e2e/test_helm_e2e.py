"""The Helm chart on a real API server: `helm install` (CRD included) in both modes, every rendered object
accepted by the server, and the operator run with exactly the chart's RBAC (its ServiceAccount's token).

What cannot run here is the operator's Deployment itself (no kubelet, no images): the operator runs as a
local process (tests/e2e/operator_process.py) with the chart's ServiceAccount token instead of the admin
credentials, and the kubelet stand-in (tests/e2e/kubelet.py) runs the step pods. So what is tested is that
the chart's objects are what the server accepts and that its RBAC is sufficient (no 403 while a job runs
to Succeeded, namespaced and cluster-wide) and minimal (the server's own view of what the token may do).

    PORT_BASE=27443 tests/e2e/with-cluster.sh .venv/bin/python -m pytest -q tests/e2e/test_helm_e2e.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from _tools import require_tool
from e2e.kubelet import Kubelet, Outcome
from e2e.operator_process import OperatorProcess
from mmar_operator.render import child_name

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "mmar-operator"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor"}  # prometheus-operator's CRDs: not in a bare cluster
RUN_TIMEOUT = 90
GROUP, VERSION, PLURAL = "mmar.dev", "v1alpha1", "mmarjobs"
CRD_NAME = f"{PLURAL}.{GROUP}"

# What the operator may do in a namespace it runs MMARJobs in (the namespaced ClusterRole), and cluster-wide
# (the "-cluster" ClusterRole). Checked against the server's own evaluation of the token (SelfSubjectRulesReview).
NAMESPACED_GRANTS = {
    ("mmar.dev", "mmarjobs"): {"get", "list", "watch", "patch"},
    ("mmar.dev", "mmarjobs/status"): {"patch"},
    ("mmar.dev", "mmarjobs/finalizers"): {"update"},
    # no delete: nothing is adopted, and creating a child with its ownerReferences needs no delete
    # (OwnerReferencesPermissionEnforcement asks it only of a client changing an existing object's)
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch"},
    ("", "services"): {"get", "create"},
    ("", "pods"): {"list"},
    ("", "events"): {"create"},
}
CLUSTER_GRANTS = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
# kopf lists and watches namespaces only to follow a list of them (refused without: 403 at start-up)
NAMESPACES_GRANT = {("", "namespaces"): {"list", "watch"}}


@pytest.fixture(scope="module")
def helm(kubeconfig) -> Callable[..., subprocess.CompletedProcess]:
    binary = require_tool("helm")

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                                env={**os.environ, "KUBECONFIG": kubeconfig})
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    return run


def wait_for(predicate: Callable[[], object], timeout: float, what: str, diagnose: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{diagnose()}".rstrip())


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def release_name() -> str:
    return f"mmar-{uuid.uuid4().hex[:6]}"


def values_args(watch: list[str]) -> list[str]:
    return ["--set-json", f"operator.watchNamespaces={json.dumps(watch)}"]


def flow_schema_condition(kubectl, name: str, kind: str) -> str | None:
    live = json.loads(kubectl("get", "flowschema", name, "-o", "json").stdout)
    return next((c["status"] for c in (live.get("status") or {}).get("conditions") or [] if c["type"] == kind), None)


def dispatched(kubectl, flow_schema: str, priority_level: str) -> float:
    """Requests API Priority and Fairness dispatched through `flow_schema` at `priority_level` (the API
    server's own counter, apiserver_flowcontrol_dispatched_requests_total)."""
    total = 0.0
    for line in kubectl("get", "--raw", "/metrics").stdout.splitlines():
        if line.startswith("apiserver_flowcontrol_dispatched_requests_total{") \
                and f'flow_schema="{flow_schema}"' in line and f'priority_level="{priority_level}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# --------------------------------------------------------------------------------------- the objects


def test_all_features_objects_accepted_by_the_server(helm, kubectl, make_namespace):
    """Every object the chart renders with every feature on, sent to the server (dry run, strict fields)."""
    release_ns, watched, monitoring = make_namespace("mmar-sys"), make_namespace("watch"), make_namespace("monitoring")
    rendered = helm("template", release_name(), str(CHART), "-n", release_ns, "-f", str(ALL_FEATURES),
                    *values_args([watched]), "--set", f"metrics.dashboard.namespace={monitoring}").stdout
    objects = [o for o in documents(rendered) if o["kind"] not in MONITORING_KINDS]
    assert {o["kind"] for o in objects} >= {"Deployment", "ServiceAccount", "ClusterRole", "RoleBinding", "Service", "ConfigMap"}
    # no -n: each namespaced object names its namespace (so `helm template | kubectl apply` puts it right)
    result = kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=yaml.safe_dump_all(objects))
    assert result.stdout.count("(server dry run)") == len(objects), result.stdout


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_helm_install(helm, kubectl, api, crd, make_namespace, mode):
    release, release_ns = release_name(), make_namespace("mmar-sys")
    watch = [make_namespace("radiology"), make_namespace("research")] if mode == "namespaced" else []
    helm("install", release, str(CHART), "-n", release_ns, *values_args(watch))
    try:
        status = json.loads(helm("status", release, "-n", release_ns, "-o", "json").stdout)
        assert status["info"]["status"] == "deployed"
        notes = status["info"]["notes"]  # what `helm status` prints: which namespaces run MMARJobs
        if mode == "namespaced":
            assert f"namespaces {', '.join(watch)}" in notes and "its status stays blank" in notes, notes
        else:
            assert "every namespace" in notes and "stays blank" not in notes, notes
        assert "kubectl apply --server-side -f examples/" in notes and "-o wide" in notes, notes
        manifest = documents(helm("get", "manifest", release, "-n", release_ns).stdout)
        for obj in manifest:  # each one is there, as the chart rendered it
            namespace = obj["metadata"].get("namespace")
            args = ["get", obj["kind"], obj["metadata"]["name"], "-o", "json"] + (["-n", namespace] if namespace else [])
            live = json.loads(kubectl(*args).stdout)
            assert live["metadata"]["labels"]["app.kubernetes.io/instance"] == release
        kinds = sorted(o["kind"] for o in manifest)
        if mode == "namespaced":
            assert kinds.count("RoleBinding") == 2 and kinds.count("ClusterRoleBinding") == 1
            assert sorted(o["metadata"]["namespace"] for o in manifest if o["kind"] == "RoleBinding") == sorted(watch)
        else:
            assert "RoleBinding" not in kinds and kinds.count("ClusterRoleBinding") == 2
        # API Priority and Fairness: the server accepted the FlowSchema and found its priority level
        # (Dangling=False: workload-high, a built-in PriorityLevelConfiguration, exists)
        (flow_schema,) = [o for o in manifest if o["kind"] == "FlowSchema"]
        assert flow_schema["spec"]["priorityLevelConfiguration"]["name"] == "workload-high"
        name = flow_schema["metadata"]["name"]
        wait_for(lambda: flow_schema_condition(kubectl, name, "Dangling") == "False", 30, f"FlowSchema {name} Dangling=False",
                 diagnose=lambda: kubectl("get", "flowschema", name, "-o", "yaml").stdout)
    finally:
        helm("uninstall", release, "-n", release_ns, "--wait", "--timeout", "60s")
    for kind in ("clusterroles", "flowschemas"):
        assert not kubectl("get", kind, "-l", f"app.kubernetes.io/instance={release}", "-o", "name").stdout.strip()


def test_helm_install_brings_the_crd(helm, kubectl, api, crd, make_namespace):
    """On a cluster without the CRD, `helm install` installs the chart's copy and the server establishes it."""
    ext = api.ApiextensionsV1Api()
    # deleting the CRD deletes every MMARJob: only where there are none (a fresh control plane), never
    # under somebody's jobs on a shared cluster (namespaces being deleted lose theirs anyway)
    terminating = {ns.metadata.name for ns in api.CoreV1Api().list_namespace().items if ns.status.phase == "Terminating"}
    in_use = [f"{o['metadata']['namespace']}/{o['metadata']['name']}"
              for o in api.CustomObjectsApi().list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
              if o["metadata"]["namespace"] not in terminating]
    if in_use:
        pytest.skip(f"the cluster holds MMARJobs ({', '.join(in_use[:3])}): not deleting the CRD under them")
    kubectl("delete", "crd", CRD_NAME, "--wait=true", "--timeout=60s")
    release, release_ns = release_name(), make_namespace("mmar-sys")
    try:
        helm("install", release, str(CHART), "-n", release_ns)
        wait_for(lambda: any(c.type == "Established" and c.status == "True"
                             for c in ext.read_custom_resource_definition(CRD_NAME).status.conditions or []), 60, "the chart's CRD Established")
        live = ext.read_custom_resource_definition(CRD_NAME)
        assert "helm" in {field.manager for field in live.metadata.managed_fields}
        names = [c.type for c in live.status.conditions if c.status == "True"]
        assert "NamesAccepted" in names and "NonStructuralSchema" not in names
    finally:
        helm("uninstall", release, "-n", release_ns, "--wait", "--timeout", "60s", check=False)
        # back to the CRD as the session's `crd` fixture applied it (helm leaves CRDs in place)
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds" / "mmar.dev_mmarjobs.yaml"))
        wait_for(lambda: any(c.type == "Established" and c.status == "True"
                             for c in ext.read_custom_resource_definition(CRD_NAME).status.conditions or []), 60, "the CRD Established again")


# ------------------------------------------------------------------------ the operator with the chart's RBAC


def token_kubeconfig(kubectl, kubeconfig: str, service_account: str, namespace: str, path: Path) -> Path:
    """A kubeconfig for the API server of `kubeconfig`, authenticated as the ServiceAccount (TokenRequest)."""
    token = kubectl("create", "token", service_account, "-n", namespace, "--duration", "1h").stdout.strip()
    admin = json.loads(kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
    cluster = admin["clusters"][0]["cluster"]
    user = f"system:serviceaccount:{namespace}:{service_account}"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "chart-rbac",
        "clusters": [{"name": "cluster", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "chart-rbac", "context": {"cluster": "cluster", "user": user}}],
    }))
    path.chmod(0o600)
    return path


def granted(kubectl, as_kubeconfig: Path, namespace: str, resources: set[tuple[str, str]]) -> dict[tuple[str, str], set[str]]:
    """What the server says the token may do in `namespace` (SelfSubjectRulesReview), for `resources`."""
    review = json.loads(kubectl("create", "-o", "json", "-f", "-", "--kubeconfig", str(as_kubeconfig), input=json.dumps({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview", "spec": {"namespace": namespace}})).stdout)
    verbs: dict[tuple[str, str], set[str]] = {}
    for rule in review["status"]["resourceRules"]:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                if (group, resource) in resources or "*" in (group, resource):
                    verbs.setdefault((group, resource), set()).update(rule["verbs"])
    return verbs


def mmarjob(name: str, *steps: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "MMARJob", "metadata": {"name": name},
        "spec": {"task": "segmentation", "gpusPerNode": 0, "mmar": {"claimName": "ws"}, "data": {"claimName": "data"},
                 "steps": list(steps)},
    }


def denied(log: str) -> list[str]:
    """Log lines of refused requests: every 403 from the API server says Forbidden (the client's
    ForbiddenException, kopf's APIForbiddenError, the Status message `... is forbidden: User ...`).
    Not a bare "403": a timestamp's milliseconds or a response size can read 403."""
    return [line for line in log.splitlines() if "forbidden" in line.lower()]


def step_job(name: str) -> dict[str, Any]:
    """A Job as a user might have left one under a step's name (no owner): the operator leaves it alone."""
    return {"metadata": {"name": name}, "spec": {"backoffLimit": 0, "template": {"spec": {
        "restartPolicy": "Never", "containers": [{"name": "mmar", "image": "ghcr.io/mmar-dev/mmar:e2e", "args": ["mmar", "train", "/workspace/mmar"]}]}}}}


def headless_service(name: str, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": owner["kind"], "name": owner["metadata"]["name"],
                                    "uid": owner["metadata"]["uid"], "controller": True}]
    return {"metadata": meta, "spec": {"clusterIP": "None", "selector": {"job-name": name}, "ports": [{"name": "rdzv", "port": 29500}]}}


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_operator_runs_with_exactly_the_charts_rbac(helm, kubectl, kubeconfig, api, crd, make_namespace, tmp_path, mode):
    """Every kind of call the operator makes, under the chart's ServiceAccount: create, find after a 409 (get)
    and suspend (patch) Jobs and Services, read pods, patch MMARJobs and their status, post Events; 0 refused."""
    release, release_ns = release_name(), make_namespace("mmar-sys")
    radiology, research = make_namespace("radiology"), make_namespace("research")
    outside = make_namespace("elsewhere")  # not watched in namespaced mode: no grants there
    watch = [radiology, research] if mode == "namespaced" else []
    helm("install", release, str(CHART), "-n", release_ns, *values_args(watch))
    try:
        manifest = documents(helm("get", "manifest", release, "-n", release_ns).stdout)
        (service_account,) = [o["metadata"]["name"] for o in manifest if o["kind"] == "ServiceAccount"]
        (flow_schema,) = [o["metadata"]["name"] for o in manifest if o["kind"] == "FlowSchema"]
        as_operator = token_kubeconfig(kubectl, kubeconfig, service_account, release_ns, tmp_path / "operator.kubeconfig")

        # the server's view of the token: exactly the chart's grants, where the chart grants them
        wanted = set(NAMESPACED_GRANTS) | set(CLUSTER_GRANTS) | set(NAMESPACES_GRANT)
        cluster = {**CLUSTER_GRANTS, **(NAMESPACES_GRANT if mode == "namespaced" else {})}
        for namespace in (radiology, research):
            assert granted(kubectl, as_operator, namespace, wanted) == {**NAMESPACED_GRANTS, **cluster}
        assert granted(kubectl, as_operator, outside, wanted) == (cluster if mode == "namespaced" else {**NAMESPACED_GRANTS, **cluster})

        custom, core, batch = api.CustomObjectsApi(), api.CoreV1Api(), api.BatchV1Api()

        def phase(namespace: str, name: str) -> str | None:
            return (custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status") or {}).get("phase")

        def create(namespace: str, name: str, *steps: dict[str, Any], suspend: bool = False) -> None:
            body = mmarjob(name, *steps)
            if suspend:
                body["spec"]["runPolicy"] = {"suspend": True}
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

        with Kubelet(api, [radiology, research, outside], node_prefix=f"{release}-node") as kubelet, \
                OperatorProcess(watch, kubeconfig=str(as_operator)) as operator:

            def reach(namespace: str, name: str, want: str) -> None:
                wait_for(lambda: phase(namespace, name) == want, RUN_TIMEOUT, f"{name} {want} ({mode})",
                         diagnose=lambda: "\n".join(denied(operator.log_text())[:10]))

            kubelet.script("broken", Outcome.fail("training diverged"))
            held = kubelet.script("held", Outcome.running())
            # a two-node train step: an Indexed Job and its headless Service (owner references with
            # blockOwnerDeletion, which the server only allows with update on mmarjobs/finalizers)
            create(radiology, "spleen", {"type": "train", "nodes": 2, "set": {"epochs": 2}}, {"type": "validate"}, {"type": "export"})
            create(research, "broken", {"type": "train"})
            create(research, "bad-set", {"type": "train", "set": {"lr=0.1": 1}})  # what only mmar.job refuses
            # their step's names taken (once they are known: they carry the MMARJob's uid) by objects that are not
            # theirs: an unowned Job and Service (left alone: condition ChildNameConflict until they are deleted), a
            # Service owned by another object (the same)
            create(research, "adopted", {"type": "train", "nodes": 2}, suspend=True)
            create(research, "squatted", {"type": "train", "nodes": 2}, suspend=True)
            taken, squatted = (child_name(custom.get_namespaced_custom_object(GROUP, VERSION, research, PLURAL, name), "train")
                               for name in ("adopted", "squatted"))
            batch.create_namespaced_job(research, step_job(taken))
            core.create_namespaced_service(research, headless_service(taken))
            owner = core.create_namespaced_config_map(research, {"metadata": {"name": "someone-else"}}).to_dict()
            core.create_namespaced_service(research, headless_service(squatted, {"kind": "ConfigMap", **owner}))
            for name in ("adopted", "squatted"):
                custom.patch_namespaced_custom_object(GROUP, VERSION, research, PLURAL, name, {"spec": {"runPolicy": {"suspend": False}}})
            wait_for(lambda: (custom.get_namespaced_custom_object(GROUP, VERSION, research, PLURAL, "adopted").get("status") or {})
                     .get("reason") == "ChildNameConflict", RUN_TIMEOUT, "adopted's name conflict shown")
            for taken_by in (batch.read_namespaced_job(taken, research), core.read_namespaced_service(taken, research)):
                assert not taken_by.metadata.owner_references  # not taken over
            batch.delete_namespaced_job(taken, research, propagation_policy="Background")
            core.delete_namespaced_service(taken, research)
            create(radiology, "held", {"type": "train"})
            reach(radiology, "held", "Running")
            custom.patch_namespaced_custom_object(GROUP, VERSION, radiology, PLURAL, "held", {"spec": {"runPolicy": {"suspend": True}}})
            held_job = child_name(custom.get_namespaced_custom_object(GROUP, VERSION, radiology, PLURAL, "held"), "train")
            wait_for(lambda: batch.read_namespaced_job(held_job, radiology).spec.suspend, RUN_TIMEOUT, "held's Job suspended")
            reach(radiology, "held", "Suspended")
            custom.patch_namespaced_custom_object(GROUP, VERSION, radiology, PLURAL, "held", {"spec": {"runPolicy": {"suspend": False}}})
            kubelet.release(held)

            reach(radiology, "spleen", "Succeeded")
            reach(research, "broken", "Failed")
            reach(research, "bad-set", "Failed")
            reach(research, "adopted", "Succeeded")  # retried once the names are free
            reach(radiology, "held", "Succeeded")
            final = custom.get_namespaced_custom_object(GROUP, VERSION, radiology, PLURAL, "spleen")["status"]
            assert [s["phase"] for s in final["steps"]] == ["Succeeded"] * 3, final
            services = core.list_namespaced_service(radiology, label_selector="mmar.dev/mmarjob=spleen").items
            assert [s.metadata.name for s in services] == [
                child_name(custom.get_namespaced_custom_object(GROUP, VERSION, radiology, PLURAL, "spleen"), "train")]
            for made in (batch.read_namespaced_job(taken, research), core.read_namespaced_service(taken, research)):
                assert [r.kind for r in made.metadata.owner_references] == ["MMARJob"]
            wait_for(lambda: f"{squatted} exists and is controlled by ConfigMap someone-else" in operator.log_text(),
                     RUN_TIMEOUT, "the operator to refuse squatted's Service")
            squatter = core.read_namespaced_service(squatted, research)
            assert [r.name for r in squatter.metadata.owner_references] == ["someone-else"]  # not taken over
            assert not batch.list_namespaced_job(research, label_selector="mmar.dev/mmarjob=squatted").items

            if mode == "namespaced":  # an MMARJob outside the watched namespaces is left alone
                create(outside, "ignored", {"type": "train"})
                create(radiology, "after", {"type": "train"})
                reach(radiology, "after", "Succeeded")
                assert phase(outside, "ignored") is None
                assert not batch.list_namespaced_job(outside).items
            log = operator.log_text()
            assert operator.running(), log[-4000:]
        assert not kubelet.errors, kubelet.errors
        assert re.search(rf"\[{radiology}/spleen\] Handler 'mmarjob' succeeded", log), log[-2000:]  # kopf's line for the MMARJob on.event handler  # the operator's log, and it did its work
        refused = denied(log)
        assert not refused, "permission errors with the chart's RBAC:\n" + "\n".join(refused[:20])
        # the operator's requests went through the chart's FlowSchema into workload-high (API Priority and
        # Fairness), not the service-accounts FlowSchema's workload-low: the FlowSchema is this release's
        # own, so nothing but the operator's token was dispatched through it
        assert dispatched(kubectl, flow_schema, "workload-high") > 0
    finally:
        helm("uninstall", release, "-n", release_ns, "--wait", "--timeout", "60s")
