"""kopf handlers: a few lines each, gluing observe -> status.compute -> render -> apply.

Every trigger (MMARJob created, resumed after an operator restart, spec updated, a child Job changed, a
periodic resync) runs the same idempotent `reconcile`: it reads what exists, computes the status, creates
the next step's objects by deterministic name (adopting any that exist) and patches the status.

No handler here makes kopf add a finalizer (no timers or daemons, the delete handler is optional):
deleting an MMARJob is never blocked, even while no operator runs. The periodic resync is therefore not a
kopf timer but one task that walks an in-memory index of the unfinished MMARJobs.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, Mapping

import kopf

from mmar import job as contract
from mmar.errors import MMARError

from mmar_operator import render, status
from mmar_operator.apply import GROUP, MERGE_PATCH, PLURAL, VERSION, Cluster
from mmar_operator.config import Config
from mmar_operator.metrics import Metrics

log = logging.getLogger(__name__)


class Runtime:
    """What handlers need, set at startup (or by tests): the API wrapper, settings, metrics."""

    def __init__(self) -> None:
        self.cluster: Cluster | None = None
        self.config = Config.from_env()
        self.metrics = Metrics()
        self._locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()
        self._waiting: set[tuple[str, str]] = set()  # MMARJobs with a reconcile waiting for their lock

    def enqueue(self, namespace: str, name: str) -> bool:
        """False when a reconcile of this MMARJob already waits for its lock: that one reads the cluster
        after it gets the lock, so it also sees whatever prompted this call (a burst of child events
        makes one reconcile, not one each)."""
        with self._guard:
            if (namespace, name) in self._waiting:
                return False
            self._waiting.add((namespace, name))
            return True

    def started(self, namespace: str, name: str) -> None:
        with self._guard:
            self._waiting.discard((namespace, name))

    def lock(self, namespace: str, name: str) -> threading.Lock:
        # kopf serializes handlers per object, but a child Job's event and the MMARJob's own handler
        # may run at once in the thread pool: one reconcile per MMARJob at a time.
        with self._guard:
            return self._locks[(namespace, name)]


RUNTIME = Runtime()


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def plain(value: Any) -> Any:
    """kopf's Body and its views -> plain dicts/lists (render and status take plain data)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def observe(job: Mapping[str, Any], previous: Mapping[str, Any], cluster: Cluster) -> dict[int, status.Observed]:
    """Each step's Job, and for a step that just finished its termination message and, if it failed, why
    its pod failed (pods are read only then)."""
    namespace = job["metadata"]["namespace"]
    children = {c["metadata"]["name"]: c for c in cluster.jobs_of(namespace, contract.name_of(job))}
    recorded = {s.get("jobName"): s.get("phase") for s in previous.get("steps") or []}
    observed: dict[int, status.Observed] = {}
    for index in range(len(contract.steps_of(job))):
        name = render.child_name(job, index)
        child = children.get(name)
        if child is None:
            continue
        message = failure = None
        phase, _, _ = status.job_phase(child)
        if phase in status.TERMINAL and recorded.get(name) not in status.TERMINAL:
            pods = cluster.pods_of(namespace, name)
            message = status.termination_message(pods, phase == status.SUCCEEDED)
            failure = status.pod_failure(pods) if phase == status.FAILED else None
        observed[index] = status.Observed(job=child, message=message, failure=failure)
    return observed


def _sync_suspend(job: Mapping[str, Any], observed: dict[int, status.Observed], cluster: Cluster) -> None:
    """Hold or release the running step's Job as spec.runPolicy.suspend says, and update `observed` to
    match (the status must say what is now true, not what was true before the patch). Jobs queued by
    Kueue are left to Kueue (it owns their suspend field); for those suspend only holds back the next step."""
    if status.queue_of(job):
        return
    want = bool(job["spec"]["runPolicy"]["suspend"])
    for index, seen in list(observed.items()):
        if seen.job is None or status.job_phase(seen.job)[0] in status.TERMINAL:
            continue
        if bool((seen.job.get("spec") or {}).get("suspend")) != want:
            cluster.set_suspend(job["metadata"]["namespace"], render.child_name(job, index), want)
            child = copy.deepcopy(dict(seen.job))
            child.setdefault("spec", {})["suspend"] = want
            observed[index] = status.Observed(job=child, message=seen.message, failure=seen.failure)


