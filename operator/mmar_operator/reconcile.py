"""One idempotent pass over an MMARJob: observe its Jobs -> `status.compute` -> `render` the next step ->
`apply` creates it and patches the status. Every trigger (created, first seen after a start, edited, a child
Job changed, the periodic resync) runs it; `handlers` only says which.

A step's identity is its name: its Job is the one labelled with the step's name (`render.LABEL_STEP`) and
controlled (ownerReference) by this MMARJob's uid, whatever it is called (an older operator named Jobs
`<mmarjob>-<index>-<step>`). A Job labelled with this MMARJob's name that it does not control is someone
else's: never taken as a result, never adopted, left alone (condition ForeignJobsIgnored). One shortcut: a
just-created MMARJob (its ADDED event, no status) has nothing to read yet, so its first step is created
straight from the event (`reconcile_new`); a name already taken sends it the full way.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from typing import Any, Mapping

import kopf

from mmar import job as contract
from mmar.errors import MMARError

from mmar_operator import render, status
from mmar_operator.apply import AdoptionError, Cluster, refusal
from mmar_operator.config import Config
from mmar_operator.metrics import Metrics
from mmar_operator.state import OperatorState

log = logging.getLogger(__name__)


def plain(value: Any) -> Any:
    """kopf's Body and its views -> plain dicts/lists (render and status take plain data)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def owned(child: Mapping[str, Any], job: Mapping[str, Any]) -> bool:
    """Whether this MMARJob (its uid) is the controller of `child`: only such a Job is one of its steps."""
    uid = job["metadata"].get("uid")
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return not uid or any(r.get("controller") and r.get("uid") == uid for r in refs)


