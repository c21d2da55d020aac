"""The only code that talks to the Kubernetes API server.

`Cluster` wraps the official client's BatchV1Api, CoreV1Api and CustomObjectsApi (injected, so tests pass
in-memory fakes with the same method names). It creates children by deterministic name and finds its own when
they are already there, so a replayed event or a restarted operator never makes a duplicate; it retries transient
errors (429, 5xx, connection resets) with exponential back-off and jitter.

With the real client, responses are read as JSON into plain dicts (`_preload_content=False`): the typed
client would build pydantic models of every Job and list only for `_serialize` to turn them back into
dicts. Requests still go through the typed client (its validation and serialization of what we send).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from typing import Any, Callable, Mapping, TypeVar

from mmar.job import API_VERSION, GROUP, KIND, PLURAL, VERSION  # noqa: F401 - the API, defined once (mmar.job.outcome)

from mmar_operator.render import LABEL_JOB

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
# Every patch here is a JSON merge patch (RFC 7386). Said explicitly: the typed client picks
# application/json-patch+json for a dict body otherwise, which the API server refuses.
MERGE_PATCH = "application/merge-patch+json"


class AdoptionError(RuntimeError):
    """A child's name is taken by an object that is not its owner's (another controller's, or no one's)."""


def _status_of(error: BaseException) -> int | None:
    return getattr(error, "status", None)


def is_transient(error: BaseException) -> bool:
    status = _status_of(error)
    if status is not None:
        return status in TRANSIENT_STATUS
    # urllib3 / socket level failures: the API server restarting, a network blip
    return isinstance(error, (ConnectionError, TimeoutError)) or type(error).__name__ in {"MaxRetryError", "ProtocolError", "NewConnectionError"}


# An API server's refusal of a child's create that no retry of the same request mends: the object is
# invalid (400, 422: the step fails) or forbidden (403: a ResourceQuota, an admission policy, RBAC, which
# someone may change: the step waits and the create is retried)
PERMANENT_REFUSALS = {400, 422}
RETRIED_REFUSALS = {403}


def api_message(error: BaseException) -> str:
    """The API server's own words for a refused request (the Status object's message)."""
    body = getattr(error, "body", None)
    if body:
        try:
            message = json.loads(body).get("message")
        except (ValueError, AttributeError):
            message = None
        if message:
            return str(message)
    return str(getattr(error, "reason", None) or error)


def refusal(error: BaseException) -> tuple[int, str] | None:
    """(HTTP status, the server's message) when `error` is a create refused for the object itself or for
    a policy (see PERMANENT_REFUSALS, RETRIED_REFUSALS); None for anything else (re-raised as a failure)."""
    status = _status_of(error)
    if status in PERMANENT_REFUSALS or status in RETRIED_REFUSALS:
        return status, api_message(error)
    return None


def _serialize(obj: Any) -> Any:
    """Client model objects -> camelCase dicts (what the API speaks); dicts pass through."""
    if obj is None or isinstance(obj, (dict, list, str, int, float, bool)):
        return obj
    from kubernetes.client import ApiClient  # only needed with the real client

    return ApiClient().sanitize_for_serialization(obj)


def _is_real_client(api: Any) -> bool:
    try:
        from kubernetes.client import ApiClient
    except ImportError:  # pragma: no cover - the operator extras always bring it
        return False
    return isinstance(getattr(api, "api_client", None), ApiClient)


class Cluster:
    def __init__(self, batch: Any, core: Any, custom: Any, *, attempts: int = 5, base_delay: float = 0.5,
                 max_delay: float = 10.0, sleep: Callable[[float], None] = time.sleep):
        self.batch, self.core, self.custom = batch, core, custom
        self.attempts, self.base_delay, self.max_delay, self.sleep = attempts, base_delay, max_delay, sleep
        # in-memory fakes take no transport options and return dicts already
        self.raw_json = all(_is_real_client(api) for api in (batch, core, custom))
        # (namespace, name) -> resourceVersion of each Job this operator created, until the watch echoes it
        self._created: dict[tuple[str, str], str] = {}
        self._created_lock = threading.Lock()
        # whether the API server has answered this process at least once (the health probe says so)
        self.reached = False

    @classmethod
    def from_kubeconfig(cls, connections: int | None = None) -> "Cluster":
        """In a pod: the service account; elsewhere: ~/.kube/config or $KUBECONFIG.

        `connections`: the HTTP keep-alive pool (default Config.workers, one per handler thread); the
        client's default (5 per CPU) made busy threads drop connections and open new ones, TLS and all."""
        from kubernetes import client, config

        from mmar_operator.config import Config

        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = connections or Config.from_env().workers
        api = client.ApiClient(configuration)  # one client, one pool, for all three APIs
        return cls(client.BatchV1Api(api), client.CoreV1Api(api), client.CustomObjectsApi(api))

    def fetch(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`call`, with the response as plain JSON data (dicts, lists)."""
        if not self.raw_json:
            return _serialize(self.call(fn, *args, **kwargs))
        response = self.call(fn, *args, _preload_content=False, **kwargs)
        try:
            return json.loads(response.data)
        finally:
            response.release_conn()

    # ------------------------------------------------------------------------------------------ retries

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                result = fn(*args, **kwargs)
                self.reached = True
                return result
            except Exception as error:  # noqa: BLE001 - classified below, re-raised when not transient
                if attempt == self.attempts or not is_transient(error):
                    raise
                delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                log.warning("transient API error (%s), retry %d/%d in %.1fs", _status_of(error) or type(error).__name__, attempt, self.attempts - 1, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")

    def ping(self, timeout: float = 3.0) -> None:
        """Raise unless the API server has answered this process once: until then, one cheap request
        (the batch API's resource list), no retries (a probe has seconds)."""
        if not self.reached:
            self.batch.get_api_resources(_request_timeout=timeout)
            self.reached = True

    # --------------------------------------------------------------------------------------- children

    def _methods(self, kind: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """(create, read) of a child's kind: children are created, or found as this owner's, never patched
        into shape or taken over (`ensure`)."""
        return {
            "Job": (self.batch.create_namespaced_job, self.batch.read_namespaced_job),
            "Service": (self.core.create_namespaced_service, self.core.read_namespaced_service),
        }[kind]

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create `obj`; None when its name is taken (409), for the caller to look closer (`ensure`)."""
        kind, meta = obj["kind"], obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        try:
            created = self.fetch(self._methods(kind)[0], namespace, obj)
        except Exception as error:  # noqa: BLE001
            if _status_of(error) != 409:
                raise
            return None
        version = (created.get("metadata") or {}).get("resourceVersion")
        if kind == "Job" and version:
            with self._created_lock:
                self._created[(namespace, name)] = version
        return created

    def ensure(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create `obj`, or find it already there under its name (409) when it is this owner's (its controller
        ownerReference has the owner's uid: a replayed create, an operator restart). An object of that name
        that is not (another controller's, or none's: e.g. left by a deleted owner of the same name) is never
        taken over: AdoptionError. Returns the live object."""
        created = self.create(obj)
        if created is not None:
            return created
        kind, meta = obj["kind"], obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        _, read = self._methods(kind)
        live = self.fetch(read, name, namespace)
        owner = meta["ownerReferences"][0]
        refs = (live.get("metadata") or {}).get("ownerReferences") or []
        controller = next((r for r in refs if r.get("controller")), None)
        if controller is not None and controller.get("uid") == owner["uid"]:
            return live
        whose = (f"is controlled by {controller.get('kind')} {controller.get('name')}" if controller is not None
                 else "has no controller")
        raise AdoptionError(f"{kind} {namespace}/{name} exists and {whose}, not by {owner['kind']} {owner['name']} "
                            f"(uid {owner['uid']}): not taken over; delete or rename it")

    def is_own_create(self, namespace: str, name: str, resource_version: str | None) -> bool:
        """Whether a Job's watch event shows it exactly as this operator's create returned it: the echo of our
        own write, which the reconcile that made it has already accounted for. True once per create (the
        entry goes with it); resourceVersions are opaque, so only equality says anything."""
        with self._created_lock:
            if resource_version and self._created.get((namespace, name)) == resource_version:
                del self._created[(namespace, name)]
                return True
            return False

    def forget_job(self, namespace: str, name: str) -> None:
        """The Job is gone (its echo may never come: e.g. deleted at once)."""
        with self._created_lock:
            self._created.pop((namespace, name), None)

    def jobs_of(self, namespace: str, mmarjob: str) -> list[dict[str, Any]]:
        result = self.fetch(self.batch.list_namespaced_job, namespace, label_selector=f"{LABEL_JOB}={mmarjob}")
        return list(result.get("items") or [])

    def pods_of(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        # set by the Job controller on every pod it creates (both label spellings exist across versions)
        result = self.fetch(self.core.list_namespaced_pod, namespace, label_selector=f"job-name={job_name}")
        return list(result.get("items") or [])

    def set_suspend(self, namespace: str, job_name: str, suspend: bool) -> None:
        self.fetch(self.batch.patch_namespaced_job, job_name, namespace, {"spec": {"suspend": suspend}}, _content_type=MERGE_PATCH)

    def stop_job(self, namespace: str, job_name: str) -> None:
        """End a Job now: a deadline already passed makes the Job controller fail it (DeadlineExceeded) and
        delete its pods, and keeps the Job (the user can still see what it did)."""
        self.fetch(self.batch.patch_namespaced_job, job_name, namespace, {"spec": {"activeDeadlineSeconds": 1}},
                   _content_type=MERGE_PATCH)

    def set_ttl(self, namespace: str, job_name: str, seconds: int) -> None:
        self.fetch(self.batch.patch_namespaced_job, job_name, namespace, {"spec": {"ttlSecondsAfterFinished": seconds}},
                   _content_type=MERGE_PATCH)

    # -------------------------------------------------------------------------------------- MMARJobs

    def get_mmarjob(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.fetch(self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)
        except Exception as error:  # noqa: BLE001
            if _status_of(error) == 404:
                return None
            raise

    def post_event(self, mmarjob: Mapping[str, Any], kind: str, reason: str, message: str, now: str) -> None:
        """A Kubernetes Event about the MMARJob (`kubectl describe mmarjob`, `kubectl get events`). Best
        effort: an Event that cannot be posted is logged, never a failed reconcile."""
        meta = mmarjob["metadata"]
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": kind, "reason": reason, "message": message[:1024],
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "source": {"component": "mmar-operator"}, "reportingComponent": "mmar-operator",
        }
        try:
            self.fetch(self.core.create_namespaced_event, meta["namespace"], body)
        except Exception as error:  # noqa: BLE001 - an Event is a courtesy
            log.warning("event %s on MMARJob %s/%s not posted: %s", reason, meta["namespace"], meta["name"], error)

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Through the status subresource: users' spec edits and the operator's status never collide."""
        try:
            self.fetch(self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace, PLURAL, name, {"status": dict(status)},
                       _content_type=MERGE_PATCH)
        except Exception as error:  # noqa: BLE001
            if _status_of(error) != 404:  # deleted meanwhile: nothing left to report on
                raise
