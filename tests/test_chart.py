"""The Helm chart: lint, render with default and all-features values, validate every object."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from _tools import ROOT, require_tool, run_tool

CHART = ROOT / "charts" / "mmar-operator"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
# Kinds from CRDs that the Kubernetes schemas don't know (prometheus-operator); checked by hand below.
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor"}
K8S_VERSION = "1.33.0"


def helm_template(*args: str) -> list[dict]:
    helm = require_tool("helm")
    result = run_tool([helm, "template", "mmar", str(CHART), "--namespace", "mmar-system", "--include-crds", *args])
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def default_objects() -> list[dict]:
    return helm_template()


@pytest.fixture(scope="module")
def all_objects() -> list[dict]:
    return helm_template("-f", str(ALL_FEATURES))


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


@pytest.mark.parametrize("values", [[], ["-f", str(ALL_FEATURES)]], ids=["default", "all-features"])
def test_helm_lint_strict(values):
    result = run_tool([require_tool("helm"), "lint", "--strict", str(CHART), *values])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("fixture", ["default_objects", "all_objects"])
def test_every_rendered_object_is_valid_kubernetes(fixture, request):
    import kubernetes_validate

    objects = request.getfixturevalue(fixture)
    for obj in objects:
        if obj["kind"] in MONITORING_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_rendered_kinds(default_objects, all_objects):
    kinds = lambda objs: sorted({o["kind"] for o in objs})  # noqa: E731
    assert kinds(default_objects) == [
        "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Deployment", "FlowSchema", "Service",
        "ServiceAccount",
    ]
    assert kinds(all_objects) == [
        "ClusterRole", "ClusterRoleBinding", "ConfigMap", "CustomResourceDefinition", "Deployment", "FlowSchema",
        "PodMonitor", "RoleBinding", "Service", "ServiceAccount", "ServiceMonitor",
    ]


def test_operator_deployment_is_single_recreate_non_root(default_objects):
    (deployment,) = by_kind(default_objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["limits"]["memory"]
    assert container["livenessProbe"]["httpGet"]["port"] == "healthz"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MMAR_OPERATOR_DEFAULT_IMAGE"] == "ghcr.io/mmar-dev/mmar:0.1.0"
    resources = json.loads(env["MMAR_OPERATOR_DEFAULT_RESOURCES"])
    assert resources["limits"]["memory"] == "32Gi" and "nvidia.com/gpu" not in resources["limits"]  # GPUs: gpusPerNode only
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": int(env["MMAR_OPERATOR_METRICS_PORT"]), "healthz": int(env["MMAR_OPERATOR_LIVENESS_PORT"])}


def test_operator_settings_match_its_config(default_objects):
    """Every MMAR_OPERATOR_* variable the chart sets is one the operator's Config reads."""
    config = pytest.importorskip("mmar_operator.config")
    source = Path(config.__file__).read_text()
    (deployment,) = by_kind(default_objects, "Deployment")
    names = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    unread = sorted(n for n in names if n.startswith("MMAR_OPERATOR_") and f'"{n}"' not in source)
    # MMAR_OPERATOR_DEFAULT_RESOURCES is the chart's default runtime resources; the operator must read it.
    assert unread in ([], ["MMAR_OPERATOR_DEFAULT_RESOURCES"]), unread


def _rules(objects: list[dict], name_suffix: str = "") -> dict[tuple[str, str], set[str]]:
    rules: dict[tuple[str, str], set[str]] = {}
    for role in by_kind(objects, "ClusterRole"):
        if not role["metadata"]["name"].endswith(name_suffix):
            continue
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    rules.setdefault((group, resource), set()).update(rule["verbs"])
    return rules