def _step_jobs(job: Mapping[str, Any], children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each step name's Job among the MMARJob's own: the one named as this operator names it, else (made by an
    older operator: `<mmarjob>-<index>-<step>`) the one its step label names."""
    found: dict[str, dict[str, Any]] = {}
    for child in sorted(children, key=lambda c: c["metadata"]["name"]):
        step = ((child["metadata"].get("labels") or {})).get(render.LABEL_STEP)
        if step and (step not in found or child["metadata"]["name"] == render.child_name(job, step)):
            found[step] = child
    return found


def observe(job: Mapping[str, Any], previous: Mapping[str, Any], cluster: Cluster,
            jobs: list[dict[str, Any]] | None = None) -> tuple[dict[str, status.Observed], list[str] | None]:
    """Each step's Job by step name (`jobs`: the MMARJob's Jobs as already known; else listed), and for a step
    that just finished its termination message and, if it failed, why its pod failed (pods are read only
    then). Also the names of the Jobs labelled with this MMARJob's name that are not its own (None when `jobs`
    was given: the watch cache keeps no full account of those). Steps no longer in the spec are observed too
    (their unfinished Job holds the next step back)."""
    namespace = job["metadata"]["namespace"]
    foreign: list[str] | None = None
    if jobs is None:
        jobs = cluster.jobs_of(namespace, contract.name_of(job))
        foreign = [c["metadata"]["name"] for c in jobs if not owned(c, job)]
    recorded = {s.get("name"): s.get("phase") for s in previous.get("steps") or []}
    observed: dict[str, status.Observed] = {}
    for step, child in _step_jobs(job, [c for c in jobs if owned(c, job)]).items():
        name = child["metadata"]["name"]
        message = failure = pod = None
        phase, reason, _ = status.job_phase(child)
        if phase in status.TERMINAL and recorded.get(step) not in status.STEP_FINAL:
            pods = cluster.pods_of(namespace, name)
            message = status.termination_message(pods, phase == status.SUCCEEDED)
            failure = status.pod_failure(pods) if phase == status.FAILED else None
        elif reason == status.POD_STARTING and recorded.get(step) not in status.STEP_FINAL:
            # a Job with a pod that is not ready: running (an init container), starting, or stuck (an image
            # the node cannot pull, no node fits): the pod says which. Its changes make no Job event: the
            # resync brings them (MMAR_OPERATOR_RESYNC_SECONDS)
            pod = status.pod_state(cluster.pods_of(namespace, name))
        observed[step] = status.Observed(job=child, message=message, failure=failure, pod=pod)
    return observed, foreign


def _unfinished(seen: status.Observed) -> bool:
    return seen.job is not None and status.job_phase(seen.job)[0] not in status.TERMINAL


def _sync_suspend(job: Mapping[str, Any], observed: dict[str, status.Observed], cluster: Cluster) -> None:
    """Hold or release the running step's Job as spec.runPolicy.suspend says, and update `observed` to
    match (the status must say what is now true, not what was true before the patch). Jobs queued by
    Kueue are left to Kueue (it owns their suspend field); for those suspend only holds back the next step."""
    if status.queue_of(job):
        return
    want = bool(job["spec"]["runPolicy"]["suspend"])
    final = {s.get("name") for s in (job.get("status") or {}).get("steps") or [] if s.get("phase") in status.STEP_FINAL}
    for step, seen in list(observed.items()):
        if not _unfinished(seen) or step in final:
            continue
        if bool((seen.job.get("spec") or {}).get("suspend")) != want:
            cluster.set_suspend(job["metadata"]["namespace"], seen.job["metadata"]["name"], want)
            child = copy.deepcopy(dict(seen.job))
            child.setdefault("spec", {})["suspend"] = want
            observed[step] = status.Observed(job=child, message=seen.message, failure=seen.failure)


def _expire_recorded(job: Mapping[str, Any], new: Mapping[str, Any], observed: Mapping[str, status.Observed], cluster: Cluster) -> None:
    """Give finished Jobs their runPolicy.ttlSecondsAfterFinished only now that their result is in the
    MMARJob's status: rendered with it, the TTL controller could delete a Job (and its pods, with their
    termination messages) before the operator read the result, and the step's result would be lost.
    Called after the status patch, so an operator killed in between sets it on its next pass."""
    ttl = job["spec"]["runPolicy"].get("ttlSecondsAfterFinished")
    if ttl is None:
        return
    recorded = {s["name"] for s in new.get("steps") or [] if s["phase"] in status.STEP_FINAL}
    for step, seen in observed.items():
        if seen.job is None or step not in recorded or _unfinished(seen):
            continue
        if (seen.job.get("spec") or {}).get("ttlSecondsAfterFinished") is None:
            cluster.set_ttl(job["metadata"]["namespace"], seen.job["metadata"]["name"], ttl)


def _stop_failed(job: Mapping[str, Any], new: Mapping[str, Any], observed: Mapping[str, status.Observed], cluster: Cluster) -> None:
    """Stop the Job of a step recorded Failed while its Job still runs (a pod that did not start within the
    pending timeout): the Job controller ends it (DeadlineExceeded) and deletes its pods; the Job stays, with
    its history. Called after the status patch, so the step is never seen unstarted and created again."""
    failed = {s["name"] for s in new.get("steps") or [] if s["phase"] == status.FAILED}
    for step, seen in observed.items():
        if step not in failed or not _unfinished(seen):
            continue
        if (seen.job.get("spec") or {}).get("activeDeadlineSeconds") != 1:
            cluster.stop_job(job["metadata"]["namespace"], seen.job["metadata"]["name"])


def step_events(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events this reconcile's status change calls for, one per step and
    outcome: a step started, succeeded, was skipped, failed, or cannot start (the kubelet's or the
    scheduler's reason, its name taken). Compared with the status before, so a replayed reconcile posts
    nothing again."""
    before = {s.get("name"): (s.get("phase"), s.get("reason")) for s in previous.get("steps") or []}
    events = []
    for step in current.get("steps") or []:
        phase, reason = step["phase"], step.get("reason")
        if before.get(step["name"]) == (phase, reason):
            continue
        was = (before.get(step["name"]) or (None, None))[0]
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