def _expire_recorded(job: Mapping[str, Any], new: Mapping[str, Any], observed: Mapping[int, status.Observed], cluster: Cluster) -> None:
    """Give finished Jobs their runPolicy.ttlSecondsAfterFinished only now that their result is in the
    MMARJob's status: rendered with it, the TTL controller could delete a Job (and its pods, with their
    termination messages) before the operator read the result, and the step's result would be lost.
    Called after the status patch, so an operator killed in between sets it on its next pass."""
    ttl = job["spec"]["runPolicy"].get("ttlSecondsAfterFinished")
    if ttl is None:
        return
    recorded = {s["jobName"] for s in new.get("steps") or [] if s["phase"] in status.TERMINAL}
    for index, seen in observed.items():
        name = render.child_name(job, index)
        if seen.job is None or name not in recorded or status.job_phase(seen.job)[0] not in status.TERMINAL:
            continue
        if (seen.job.get("spec") or {}).get("ttlSecondsAfterFinished") is None:
            cluster.call(cluster.batch.patch_namespaced_job, name, job["metadata"]["namespace"],
                         {"spec": {"ttlSecondsAfterFinished": ttl}}, _content_type=MERGE_PATCH)


def reconcile(body: Mapping[str, Any], cluster: Cluster, config: Config, metrics: Metrics, now: str | None = None) -> dict[str, Any]:
    """One idempotent pass over an MMARJob; returns the status it patched."""
    body = plain(body)
    now = now or now_iso()
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    previous = body.get("status") or {}
    job: dict[str, Any] | None = None
    observed: dict[int, status.Observed] = {}
    try:
        job = contract.parse(body)
    except MMARError as error:  # slipped past the schema (or an older CRD): Failed, not a crash loop
        new = status.invalid(body, previous, str(error), now)
    else:
        observed = observe(job, previous, cluster)
        _sync_suspend(job, observed, cluster)
        new = status.compute(job, previous, observed, now)
        index = status.next_step(job, new)
        if index is not None:
            created = None
            for obj in render.render_step(job, index, config):
                created = cluster.ensure(obj)
                metrics.children_created.labels(kind=obj["kind"]).inc()
            observed[index] = status.Observed(job=created)
            new = status.compute(job, previous, observed, now)
        metrics.observe_finished(status.finished_steps(previous, new))
    metrics.set_phase(namespace, name, new["phase"])
    if new != previous:
        # a merge patch keeps keys it does not mention: clear the ones the new status dropped
        cluster.patch_status(namespace, name, {**{k: None for k in previous if k not in new}, **new})
    if job is not None:
        _expire_recorded(job, new, observed, cluster)
    return new


def reconcile_guarded(body: Mapping[str, Any], runtime: Runtime | None = None) -> dict[str, Any] | None:
    """Reconcile the MMARJob as the API server has it now (an event's body may be stale: an old status
    could make a finished step whose Job was garbage-collected look unstarted), one at a time."""
    runtime = runtime or RUNTIME
    meta = body["metadata"]
    if not runtime.enqueue(meta["namespace"], meta["name"]):
        return None
    with runtime.lock(meta["namespace"], meta["name"]):
        runtime.started(meta["namespace"], meta["name"])
        try:
            fresh = runtime.cluster.get_mmarjob(meta["namespace"], meta["name"])
            if fresh is None or (fresh.get("metadata") or {}).get("deletionTimestamp"):
                return None  # deleted: its children go with it
            return reconcile(fresh, runtime.cluster, runtime.config, runtime.metrics)
        except Exception as error:
            runtime.metrics.reconcile_errors.inc()
            log.exception("reconcile of %s/%s failed", meta["namespace"], meta["name"])
            raise kopf.TemporaryError(f"reconcile failed: {error}", delay=15) from error


def forget(namespace: str, name: str, runtime: Runtime | None = None) -> None:
    """The MMARJob is gone; its Jobs and Services go with it through their ownerReferences."""
    (runtime or RUNTIME).metrics.set_phase(namespace, name, None)