def test_rbac_is_least_privilege(default_objects):
    rules = _rules(default_objects)
    assert rules == {
        # what mmar_operator calls (its RBAC table in docs/operator.md), as the real API server enforces it
        # (tests/e2e/test_helm_e2e.py runs the operator with exactly this): children go by garbage collection,
        # and nothing is adopted, so no delete (OwnerReferencesPermissionEnforcement asks for it only of a
        # client changing an existing object's ownerReferences)
        ("mmar.dev", "mmarjobs"): {"get", "list", "watch", "patch"},
        ("mmar.dev", "mmarjobs/status"): {"patch"},
        ("mmar.dev", "mmarjobs/finalizers"): {"update"},
        ("batch", "jobs"): {"create", "get", "list", "watch", "patch"},
        ("", "services"): {"create", "get"},
        ("", "pods"): {"list"},
        ("", "events"): {"create"},
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    }
    for verbs in rules.values():
        assert "*" not in verbs
    sa = by_kind(default_objects, "ServiceAccount")[0]["metadata"]["name"]
    for binding in by_kind(default_objects, "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "mmar-system"}]


def test_watch_namespaces_bind_per_namespace(all_objects):
    bindings = by_kind(all_objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["radiology", "research"]
    # kopf follows a list of namespaces by listing and watching them (cluster-wide it never reads them)
    assert _rules(all_objects, "-cluster")[("", "namespaces")] == {"list", "watch"}
    # Only the cluster-scoped reads stay cluster-wide.
    (cluster_binding,) = by_kind(all_objects, "ClusterRoleBinding")
    assert cluster_binding["roleRef"]["name"].endswith("-cluster")


def test_rbac_and_service_account_can_be_disabled():
    objects = helm_template("--set", "rbac.create=false", "--set", "serviceAccount.create=false",
                            "--set", "serviceAccount.name=existing")
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "RoleBinding", "ServiceAccount"}
    (deployment,) = by_kind(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "existing"


def test_flow_schema_puts_the_service_account_into_workload_high(default_objects):
    """API Priority and Fairness: every request of the operator's ServiceAccount (and only its) goes to
    workload-high, matched before the built-in service-accounts FlowSchema (9000, workload-low)."""
    (flow_schema,) = by_kind(default_objects, "FlowSchema")
    assert flow_schema["apiVersion"] == "flowcontrol.apiserver.k8s.io/v1"
    assert flow_schema["metadata"]["labels"]["app.kubernetes.io/instance"] == "mmar"
    spec = flow_schema["spec"]
    assert spec["priorityLevelConfiguration"] == {"name": "workload-high"}
    assert 900 < spec["matchingPrecedence"] < 9000  # after the system FlowSchemas, before service-accounts
    sa = by_kind(default_objects, "ServiceAccount")[0]["metadata"]["name"]
    (rule,) = spec["rules"]
    assert rule["subjects"] == [{"kind": "ServiceAccount", "serviceAccount": {"name": sa, "namespace": "mmar-system"}}]
    (resources,) = rule["resourceRules"]
    assert resources == {"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"], "clusterScope": True, "namespaces": ["*"]}


def test_flow_schema_settings_and_off():
    objects = helm_template("--set", "operator.flowSchema.priorityLevel=mmar-operator",
                            "--set", "operator.flowSchema.matchingPrecedence=1500",
                            "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=existing")
    (flow_schema,) = by_kind(objects, "FlowSchema")
    assert flow_schema["spec"]["priorityLevelConfiguration"]["name"] == "mmar-operator"
    assert flow_schema["spec"]["matchingPrecedence"] == 1500
    assert flow_schema["spec"]["rules"][0]["subjects"][0]["serviceAccount"]["name"] == "existing"
    assert not by_kind(helm_template("--set", "operator.flowSchema.enabled=false"), "FlowSchema")


def test_monitors_and_dashboard(all_objects):
    (service_monitor,) = by_kind(all_objects, "ServiceMonitor")
    services = {s["metadata"]["name"]: s for s in by_kind(all_objects, "Service")}
    selected = [s for s in services.values()
                if service_monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert len(selected) == 1 and selected[0]["spec"]["ports"][0]["name"] == service_monitor["spec"]["endpoints"][0]["port"]
    assert service_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    (pod_monitor,) = by_kind(all_objects, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "mmar-operator"}
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["radiology", "research"]}
    (keep,) = pod_monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert keep["action"] == "keep" and keep["sourceLabels"] == ["__meta_kubernetes_pod_container_port_name"]

    (dashboard,) = by_kind(all_objects, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert json.loads(dashboard["data"]["mmar.json"]) == json.loads((CHART / "dashboards" / "mmar.json").read_text())


def test_pod_monitor_selects_the_operators_step_pods(all_objects):
    """The PodMonitor's selector and port names match what the operator puts on step pods."""
    render = pytest.importorskip("mmar_operator.render")
    (pod_monitor,) = by_kind(all_objects, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= render.MANAGED_BY.items()
    import re

    regex = pod_monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["regex"]
    assert re.fullmatch(regex, "metrics") and re.fullmatch(regex, "metrics-3")
    assert not re.fullmatch(regex, "rendezvous")


def test_tensorboard_mounts_the_pvc_read_only(all_objects):
    deployment = next(d for d in by_kind(all_objects, "Deployment") if d["metadata"]["name"].endswith("-tensorboard"))
    pod = deployment["spec"]["template"]["spec"]
    (claim,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claim["persistentVolumeClaim"] == {"claimName": "mmar-data", "readOnly": True}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == claim["name"])
    assert mount["readOnly"] is True and mount["subPath"] == "spleen_ct_seg/models"
    assert pod["containers"][0]["command"] == ["tensorboard"]
    assert any(s["metadata"]["name"] == deployment["metadata"]["name"] for s in by_kind(all_objects, "Service"))


@pytest.mark.parametrize(
    "override, message",
    [
        (["--set", "tensorboard.enabled=true"], "claimName"),
        (["--set", "metrics.port=0"], "metrics"),
        (["--set", "operator.watchNamespaces[0]=Bad_Name"], "watchNamespaces"),
        (["--set", "unknownKey=1"], "unknownKey"),
        (["--set", "runtime.resources.limits.memory=lots"], "memory"),
        (["--set", "operator.flowSchema.matchingPrecedence=10000"], "matchingPrecedence"),
        (["--set", "operator.flowSchema.priorityLevel=Workload_High"], "priorityLevel"),
    ],
)
def test_schema_rejects_bad_values(override, message):
    result = run_tool([require_tool("helm"), "template", "mmar", str(CHART), *override])
    assert result.returncode != 0
    assert message in result.stderr


def test_chart_crds_equal_the_source_crds():
    """charts/mmar-operator/crds/ is a byte-equal copy of crds/ (the single source)."""
    source = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    copy = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert sorted(copy) == sorted(source), "run: cp crds/*.yaml charts/mmar-operator/crds/"
    for name in source:
        assert copy[name] == source[name], f"charts/mmar-operator/crds/{name} differs from crds/{name}: copy it again"


def test_chart_and_app_version_match_the_package():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version


# Kubernetes client method -> (API group, resource): what the operator's code calls.
_CLIENT_RESOURCES = {
    "namespaced_job": ("batch", "jobs"),
    "namespaced_service": ("", "services"),
    "namespaced_pod": ("", "pods"),
    "namespaced_event": ("", "events"),
    "namespaced_custom_object": ("mmar.dev", "mmarjobs"),
    "namespaced_custom_object_status": ("mmar.dev", "mmarjobs/status"),
}
_CLIENT_VERBS = {"create": "create", "read": "get", "get": "get", "list": "list", "patch": "patch",
                 "replace": "update", "delete": "delete"}


def test_rbac_grants_every_call_the_operator_makes(default_objects):
    """Scan the operator's code for Kubernetes client calls; each one must be allowed by the chart's RBAC."""
    import re

    package = ROOT / "operator" / "mmar_operator"
    if not package.is_dir():
        pytest.skip("operator package not present")
    source = "\n".join(p.read_text() for p in package.glob("*.py"))
    calls = set(re.findall(r"\.(create|read|get|list|patch|replace|delete)_(namespaced_[a-z_]+)\b", source))
    assert calls, "found no Kubernetes client calls in the operator"
    rules = _rules(default_objects)
    for verb, target in sorted(calls):
        assert target in _CLIENT_RESOURCES, f"unknown client call {verb}_{target}: add it to the chart's RBAC and here"
        group, resource = _CLIENT_RESOURCES[target]
        assert _CLIENT_VERBS[verb] in rules.get((group, resource), set()), f"RBAC lacks {verb} on {group}/{resource}"
    # kopf watches what the handlers subscribe to.
    for group, resource in [("mmar.dev", "mmarjobs"), ("batch", "jobs")]:
        assert {"list", "watch"} <= rules[(group, resource)]
