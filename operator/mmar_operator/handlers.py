"""kopf handlers: a few lines each, saying which MMARJob to reconcile (`reconcile`) and when.

Every trigger (MMARJob created, seen first after an operator restart, spec or labels edited, a child Job
changed, a periodic resync) runs the same idempotent `reconcile.reconcile`. MMARJobs are watched with
kopf.on.event (`event_filter` tells the cases apart); a child Job's event is reconciled from the watch cache
(`watch_cache`); the operator's state (API wrapper, settings, metrics, the per-MMARJob work queue) is
`state.OperatorState`, one per process (`STATE`, replaced by tests).

No handler here makes kopf add a finalizer (no timers or daemons, the delete handler is optional):
deleting an MMARJob is never blocked, even while no operator runs. The periodic resync is therefore not a
kopf timer but one task that walks an in-memory index of the unfinished MMARJobs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Mapping

import kopf

from mmar_operator import reconcile, render
from mmar_operator.apply import GROUP, PLURAL, VERSION, Cluster
from mmar_operator.event_filter import CREATED, uid_of
from mmar_operator.state import OperatorState

log = logging.getLogger(__name__)

STATE = OperatorState()


@kopf.on.startup()
def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    """kopf's settings, all of them here."""
    if STATE.cluster is None:
        STATE.cluster = Cluster.from_kubeconfig()
    # handler threads: a reconcile is a few API round trips and little CPU, so 100 MMARJobs applied at once
    # would queue behind kopf's default min(32, CPUs + 4) threads (config.Config.workers, docs/operator.md)
    settings.execution.max_workers = STATE.config.workers
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
        reconcile.forget(meta["namespace"], meta["name"], STATE, uid=uid_of(meta))
        return
    STATE.cache.saw_mmarjob(body)
    trigger = STATE.events.classify(type, body)
    if trigger == CREATED:
        reconcile.reconcile_new(body, STATE)
    elif trigger is not None:  # seen first after a start, or its spec/labels edited
        reconcile.reconcile_guarded(body, STATE)


def _unfinished(status: Mapping[str, Any] | None, **_: Any) -> bool:
    return (status or {}).get("phase") not in ("Succeeded", "Failed")


# The unfinished MMARJobs, kept by kopf from its watch (an object leaves the index when it stops matching
# `when` or is deleted). Indexing adds no finalizer; a kopf timer would (kopf needs one to stop a timer
# before its object goes), and that finalizer would hold every deletion until an operator runs again.
@kopf.index(GROUP, VERSION, PLURAL, when=_unfinished)
def unfinished_mmarjobs(namespace: str, name: str, **_: Any) -> dict[tuple[str, str], None]:
    return {(namespace, name): None}


@kopf.on.startup()
async def _start_resync(memo: kopf.Memo, unfinished_mmarjobs: kopf.Index, **_: Any) -> None:
    memo["resync"] = asyncio.get_running_loop().create_task(
        reconcile.resync(unfinished_mmarjobs, STATE.config.resync_seconds, STATE))


@kopf.on.cleanup()
async def _stop_resync(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("resync")
    if task is not None:
        task.cancel()


@kopf.on.event("batch", "v1", "jobs", labels={render.LABEL_JOB: kopf.PRESENT}, id="child-job")
def _on_child(event: Mapping[str, Any], **_: Any) -> None:
    type, body = event["type"], event["object"]  # noqa: A001
    meta = body["metadata"]
    namespace, parent, cluster = meta["namespace"], meta["labels"][render.LABEL_JOB], STATE.cluster
    if cluster is None:
        return
    STATE.cache.saw_job(body, deleted=type == "DELETED")
    if type == "DELETED":
        cluster.forget_job(namespace, meta["name"])
    elif cluster.is_own_create(namespace, meta["name"], meta.get("resourceVersion")):
        return  # the echo of the create: the reconcile that made it has put it in the status already
    reconcile.reconcile_known(namespace, parent, STATE)


@kopf.on.probe(id="reconciler")
def _probe(**_: Any) -> str:
    """/healthz: ok once the API server has answered this process (a reconcile, or this probe's own
    request); before that a PermanentError makes kopf answer 500 (no retry inside the probe), so an operator
    that cannot reach the API server is never Ready."""
    cluster = STATE.cluster
    if cluster is None:
        raise kopf.PermanentError("starting: no API client yet")
    try:
        cluster.ping()
    except Exception as error:  # noqa: BLE001 - any failure means not reached; said in the probe's answer
        raise kopf.PermanentError(f"the API server has not answered yet: {error}") from error
    return "ok"