# ------------------------------------------------------------------------------------------ kopf glue


@kopf.on.startup()
def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    if RUNTIME.cluster is None:
        RUNTIME.cluster = Cluster.from_kubeconfig()
    # Kubernetes Events only for problems; kopf 1.45 posts none unless its loggers are enabled
    settings.posting.loggers = True
    settings.posting.level = logging.WARNING
    # kopf's bookkeeping in annotations only: the structural schema would prune a status.kopf field
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)


# Explicit handler ids: kopf derives them from the function name, and a leading underscore makes an
# annotation key (`mmar.dev/_on_create`) that the API server refuses (422) when a handler is retried.
@kopf.on.create(GROUP, VERSION, PLURAL, id="create")
def _on_create(body: kopf.Body, **_: Any) -> None:
    reconcile_guarded(body)


@kopf.on.resume(GROUP, VERSION, PLURAL, id="resume")  # the operator (re)started: adopt what exists, create what is missing
def _on_resume(body: kopf.Body, **_: Any) -> None:
    reconcile_guarded(body)


@kopf.on.update(GROUP, VERSION, PLURAL, id="update")  # spec or labels edited (e.g. runPolicy.suspend toggled)
def _on_update(body: kopf.Body, **_: Any) -> None:
    reconcile_guarded(body)


def _unfinished(status: Mapping[str, Any] | None, **_: Any) -> bool:
    return (status or {}).get("phase") not in ("Succeeded", "Failed")


# The unfinished MMARJobs, kept by kopf from its watch (an object leaves the index when it stops matching
# `when` or is deleted). Indexing adds no finalizer; a kopf timer would (kopf needs one to stop a timer
# before its object goes), and that finalizer would hold every deletion until an operator runs again.
@kopf.index(GROUP, VERSION, PLURAL, when=_unfinished)
def unfinished_mmarjobs(namespace: str, name: str, **_: Any) -> dict[tuple[str, str], None]:
    return {(namespace, name): None}


async def resync(index: Mapping[tuple[str, str], Any], interval: float, runtime: Runtime | None = None) -> None:
    """A safety net for a missed watch event: every `interval` seconds, reconcile each unfinished MMARJob
    (one at a time, in the thread pool). Finished MMARJobs are never touched again."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        for namespace, name in list(index):  # a snapshot: the index changes while we await
            try:
                await loop.run_in_executor(None, reconcile_guarded, {"metadata": {"namespace": namespace, "name": name}}, runtime)
            except kopf.TemporaryError:
                pass  # logged and counted by reconcile_guarded; the next round retries


@kopf.on.startup()
async def _start_resync(memo: kopf.Memo, unfinished_mmarjobs: kopf.Index, **_: Any) -> None:
    memo["resync"] = asyncio.get_running_loop().create_task(resync(unfinished_mmarjobs, RUNTIME.config.resync_seconds))


@kopf.on.cleanup()
async def _stop_resync(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("resync")
    if task is not None:
        task.cancel()


@kopf.on.event("batch", "v1", "jobs", labels={render.LABEL_JOB: kopf.PRESENT}, id="child-job")
def _on_child(type: str, body: kopf.Body, **_: Any) -> None:  # noqa: A002 - kopf's keyword
    meta = body["metadata"]
    namespace, parent, cluster = meta["namespace"], meta["labels"][render.LABEL_JOB], RUNTIME.cluster
    if cluster is None:
        return
    if type == "DELETED":
        cluster.forget_job(namespace, meta["name"])
    elif cluster.is_own_create(namespace, meta["name"], meta.get("resourceVersion")):
        return  # the echo of the create: the reconcile that made it has put it in the status already
    reconcile_guarded({"metadata": {"namespace": namespace, "name": parent}})


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True, id="delete")  # optional: no finalizer ever blocks deletion
def _on_delete(body: kopf.Body, **_: Any) -> None:
    forget(body["metadata"]["namespace"], body["metadata"]["name"])


@kopf.on.probe(id="reconciler")
def _probe(**_: Any) -> str:
    return "ok" if RUNTIME.cluster is not None else "starting"
