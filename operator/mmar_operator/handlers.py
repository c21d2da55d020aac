"""kopf handlers: a few lines each, gluing observe -> status.compute -> render -> apply.

Every trigger (MMARJob created, seen first after an operator restart, spec or labels edited, a child Job
changed, a periodic resync) runs the same idempotent `reconcile`: it reads what exists, computes the
status, creates the next step's objects by deterministic name (adopting any that exist) and patches the
status. One shortcut: a just-created MMARJob (its ADDED event, no status) has nothing to read yet, so its
first step is created straight from the event (`reconcile_new`); a name already taken sends it the full way.

MMARJobs are watched with kopf.on.event, not on.create/on.update/on.resume: those make kopf diff a deep copy
of every event's body and PATCH its bookkeeping annotations onto every MMARJob (a third of the operator's
CPU and one request per MMARJob in bench/operator_latency.py). `Triggers` tells the cases apart in memory instead.

No handler here makes kopf add a finalizer (no timers or daemons, the delete handler is optional):
deleting an MMARJob is never blocked, even while no operator runs. The periodic resync is therefore not a
kopf timer but one task that walks an in-memory index of the unfinished MMARJobs.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, Mapping

import kopf

from mmar import job as contract
from mmar.errors import MMARError

from mmar_operator import render, status
from mmar_operator.apply import GROUP, PLURAL, VERSION, Cluster, refusal
from mmar_operator.config import Config
from mmar_operator.metrics import Metrics

log = logging.getLogger(__name__)


CREATED, RESUMED, UPDATED = "created", "resumed", "updated"


def _uid(meta: Mapping[str, Any]) -> str:
    return meta.get("uid") or f"{meta['namespace']}/{meta['name']}"


class Triggers:
    """Which MMARJob events need a reconcile, from what this process last saw of each MMARJob (by uid): its
    generation (bumped by every spec edit) and labels (Kueue's pass through to the Jobs). Status changes,
    our own status patches included, need none. The first event of an MMARJob is a creation when it is an
    ADDED event without a status; otherwise (kopf's initial listing after a start, type None) a resume."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[Any, tuple[tuple[str, str], ...]]] = {}
        self._guard = threading.Lock()

    def classify(self, event_type: str | None, body: Mapping[str, Any]) -> str | None:
        meta = body["metadata"]
        signature = (meta.get("generation"), tuple(sorted((meta.get("labels") or {}).items())))
        with self._guard:
            before = self._seen.get(_uid(meta))
            self._seen[_uid(meta)] = signature
        if meta.get("deletionTimestamp"):
            return None  # being deleted: its children go with it
        if before is None:
            return CREATED if event_type == "ADDED" and not body.get("status") else RESUMED
        return UPDATED if before != signature else None

    def forget(self, uid: str) -> None:
        with self._guard:
            self._seen.pop(uid, None)


class Known:
    """What this process knows of each MMARJob without asking the API server: its latest body from the watch,
    the status its last reconcile left on the API server (this operator is the status's only writer, and
    the watch may not have brought that write back yet), and the latest body of each of its Jobs from the
    watch. A child Job's event is reconciled from these (no GET, no LIST); a status is known only after a
    reconcile of this process succeeded (a failure forgets it), so after a start the first one reads.
    Finished MMARJobs are not kept (their Jobs rarely change again): memory grows with the unfinished ones.
    A Job missing here (seen before its MMARJob) looks uncreated: creating it meets 409 and adopts it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._bodies: dict[tuple[str, str], Mapping[str, Any]] = {}
        self._status: dict[tuple[str, str], dict[str, Any]] = {}
        self._jobs: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = defaultdict(dict)

    def saw_mmarjob(self, body: Mapping[str, Any]) -> None:
        if ((body.get("status") or {}).get("phase")) in status.TERMINAL:
            return
        with self._guard:
            self._bodies[(body["metadata"]["namespace"], body["metadata"]["name"])] = body

    def saw_job(self, body: Mapping[str, Any], deleted: bool) -> None:
        meta = body["metadata"]
        parent = (meta["namespace"], meta["labels"][render.LABEL_JOB])
        with self._guard:
            if deleted:
                self._jobs.get(parent, {}).pop(meta["name"], None)
            elif parent in self._bodies:
                self._jobs[parent][meta["name"]] = body

    def left_status(self, namespace: str, name: str, current: dict[str, Any] | None) -> None:
        """What the API server now holds as the MMARJob's status (None: not known)."""
        if current is not None and current.get("phase") in status.TERMINAL:
            self.forget(namespace, name)
            return
        with self._guard:
            if current is None:
                self._status.pop((namespace, name), None)
            else:
                self._status[(namespace, name)] = current

    def mmarjob(self, namespace: str, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """The MMARJob (with the status we left) and its Jobs, or None when this process does not know them."""
        with self._guard:
            body, current = self._bodies.get((namespace, name)), self._status.get((namespace, name))
            jobs = list(self._jobs.get((namespace, name), {}).values())
        if body is None or current is None:
            return None
        # the watch's own dicts, not copies (nothing here changes them; `reconcile` copies what it changes)
        return {**body, "status": copy.deepcopy(current)}, jobs

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            self._bodies.pop((namespace, name), None)
            self._status.pop((namespace, name), None)
            self._jobs.pop((namespace, name), None)


class Runtime:
    """What handlers need, set at startup (or by tests): the API wrapper, settings, metrics."""

    def __init__(self) -> None:
        self.cluster: Cluster | None = None
        self.config = Config.from_env()
        self.metrics = Metrics()
        self.triggers = Triggers()
        self.known = Known()
        self._locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()
        self._waiting: set[tuple[str, str]] = set()  # MMARJobs with a reconcile waiting for their lock
        # MMARJobs whose last reconcile failed: the resync retries them (kopf retries no on.event handler),
        # finished ones too (e.g. a step appended after success)
        self.failed: set[tuple[str, str]] = set()
        # MMARJobs whose next step's create is refused for now (403: a quota): (retries so far, when the
        # resync tries again, time.monotonic()); each retry waits twice as long, up to RETRY_MAX_SECONDS
        self.refused: dict[tuple[str, str], tuple[int, float]] = {}

    def retry_due(self, key: tuple[str, str], now: float) -> bool:
        with self._guard:
            return key not in self.refused or self.refused[key][1] <= now

    def after_retry(self, key: tuple[str, str], current: Mapping[str, Any] | None, interval: float, now: float) -> None:
        """Back off the resync of an MMARJob whose step's create the API server refuses (see `retry_due`)."""
        refused = any(s.get("phase") == status.PENDING and s.get("reason") == status.JOB_CREATE_FAILED
                      for s in (current or {}).get("steps") or [])
        with self._guard:
            if not refused:
                self.refused.pop(key, None)
                return
            retries = self.refused.get(key, (0, now))[0] + 1
            self.refused[key] = (retries, now + min(RETRY_MAX_SECONDS, interval * 2 ** (retries - 1)))

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
RETRY_MAX_SECONDS = 300.0  # the longest wait between two tries of a create the API server refused (403)


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def plain(value: Any) -> Any:
    """kopf's Body and its views -> plain dicts/lists (render and status take plain data)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _foreign(child: Mapping[str, Any], job: Mapping[str, Any]) -> bool:
    """A Job with our labels that another object controls (e.g. one left by an earlier MMARJob of the same
    name, not collected yet): not this MMARJob's step; creating the step then fails with AdoptionError."""
    uid = job["metadata"].get("uid")
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return bool(uid) and any(r.get("controller") and r.get("uid") != uid for r in refs)


def observe(job: Mapping[str, Any], previous: Mapping[str, Any], cluster: Cluster,
            jobs: list[dict[str, Any]] | None = None) -> dict[int, status.Observed]:
    """Each step's Job (`jobs`: the MMARJob's Jobs as already known; else listed), and for a step that just
    finished its termination message and, if it failed, why its pod failed (pods are read only then)."""
    namespace = job["metadata"]["namespace"]
    if jobs is None:
        jobs = cluster.jobs_of(namespace, contract.name_of(job))
    children = {c["metadata"]["name"]: c for c in jobs if not _foreign(c, job)}
    recorded = {s.get("jobName"): s.get("phase") for s in previous.get("steps") or []}
    observed: dict[int, status.Observed] = {}
    for index in range(len(contract.steps_of(job))):
        name = render.child_name(job, index)
        child = children.get(name)
        if child is None:
            continue
        message = failure = pod = None
        phase, reason, _ = status.job_phase(child)
        if phase in status.TERMINAL and recorded.get(name) not in status.STEP_FINAL:
            pods = cluster.pods_of(namespace, name)
            message = status.termination_message(pods, phase == status.SUCCEEDED)
            failure = status.pod_failure(pods) if phase == status.FAILED else None
        elif reason == status.POD_STARTING and recorded.get(name) not in status.STEP_FINAL:
            # a Job with a pod that is not ready: running (an init container), starting, or stuck (an image
            # the node cannot pull, no node fits): the pod says which. Its changes make no Job event: the
            # resync brings them (MMAR_OPERATOR_RESYNC_SECONDS)
            pod = status.pod_state(cluster.pods_of(namespace, name))
        observed[index] = status.Observed(job=child, message=message, failure=failure, pod=pod)
    return observed


def _sync_suspend(job: Mapping[str, Any], observed: dict[int, status.Observed], cluster: Cluster) -> None:
    """Hold or release the running step's Job as spec.runPolicy.suspend says, and update `observed` to
    match (the status must say what is now true, not what was true before the patch). Jobs queued by
    Kueue are left to Kueue (it owns their suspend field); for those suspend only holds back the next step."""
    if status.queue_of(job):
        return
    want = bool(job["spec"]["runPolicy"]["suspend"])
    final = {s.get("jobName") for s in (job.get("status") or {}).get("steps") or [] if s.get("phase") in status.STEP_FINAL}
    for index, seen in list(observed.items()):
        if seen.job is None or status.job_phase(seen.job)[0] in status.TERMINAL or render.child_name(job, index) in final:
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
    recorded = {s["jobName"] for s in new.get("steps") or [] if s["phase"] in status.STEP_FINAL}
    for index, seen in observed.items():
        name = render.child_name(job, index)
        if seen.job is None or name not in recorded or status.job_phase(seen.job)[0] not in status.TERMINAL:
            continue
        if (seen.job.get("spec") or {}).get("ttlSecondsAfterFinished") is None:
            cluster.set_ttl(job["metadata"]["namespace"], name, ttl)


def _stop_failed(job: Mapping[str, Any], new: Mapping[str, Any], observed: Mapping[int, status.Observed], cluster: Cluster) -> None:
    """Stop the Job of a step recorded Failed while its Job still runs (a pod that did not start within the
    pending timeout): the Job controller ends it (DeadlineExceeded) and deletes its pods; the Job stays, with
    its history. Called after the status patch, so the step is never seen unstarted and created again."""
    failed = {s["jobName"] for s in new.get("steps") or [] if s["phase"] == status.FAILED}
    for index, seen in observed.items():
        name = render.child_name(job, index)
        if seen.job is None or name not in failed or status.job_phase(seen.job)[0] in status.TERMINAL:
            continue
        if (seen.job.get("spec") or {}).get("activeDeadlineSeconds") != 1:
            cluster.stop_job(job["metadata"]["namespace"], name)


def step_events(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events this reconcile's status change calls for, one per step and
    outcome: a step started, succeeded, was skipped, failed, or cannot start (the kubelet's or the
    scheduler's reason). Compared with the status before, so a replayed reconcile posts nothing again."""
    before = {s.get("jobName"): (s.get("phase"), s.get("reason")) for s in previous.get("steps") or []}
    events = []
    for step in current.get("steps") or []:
        phase, reason = step["phase"], step.get("reason")
        if before.get(step["jobName"]) == (phase, reason):
            continue
        was = (before.get(step["jobName"]) or (None, None))[0]
        name, words = step["name"], step.get("message") or ""
        if phase == status.SUCCEEDED:
            events.append(("Normal", "StepSucceeded", f"step {name} succeeded"))
        elif phase == status.SKIPPED:
            events.append(("Normal", "StepSkipped", f"step {name}: {words}"))
        elif phase == status.FAILED:
            events.append(("Warning", reason if reason == status.JOB_CREATE_FAILED else "StepFailed", f"step {name} failed: {words}"))
        elif phase == status.RUNNING and was != status.RUNNING:
            events.append(("Normal", "StepStarted", f"step {name} started (Job {step['jobName']})"))
        elif phase == status.PENDING and reason not in (status.POD_STARTING, "JobCreated", "Queued", None):
            events.append(("Warning", reason, f"step {name} cannot start: {words}"))
    return events


def spec_events(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """A Warning SpecChangeIgnored Event when an edit of a started step is first seen (or another one is)."""
    def edited(st: Mapping[str, Any]) -> str | None:
        found = next((c for c in st.get("conditions") or [] if c.get("type") == status.SPEC_CHANGE_IGNORED), None)
        return found["message"] if found and found.get("status") == "True" else None

    now, before = edited(current), edited(previous)
    return [("Warning", status.SPEC_CHANGE_IGNORED, now)] if now and now != before else []


class NameTaken(Exception):
    """`reconcile(new=True)` found a child's name taken: something of this MMARJob already exists."""


def reconcile(body: Mapping[str, Any], cluster: Cluster, config: Config, metrics: Metrics, now: str | None = None,
              *, new: bool = False, jobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One idempotent pass over an MMARJob; returns the status it patched. `jobs`: its Jobs as already
    known (else listed).

    `new`: `body` is a just-created MMARJob as its ADDED event shows it (no status): no child of it can exist
    yet, so nothing is read, and a child's name already taken raises NameTaken (no adoption)."""
    body = body if isinstance(body, dict) else plain(body)
    # managedFields: the largest part of a body and of no use here (mmar.job.load deep-copies the body)
    body = {**body, "metadata": {k: v for k, v in body["metadata"].items() if k != "managedFields"}}
    now = now or now_iso()
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    previous = body.get("status") or {}
    job: dict[str, Any] | None = None
    observed: dict[int, status.Observed] = {}
    try:
        job = contract.parse(body)
    except MMARError as error:  # slipped past the schema (or an older CRD): Failed, not a crash loop
        current = status.invalid(body, previous, str(error), now)
    else:
        if not new:
            observed = observe(job, previous, cluster, jobs)
            _sync_suspend(job, observed, cluster)
        timeout = config.pending_timeout_seconds
        current = status.compute(job, previous, observed, now, pending_timeout_default=timeout)
        index = status.next_step(job, current)
        if index is not None:
            created = refused = None
            for obj in render.render_step(job, index, config):
                what = f"{obj['kind']} {namespace}/{obj['metadata']['name']}"
                try:
                    created = cluster.create(obj) if new else cluster.ensure(obj)
                except Exception as error:  # noqa: BLE001 - a refusal becomes the step's status, the rest is re-raised
                    code_message = refusal(error)
                    if code_message is None:
                        raise
                    refused = (code_message[0], what, code_message[1])
                    # one line naming the object, not a traceback: the status and an Event carry the words
                    log.warning("MMARJob %s/%s: step %s: the API server refused to create %s (%d): %s", namespace, name,
                                contract.steps_of(job)[index]["name"], what, *code_message)
                    break
                if created is None:
                    raise NameTaken(f"{what} exists")
                metrics.children_created.labels(kind=obj["kind"]).inc()
            observed[index] = status.Observed(job=None if refused else created, refused=refused)
            current = status.compute(job, previous, observed, now, pending_timeout_default=timeout)
        metrics.observe_finished(status.finished_steps(previous, current))
    metrics.set_phase(namespace, name, current["phase"])
    if current != previous:
        # a merge patch keeps keys it does not mention: clear the ones the new status dropped
        cluster.patch_status(namespace, name, {**{k: None for k in previous if k not in current}, **current})
        for kind, reason, message in step_events(previous, current) + spec_events(previous, current):
            cluster.post_event(body, kind, reason, message, now)
    if job is not None:
        _expire_recorded(job, current, observed, cluster)
        _stop_failed(job, current, observed, cluster)
    return current


def reconcile_guarded(body: Mapping[str, Any], runtime: Runtime | None = None) -> dict[str, Any] | None:
    """Reconcile the MMARJob as the API server has it now (an event's body may be stale: an old status
    could make a finished step whose Job was garbage-collected look unstarted), one at a time."""
    runtime = runtime or RUNTIME
    meta = body["metadata"]
    if not runtime.enqueue(meta["namespace"], meta["name"]):
        return None
    with runtime.lock(meta["namespace"], meta["name"]):
        runtime.started(meta["namespace"], meta["name"])
        return _reconcile_fresh(meta["namespace"], meta["name"], runtime)


def _reconcile_fresh(namespace: str, name: str, runtime: Runtime) -> dict[str, Any] | None:
    """Read the MMARJob, reconcile it (its lock held by the caller)."""
    with _failures_counted(namespace, name, runtime):
        fresh = runtime.cluster.get_mmarjob(namespace, name)
        if fresh is None or (fresh.get("metadata") or {}).get("deletionTimestamp"):
            runtime.known.left_status(namespace, name, None)
            return None  # deleted: its children go with it
        current = reconcile(fresh, runtime.cluster, runtime.config, runtime.metrics)
        runtime.known.left_status(namespace, name, current)
        return current


def reconcile_known(namespace: str, name: str, runtime: Runtime | None = None) -> dict[str, Any] | None:
    """Reconcile an MMARJob from what this process knows (`Known`: the watch's bodies, the status we left),
    one at a time; read from the API server (`reconcile_guarded`) when it knows too little."""
    runtime = runtime or RUNTIME
    if not runtime.enqueue(namespace, name):
        return None
    with runtime.lock(namespace, name):
        runtime.started(namespace, name)
        known = runtime.known.mmarjob(namespace, name)
        if known is None:
            return _reconcile_fresh(namespace, name, runtime)
        body, jobs = known
        if body["metadata"].get("deletionTimestamp"):
            return None
        with _failures_counted(namespace, name, runtime):
            current = reconcile(body, runtime.cluster, runtime.config, runtime.metrics, jobs=jobs)
            runtime.known.left_status(namespace, name, current)
            return current


def reconcile_new(body: Mapping[str, Any], runtime: Runtime | None = None) -> dict[str, Any] | None:
    """A just-created MMARJob (its ADDED event, no status): its first step's objects are created from the
    event's body, with no read of the MMARJob or its Jobs (the body cannot be stale in the way
    `reconcile_guarded` fears: there is no status yet to be old). When a name is taken (an object left by an
    earlier MMARJob of that name, or a reconcile that got there first), the full reconcile decides."""
    runtime = runtime or RUNTIME
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    with runtime.lock(namespace, name):
        try:
            with _failures_counted(namespace, name, runtime):
                current = reconcile(body, runtime.cluster, runtime.config, runtime.metrics, new=True)
                runtime.known.left_status(namespace, name, current)
                return current
        except NameTaken:
            return _reconcile_fresh(namespace, name, runtime)


class _failures_counted:  # noqa: N801 - used as a `with` block, like contextlib's
    """Count and log a failed reconcile, remember it for the resync to retry, and raise it as kopf's
    TemporaryError; a success clears the retry. NameTaken passes through (not a failure)."""

    def __init__(self, namespace: str, name: str, runtime: Runtime):
        self.key, self.runtime = (namespace, name), runtime

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: BaseException | None, _tb: Any) -> bool:
        if error is None:
            self.runtime.failed.discard(self.key)
            return False
        if isinstance(error, NameTaken) or not isinstance(error, Exception):
            return False
        self.runtime.failed.add(self.key)
        self.runtime.known.left_status(*self.key, None)  # a patch may or may not have landed
        self.runtime.metrics.reconcile_errors.inc()
        log.error("reconcile of %s/%s failed", *self.key, exc_info=(kind, error, _tb))
        raise kopf.TemporaryError(f"reconcile failed: {error}", delay=15) from error


def forget(namespace: str, name: str, runtime: Runtime | None = None, uid: str | None = None) -> None:
    """The MMARJob is gone; its Jobs and Services go with it through their ownerReferences."""
    runtime = runtime or RUNTIME
    runtime.metrics.set_phase(namespace, name, None)
    runtime.failed.discard((namespace, name))
    runtime.refused.pop((namespace, name), None)
    runtime.known.forget(namespace, name)
    if uid:
        runtime.triggers.forget(uid)


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
    settings.persistence.diffbase_storage = NoDiffBase()


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base at all. kopf builds one for every event of every watched resource (a deep copy of the
    body: the largest share of the operator's CPU in a profile of bench/operator_latency.py) for on.create/on.update
    handlers and daemons; this operator registers neither, so the diff would be thrown away."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


# `event`: the watch's raw event, whose object is a plain dict (kopf's `body` is a view that would be copied)
@kopf.on.event(GROUP, VERSION, PLURAL, id="mmarjob")
def _on_mmarjob(event: Mapping[str, Any], **_: Any) -> None:
    type, body = event["type"], event["object"]  # noqa: A001
    meta = body["metadata"]
    if type == "DELETED":
        forget(meta["namespace"], meta["name"], uid=_uid(meta))
        return
    RUNTIME.known.saw_mmarjob(body)
    trigger = RUNTIME.triggers.classify(type, body)
    if trigger == CREATED:
        reconcile_new(body)
    elif trigger is not None:  # seen first after a start (adopt what exists), or its spec/labels edited
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
    """A safety net for a missed watch event and the retry of a failed reconcile: every `interval` seconds,
    reconcile each unfinished MMARJob and each whose last reconcile failed (one at a time, in the thread
    pool). Finished MMARJobs are not touched again unless they fail."""
    loop = asyncio.get_running_loop()
    runtime = runtime or RUNTIME
    while True:
        await asyncio.sleep(interval)
        for namespace, name in {*index, *runtime.failed}:  # a snapshot: both change while we await
            if not runtime.retry_due((namespace, name), time.monotonic()):
                continue  # its step's create was refused (a quota): retried with back-off
            try:
                current = await loop.run_in_executor(None, reconcile_guarded, {"metadata": {"namespace": namespace, "name": name}}, runtime)
            except kopf.TemporaryError:
                continue  # logged and counted by reconcile_guarded; the next round retries
            runtime.after_retry((namespace, name), current, interval, time.monotonic())


@kopf.on.startup()
async def _start_resync(memo: kopf.Memo, unfinished_mmarjobs: kopf.Index, **_: Any) -> None:
    memo["resync"] = asyncio.get_running_loop().create_task(resync(unfinished_mmarjobs, RUNTIME.config.resync_seconds))


@kopf.on.cleanup()
async def _stop_resync(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("resync")
    if task is not None:
        task.cancel()


@kopf.on.event("batch", "v1", "jobs", labels={render.LABEL_JOB: kopf.PRESENT}, id="child-job")
def _on_child(event: Mapping[str, Any], **_: Any) -> None:
    type, body = event["type"], event["object"]  # noqa: A001
    meta = body["metadata"]
    namespace, parent, cluster = meta["namespace"], meta["labels"][render.LABEL_JOB], RUNTIME.cluster
    if cluster is None:
        return
    RUNTIME.known.saw_job(body, deleted=type == "DELETED")
    if type == "DELETED":
        cluster.forget_job(namespace, meta["name"])
    elif cluster.is_own_create(namespace, meta["name"], meta.get("resourceVersion")):
        return  # the echo of the create: the reconcile that made it has put it in the status already
    reconcile_known(namespace, parent)


@kopf.on.probe(id="reconciler")
def _probe(**_: Any) -> str:
    """/healthz: ok once the API server has answered this process (a reconcile, or this probe's own
    request); before that a PermanentError makes kopf answer 500 (no retry inside the probe), so an operator
    that cannot reach the API server is never Ready."""
    cluster = RUNTIME.cluster
    if cluster is None:
        raise kopf.PermanentError("starting: no API client yet")
    try:
        cluster.ping()
    except Exception as error:  # noqa: BLE001 - any failure means not reached; said in the probe's answer
        raise kopf.PermanentError(f"the API server has not answered yet: {error}") from error
    return "ok"
