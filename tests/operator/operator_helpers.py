"""Shared by the operator tests: the CRD, a CEL evaluator over its schema, and an in-memory API server."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator

import yaml
from kubernetes.client.exceptions import ApiException

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "mmar.dev_mmarjobs.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
# the Kubernetes versions whose official schemas every rendered object and the CRD are checked against
K8S_VERSIONS = [f"1.{minor}.0" for minor in range(29, 38)]


def load_crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def crd_schema() -> dict[str, Any]:
    return load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def manifest(*steps: dict[str, Any], uid: str | None = "uid-1", namespace: str = "ns", **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "mmar.dev/v1alpha1",
        "kind": "MMARJob",
        "metadata": {"name": "spleen", "namespace": namespace, "generation": 1},
        "spec": {"mmar": {"claimName": "ws"}, "data": {"claimName": "data"}, "steps": list(steps) or [{"type": "train"}]},
    }
    if uid:
        body["metadata"]["uid"] = uid
    body["spec"].update(spec)
    return body


# ------------------------------------------------------------------------------------------------ schema


def apply_schema_defaults(schema: dict[str, Any], value: Any) -> Any:
    """What the API server's defaulting does: fill `default`s of absent properties, recursively."""
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_schema_defaults(sub, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_schema_defaults(schema["items"], item)
    return value


def iter_rules(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    for rule in schema.get("x-kubernetes-validations") or []:
        yield path or ".", rule
    for key, sub in (schema.get("properties") or {}).items():
        yield from iter_rules(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from iter_rules(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from iter_rules(schema["additionalProperties"], f"{path}{{}}")


def _substring(text, start, end=None):
    import celpy

    return celpy.celtypes.StringType(str(text)[int(start):] if end is None else str(text)[int(start):int(end)])


# the functions of the Kubernetes CEL library (its strings extension) that the CRD's rules use and cel-python
# lacks; the e2e tests check the same rules on a real API server
K8S_CEL_EXTENSIONS = {"substring": _substring}


def is_transition_rule(rule: dict[str, Any]) -> bool:
    """A rule over `oldSelf`: the API server checks it on updates only."""
    return "oldSelf" in rule["rule"]


def cel_failures(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Evaluate every x-kubernetes-validations rule against `value` (cel-python); return failed messages."""
    import celpy

    failures = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations") or []:
        if is_transition_rule(rule):
            continue
        program = env.program(env.compile(rule["rule"]), functions=K8S_CEL_EXTENSIONS)
        result = program.evaluate({"self": celpy.json_to_cel(value)})
        if isinstance(result, Exception) or not bool(result):
            failures.append(f"{path or '.'}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for key, sub in value.items():
            if key in (schema.get("properties") or {}):
                failures += cel_failures(schema["properties"][key], sub, f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                failures += cel_failures(schema["additionalProperties"], sub, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            failures += cel_failures(schema["items"], item, f"{path}[{i}]")
    return failures


def transition_failures(schema: dict[str, Any], old: Any, new: Any) -> list[str]:
    """The messages of the transition rules (over `oldSelf`) of `schema` itself that an update from `old` to
    `new` fails (cel-python)."""
    import celpy

    env = celpy.Environment()
    failures = []
    for rule in schema.get("x-kubernetes-validations") or []:
        if is_transition_rule(rule):
            program = env.program(env.compile(rule["rule"]), functions=K8S_CEL_EXTENSIONS)
            result = program.evaluate({"self": celpy.json_to_cel(new), "oldSelf": celpy.json_to_cel(old)})
            if isinstance(result, Exception) or not bool(result):
                failures.append(rule.get("message", rule["rule"]))
    return failures


def schema_errors(body: dict[str, Any]) -> list[str]:
    """Everything the API server would reject: openAPIV3Schema (after defaulting) and the CEL rules."""
    import jsonschema

    schema = crd_schema()
    body = apply_schema_defaults(schema, copy.deepcopy(body))
    validator = jsonschema.Draft4Validator(schema)  # OpenAPI 3.0 schemas are draft-4 flavoured
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(body)]
    return errors + cel_failures(schema, body)


# ------------------------------------------------------------------------------------- fake API server


def _matches(labels: dict[str, str], selector: str | None) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeKube:
    """BatchV1Api + CoreV1Api + CustomObjectsApi, in memory, with the Job controller's and the garbage
    collector's effects as explicit test steps (start/succeed/fail/collect)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.calls: list[str] = []
        self.fail_next: list[Exception] = []  # raised, in order, by the next calls
        self.refuse_jobs: list[Exception] = []  # raised, in order, by the next Job creates (a quota, an invalid Job)
        self.events: list[dict[str, Any]] = []  # Events posted (create_namespaced_event)
        self._uid = 0

    # -- plumbing
    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.fail_next:
            raise self.fail_next.pop(0)

    def _create(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        key = (kind, namespace, body["metadata"]["name"])
        if key in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        obj = copy.deepcopy(body)
        self._uid += 1
        obj["metadata"].update(namespace=namespace, uid=f"child-{self._uid}")
        obj.setdefault("status", {})
        self.objects[key] = obj
        return copy.deepcopy(obj)

    def _read(self, kind: str, name: str, namespace: str) -> dict[str, Any]:
        if (kind, namespace, name) not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        return copy.deepcopy(self.objects[(kind, namespace, name)])

    def _patch(self, kind: str, name: str, namespace: str, body: dict[str, Any], content_type: str | None) -> dict[str, Any]:
        if content_type != "application/merge-patch+json":  # a dict body is a merge patch: say so
            raise ApiException(status=415, reason=f"UnsupportedMediaType {content_type}")
        obj = self.objects.get((kind, namespace, name))
        if obj is None:
            raise ApiException(status=404, reason="NotFound")
        _merge(obj, copy.deepcopy(body))
        return copy.deepcopy(obj)

    def _list(self, kind: str, namespace: str, selector: str | None) -> dict[str, Any]:
        items = [copy.deepcopy(o) for (k, ns, _), o in sorted(self.objects.items()) if k == kind and ns == namespace
                 and _matches(o["metadata"].get("labels") or {}, selector)]
        return {"items": items}

    # -- BatchV1Api
    def create_namespaced_job(self, namespace, body):
        self._call("create_job")
        if self.refuse_jobs:
            raise self.refuse_jobs.pop(0)
        return self._create("Job", namespace, body)

    def read_namespaced_job(self, name, namespace):
        self._call("read_job")
        return self._read("Job", name, namespace)

    def patch_namespaced_job(self, name, namespace, body, _content_type=None):
        self._call("patch_job")
        return self._patch("Job", name, namespace, body, _content_type)

    def list_namespaced_job(self, namespace, label_selector=None):
        self._call("list_jobs")
        return self._list("Job", namespace, label_selector)

    def get_api_resources(self, _request_timeout=None):
        self._call("get_api_resources")
        return {"resources": []}

    # -- CoreV1Api
    def create_namespaced_service(self, namespace, body):
        self._call("create_service")
        return self._create("Service", namespace, body)

    def read_namespaced_service(self, name, namespace):
        self._call("read_service")
        return self._read("Service", name, namespace)

    def patch_namespaced_service(self, name, namespace, body, _content_type=None):
        self._call("patch_service")
        return self._patch("Service", name, namespace, body, _content_type)

    def list_namespaced_pod(self, namespace, label_selector=None):
        self._call("list_pods")
        return self._list("Pod", namespace, label_selector)

    def create_namespaced_event(self, namespace, body):
        self._call("create_event")
        self.events.append(copy.deepcopy(body))
        return copy.deepcopy(body)

    # -- CustomObjectsApi
    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self._call("get_mmarjob")
        return self._read("MMARJob", name, namespace)

    def patch_namespaced_custom_object_status(self, group, version, namespace, plural, name, body, _content_type=None):
        self._call("patch_status")
        return self._patch("MMARJob", name, namespace, body, _content_type)

    # -- test-side effects: what kubectl, the Job controller and the garbage collector would do
    def add_mmarjob(self, body: dict[str, Any]) -> dict[str, Any]:
        self.objects[("MMARJob", body["metadata"]["namespace"], body["metadata"]["name"])] = copy.deepcopy(body)
        return body

    def mmarjob(self, namespace: str = "ns", name: str = "spleen") -> dict[str, Any]:
        return copy.deepcopy(self.objects[("MMARJob", namespace, name)])

    def jobs(self, namespace: str = "ns") -> list[dict[str, Any]]:
        """The namespace's Jobs in the order they were created."""
        return [o for (k, ns, _), o in self.objects.items() if k == "Job" and ns == namespace]

    def start(self, name: str, namespace: str = "ns", at: str = "2026-01-01T00:00:00Z") -> None:
        job = self.objects[("Job", namespace, name)]
        job["status"] = {"active": job["spec"].get("parallelism", 1), "startTime": at}

    def finish(self, name: str, ok: bool, message: str | None, namespace: str = "ns", at: str = "2026-01-01T01:00:00Z") -> None:
        job = self.objects[("Job", namespace, name)]
        started = job["status"].get("startTime", at)
        condition = {"type": "Complete" if ok else "Failed", "status": "True", "lastTransitionTime": at,
                     "reason": None if ok else "BackoffLimitExceeded", "message": None if ok else "Job has reached the specified backoff limit"}
        job["status"] = {"startTime": started, "conditions": [condition], "succeeded" if ok else "failed": 1}
        if ok:
            job["status"]["completionTime"] = at
        self.objects[("Pod", namespace, f"{name}-0-abcde")] = {
            "metadata": {"name": f"{name}-0-abcde", "namespace": namespace, "labels": {"job-name": name},
                         "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
            "status": {"phase": "Succeeded" if ok else "Failed",
                       "containerStatuses": [{"name": "mmar", "state": {"terminated": {"exitCode": 0 if ok else 1, "finishedAt": at, "message": message}}}]},
        }

    def pend(self, name: str, *, waiting: tuple[str, str] | None = None, unschedulable: str | None = None,
             init_running: bool = False, namespace: str = "ns", created: str = "2026-01-01T00:00:00Z") -> None:
        """What the real Job controller and kubelet show of a pod that does not run: the Job `active` with
        `ready: 0` (and its startTime), the pod Pending with a container's waiting reason, or
        PodScheduled=False, or (init_running) its init container running."""
        job = self.objects[("Job", namespace, name)]
        job["status"] = {"active": 1, "ready": 0, "startTime": created}
        status: dict[str, Any] = {"phase": "Pending", "conditions": []}
        if unschedulable is not None:
            status["conditions"].append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                         "message": unschedulable, "lastTransitionTime": created})
        if waiting is not None:
            status["containerStatuses"] = [{"name": "mmar", "state": {"waiting": {"reason": waiting[0], "message": waiting[1]}}}]
        if init_running:
            status["initContainerStatuses"] = [{"name": "mmar-init", "state": {"running": {"startedAt": created}}}]
            status["containerStatuses"] = [{"name": "mmar", "state": {"waiting": {"reason": "PodInitializing"}}}]
        self.objects[("Pod", namespace, f"{name}-0-pend")] = {
            "metadata": {"name": f"{name}-0-pend", "namespace": namespace, "labels": {"job-name": name},
                         "creationTimestamp": created, "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
            "status": status,
        }

    def fail_init(self, name: str, message: str, namespace: str = "ns", at: str = "2026-01-01T01:00:00Z") -> None:
        """The step's init container (`mmar init`) failed: the main container never ran; the Job failed."""
        self.finish(name, ok=False, message=None, namespace=namespace, at=at)
        self.objects[("Pod", namespace, f"{name}-0-abcde")]["status"] = {
            "phase": "Failed",
            "initContainerStatuses": [{"name": "mmar-init", "state": {"terminated": {"exitCode": 1, "reason": "Error", "finishedAt": at, "message": message}}}],
            "containerStatuses": [{"name": "mmar", "state": {"waiting": {"reason": "PodInitializing"}}}],
        }

    def delete(self, kind: str, name: str, namespace: str = "ns") -> None:
        del self.objects[(kind, namespace, name)]

    def collect_garbage(self, owner_uid: str) -> None:
        """Delete every object whose controller ownerReference points at `owner_uid`."""
        for key, obj in list(self.objects.items()):
            if any(r.get("uid") == owner_uid for r in obj["metadata"].get("ownerReferences") or []):
                del self.objects[key]


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """JSON merge patch (RFC 7386), as `kubectl patch --type merge` and the client's dict patches do."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value