def condition_events(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """A Warning Event when condition SpecChangeIgnored (an edit of a started step) or ForeignJobsIgnored
    (Jobs of this name that are not this MMARJob's) is first seen True, or says something new."""
    def said(st: Mapping[str, Any], kind: str) -> str | None:
        found = next((c for c in st.get("conditions") or [] if c.get("type") == kind), None)
        return found["message"] if found and found.get("status") == "True" else None

    return [("Warning", kind, said(current, kind)) for kind in (status.SPEC_CHANGE_IGNORED, status.FOREIGN_JOBS_IGNORED)
            if said(current, kind) and said(current, kind) != said(previous, kind)]


class NameTaken(Exception):
    """`reconcile(new=True)` found a child's name taken: something of this MMARJob already exists."""


def _create_step(job: dict[str, Any], index: int, cluster: Cluster, config: Config, metrics: Metrics,
                 new: bool) -> status.Observed:
    """Create step `index`'s objects (the Service before the Job); what the cluster then shows of it."""
    namespace, name = job["metadata"]["namespace"], contract.name_of(job)
    created = refused = None
    for obj in render.render_step(job, index, config):
        what = f"{obj['kind']} {namespace}/{obj['metadata']['name']}"
        try:
            created = cluster.create(obj) if new else cluster.ensure(obj)
        except AdoptionError as error:  # its name is another object's: the step waits, the status says so
            refused = (409, what, str(error))
        except Exception as error:  # noqa: BLE001 - a refusal becomes the step's status, the rest is re-raised
            code_message = refusal(error)
            if code_message is None:
                raise
            refused = (code_message[0], what, code_message[1])
        if refused is not None:
            # one line naming the object, not a traceback: the status and an Event carry the words
            log.warning("MMARJob %s/%s: step %s: cannot create %s (%d): %s", namespace, name,
                        contract.steps_of(job)[index]["name"], what, *refused[::2])
            break
        if created is None:
            raise NameTaken(f"{what} exists")
        metrics.children_created.labels(kind=obj["kind"]).inc()
    return status.Observed(job=None if refused else created, refused=refused)


def reconcile(body: Mapping[str, Any], cluster: Cluster, config: Config, metrics: Metrics, now: str | None = None,
              *, new: bool = False, jobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One idempotent pass over an MMARJob; returns the status it patched. `jobs`: its Jobs as already
    known (else listed).

    `new`: `body` is a just-created MMARJob as its ADDED event shows it (no status): no child of it can exist
    yet, so nothing is read, and a child's name already taken raises NameTaken (nothing is taken over)."""
    body = body if isinstance(body, dict) else plain(body)
    # managedFields: the largest part of a body and of no use here (mmar.job.load deep-copies the body)
    body = {**body, "metadata": {k: v for k, v in body["metadata"].items() if k != "managedFields"}}
    now = now or contract.now_iso()
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    previous = body.get("status") or {}
    job: dict[str, Any] | None = None
    observed: dict[str, status.Observed] = {}
    try:
        job = contract.parse(body)
    except MMARError as error:  # slipped past the schema (or an older CRD): Failed, not a crash loop
        current = status.invalid(body, previous, str(error), now)
    else:
        foreign: list[str] | None = [] if new else None
        if not new:
            observed, foreign = observe(job, previous, cluster, jobs)
            _sync_suspend(job, observed, cluster)
        timeout = config.pending_timeout_seconds
        current = status.compute(job, previous, observed, now, pending_timeout_default=timeout, foreign=foreign)
        index = status.next_step(job, current)
        names = {s["name"] for s in contract.steps_of(job)}
        if any(_unfinished(seen) for step, seen in observed.items() if step not in names):
            index = None  # a step removed from the spec (an older CRD let it) still runs: one step at a time
        if index is not None:
            observed[contract.steps_of(job)[index]["name"]] = _create_step(job, index, cluster, config, metrics, new)
            current = status.compute(job, previous, observed, now, pending_timeout_default=timeout, foreign=foreign)
        metrics.observe_finished(status.finished_steps(previous, current))
    metrics.set_phase(namespace, name, current["phase"])
    if current != previous:
        # a merge patch keeps keys it does not mention: clear the ones the new status dropped
        cluster.patch_status(namespace, name, {**{k: None for k in previous if k not in current}, **current})
        for kind, reason, message in step_events(previous, current) + condition_events(previous, current):
            cluster.post_event(body, kind, reason, message, now)
    if job is not None:
        _expire_recorded(job, current, observed, cluster)
        _stop_failed(job, current, observed, cluster)
    return current


def reconcile_guarded(body: Mapping[str, Any], state: OperatorState) -> dict[str, Any] | None:
    """Reconcile the MMARJob as the API server has it now (an event's body may be stale: an old status
    could make a finished step whose Job was garbage-collected look unstarted), one at a time."""
    meta = body["metadata"]
    if not state.enqueue(meta["namespace"], meta["name"]):
        return None
    with state.lock(meta["namespace"], meta["name"]):
        state.started(meta["namespace"], meta["name"])
        return _reconcile_fresh(meta["namespace"], meta["name"], state)


def _reconcile_fresh(namespace: str, name: str, state: OperatorState) -> dict[str, Any] | None:
    """Read the MMARJob, reconcile it (its lock held by the caller)."""
    with _failures_counted(namespace, name, state):
        fresh = state.cluster.get_mmarjob(namespace, name)
        if fresh is None or (fresh.get("metadata") or {}).get("deletionTimestamp"):
            state.cache.left_status(namespace, name, None)
            return None  # deleted: its children go with it
        current = reconcile(fresh, state.cluster, state.config, state.metrics)
        state.cache.left_status(namespace, name, current)
        return current


def reconcile_known(namespace: str, name: str, state: OperatorState) -> dict[str, Any] | None:
    """Reconcile an MMARJob from what this process knows (`WatchCache`: the watch's bodies, the status we
    left), one at a time; read from the API server (`reconcile_guarded`) when it knows too little."""
    if not state.enqueue(namespace, name):
        return None
    with state.lock(namespace, name):
        state.started(namespace, name)
        known = state.cache.mmarjob(namespace, name)
        if known is None:
            return _reconcile_fresh(namespace, name, state)
        body, jobs = known
        if body["metadata"].get("deletionTimestamp"):
            return None
        with _failures_counted(namespace, name, state):
            current = reconcile(body, state.cluster, state.config, state.metrics, jobs=jobs)
            state.cache.left_status(namespace, name, current)
            return current


def reconcile_new(body: Mapping[str, Any], state: OperatorState) -> dict[str, Any] | None:
    """A just-created MMARJob (its ADDED event, no status): its first step's objects are created from the
    event's body, with no read of the MMARJob or its Jobs (the body cannot be stale in the way
    `reconcile_guarded` fears: there is no status yet to be old). When a name is taken (a reconcile that got
    there first, or another object), the full reconcile decides."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    with state.lock(namespace, name):
        try:
            with _failures_counted(namespace, name, state):
                current = reconcile(body, state.cluster, state.config, state.metrics, new=True)
                state.cache.left_status(namespace, name, current)
                return current
        except NameTaken:
            return _reconcile_fresh(namespace, name, state)


class _failures_counted:  # noqa: N801 - used as a `with` block, like contextlib's
    """Count and log a failed reconcile, remember it for the resync to retry, and raise it as kopf's
    TemporaryError; a success clears the retry. NameTaken passes through (not a failure)."""

    def __init__(self, namespace: str, name: str, state: OperatorState):
        self.key, self.state = (namespace, name), state

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: BaseException | None, _tb: Any) -> bool:
        if error is None:
            self.state.failed.discard(self.key)
            return False
        if isinstance(error, NameTaken) or not isinstance(error, Exception):
            return False
        self.state.failed.add(self.key)
        self.state.cache.left_status(*self.key, None)  # a patch may or may not have landed
        self.state.metrics.reconcile_errors.inc()
        log.error("reconcile of %s/%s failed", *self.key, exc_info=(kind, error, _tb))
        raise kopf.TemporaryError(f"reconcile failed: {error}", delay=15) from error


def forget(namespace: str, name: str, state: OperatorState, uid: str | None = None) -> None:
    """The MMARJob is gone; its Jobs and Services go with it through their ownerReferences."""
    state.metrics.set_phase(namespace, name, None)
    state.failed.discard((namespace, name))
    state.refused.pop((namespace, name), None)
    state.cache.forget(namespace, name)
    if uid:
        state.events.forget(uid)


async def resync(index: Mapping[tuple[str, str], Any], interval: float, state: OperatorState) -> None:
    """A safety net for a missed watch event and the retry of a failed reconcile: every `interval` seconds,
    reconcile each unfinished MMARJob and each whose last reconcile failed (one at a time, in the thread
    pool). Finished MMARJobs are not touched again unless they fail."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        for namespace, name in {*index, *state.failed}:  # a snapshot: both change while we await
            if not state.retry_due((namespace, name), time.monotonic()):
                continue  # its step's create was refused (a quota, a name taken): retried with back-off
            try:
                current = await loop.run_in_executor(None, reconcile_guarded, {"metadata": {"namespace": namespace, "name": name}}, state)
            except kopf.TemporaryError:
                continue  # logged and counted by reconcile_guarded; the next round retries
            state.after_retry((namespace, name), current, interval, time.monotonic())
