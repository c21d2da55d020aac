"""Pure: the observed child Jobs (and their pods' termination messages) -> the MMARJob's status.

Nothing here talks to the API server; `handlers` observes, calls `compute`, and `apply` patches.
A step that finished keeps its recorded status even after its Job is gone (ttlSecondsAfterFinished), so
the status, not the children, is the memory of what has already run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from mmar import job as contract

from mmar_operator.render import CONTAINER, child_name

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = "Pending", "Running", "Succeeded", "Failed", "Suspended"
WAITING = "Waiting"  # a step whose Job is not created yet
TERMINAL = (SUCCEEDED, FAILED)
CONDITION_TYPES = (RUNNING, SUSPENDED, SUCCEEDED, FAILED)
MESSAGE_MAX = 512


@dataclass(frozen=True)
class Observed:
    """What the cluster shows of one step: its Job (or None) and its result's termination message."""

    job: Mapping[str, Any] | None = None
    message: str | None = None


def _conditions_of(obj: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return {c.get("type"): c for c in conditions if c.get("status") == "True"}


def job_phase(child: Mapping[str, Any]) -> tuple[str, str, str]:
    """(phase, reason, message) of a batch/v1 Job."""
    true = _conditions_of(child)
    status = child.get("status") or {}
    if "Complete" in true:
        return SUCCEEDED, "Completed", true["Complete"].get("message") or ""
    if "Failed" in true:
        c = true["Failed"]
        return FAILED, c.get("reason") or "JobFailed", c.get("message") or ""
    if (child.get("spec") or {}).get("suspend"):
        return SUSPENDED, "JobSuspended", "the Job is suspended (by the MMARJob or by a Kueue queue)"
    if status.get("active") or status.get("startTime"):
        return RUNNING, "JobRunning", ""
    return PENDING, "JobCreated", ""


def termination_message(pods: Iterable[Mapping[str, Any]], succeeded: bool) -> str | None:
    """The `mmar` container's termination message from the pod that reports the result.

    Only rank 0 (completion index 0, or the only pod) writes the result; among retries take the pod that
    matches the Job's outcome, latest first.
    """
    candidates = []
    for pod in pods:
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        if annotations.get("batch.kubernetes.io/job-completion-index", "0") != "0":
            continue
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (cs.get("state") or {}).get("terminated")
            if cs.get("name") == CONTAINER and terminated:
                ok = terminated.get("exitCode") == 0
                candidates.append((ok == succeeded, str(terminated.get("finishedAt") or ""), terminated.get("message")))
    if not candidates:
        return None
    return max(candidates, key=lambda c: (c[0], c[1]))[2]


def _step_message(reason_message: str, raw: str | None, result: Mapping[str, Any] | None) -> str:
    parts = [reason_message] if reason_message else []
    if result and result.get("error"):
        parts.append(str(result["error"]))
    elif raw and result is None:  # FallbackToLogsOnError: the log tail of a crash
        tail = [line for line in raw.strip().splitlines() if line.strip()]
        if tail:
            parts.append(tail[-1])
    return "; ".join(parts)[:MESSAGE_MAX]


def _set_condition(previous: Iterable[Mapping[str, Any]], kind: str, true: bool, reason: str, message: str,
                   now: str, generation: int | None) -> dict[str, Any]:
    status = "True" if true else "False"
    old = next((c for c in previous if c.get("type") == kind), None)
    moved = old is None or old.get("status") != status
    condition = {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message[:MESSAGE_MAX],
        "lastTransitionTime": now if moved else old.get("lastTransitionTime", now),
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def compute(job: Mapping[str, Any], previous: Mapping[str, Any] | None, observed: Mapping[int, Observed], now: str) -> dict[str, Any]:
    """The MMARJob status from the spec, the previous status and what each step's Job shows now."""
    previous = dict(previous or {})
    generation = job["metadata"].get("generation")
    remembered = {s.get("jobName"): s for s in previous.get("steps") or []}
    results: dict[str, Any] = dict(previous.get("results") or {})
    steps: list[dict[str, Any]] = []

    for index, step in enumerate(contract.steps_of(job)):
        name = child_name(job, index)
        old = remembered.get(name)
        if old and old.get("phase") in TERMINAL:
            steps.append(dict(old))  # finished: never re-evaluated, even if its Job was garbage-collected
            continue
        seen = observed.get(index) or Observed()
        entry: dict[str, Any] = {"name": step["name"], "type": step["type"], "jobName": name, "phase": WAITING}
        if seen.job is not None:
            phase, reason, message = job_phase(seen.job)
            child_status = seen.job.get("status") or {}
            entry.update(phase=phase, reason=reason)
            if child_status.get("startTime"):
                entry["startTime"] = child_status["startTime"]
            if phase in TERMINAL:
                result = contract.parse_result(seen.message)
                entry["completionTime"] = child_status.get("completionTime") or (_conditions_of(seen.job).get("Complete" if phase == SUCCEEDED else "Failed") or {}).get("lastTransitionTime") or now
                entry.setdefault("startTime", entry["completionTime"])
                if result is not None:
                    entry["result"] = result
                    if phase == SUCCEEDED:
                        results = contract.merge_results(results, step["type"], result)
                message = _step_message(message, seen.message, result) if phase == FAILED else message
            if message:
                entry["message"] = message[:MESSAGE_MAX]
        steps.append(entry)

    status = _summarize(job, previous, steps, now, generation)
    status["results"] = results
    return status


def _summarize(job: Mapping[str, Any], previous: Mapping[str, Any], steps: list[dict[str, Any]], now: str, generation: int | None) -> dict[str, Any]:
    failed = next((s for s in steps if s["phase"] == FAILED), None)
    current = next((s for s in steps if s["phase"] != SUCCEEDED), None)
    suspended = bool(job["spec"]["runPolicy"]["suspend"])
    if failed is not None:
        phase, reason, message = FAILED, "StepFailed", f"step {failed['name']} failed" + (f": {failed['message']}" if failed.get("message") else "")
    elif current is None:
        phase, reason, message = SUCCEEDED, "AllStepsSucceeded", f"{len(steps)} step(s) succeeded"
    elif suspended:
        phase, reason, message = SUSPENDED, "Suspended", f"suspended before step {current['name']} completed (spec.runPolicy.suspend)"
    elif current["phase"] == RUNNING or any(s["phase"] == SUCCEEDED for s in steps):
        phase, reason, message = RUNNING, "StepRunning", f"step {current['name']} is {current['phase'].lower()}"
    elif current["phase"] == SUSPENDED:
        phase, reason, message = PENDING, "Queued", f"step {current['name']} waits for admission (its Job is suspended, e.g. by Kueue)"
    else:
        phase, reason, message = PENDING, "StepPending", f"step {current['name']} is {current['phase'].lower()}"

    old_conditions = previous.get("conditions") or []
    conditions = [
        _set_condition(old_conditions, kind, phase == kind, reason if phase == kind else f"Not{kind}", message if phase == kind else "", now, generation)
        for kind in CONDITION_TYPES
    ]
    status: dict[str, Any] = {
        "phase": phase,
        "observedGeneration": generation,
        "currentStep": (failed or current or steps[-1])["name"],
        "conditions": conditions,
        "steps": steps,
        "message": message[:MESSAGE_MAX],
    }
    starts = [s["startTime"] for s in steps if s.get("startTime")]
    if previous.get("startTime") or starts:
        status["startTime"] = previous.get("startTime") or min(starts)
    if phase in TERMINAL:
        status["completionTime"] = previous.get("completionTime") or now
    if generation is None:
        del status["observedGeneration"]
    return status


def invalid(job_body: Mapping[str, Any], previous: Mapping[str, Any] | None, error: str, now: str) -> dict[str, Any]:
    """Status for a spec that slipped past the schema but fails `mmar.job.validate`: Failed, no crash loop."""
    previous = dict(previous or {})
    generation = (job_body.get("metadata") or {}).get("generation")
    message = f"invalid spec: {error}"
    conditions = [
        _set_condition(previous.get("conditions") or [], kind, kind == FAILED, "InvalidSpec" if kind == FAILED else f"Not{kind}",
                       message if kind == FAILED else "", now, generation)
        for kind in CONDITION_TYPES
    ]
    status = {"phase": FAILED, "conditions": conditions, "message": message[:MESSAGE_MAX],
              "steps": previous.get("steps") or [], "results": previous.get("results") or {},
              "completionTime": previous.get("completionTime") or now}
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def next_step(job: Mapping[str, Any], status: Mapping[str, Any]) -> int | None:
    """The index of the step whose Job should be created now: the first one not created yet, once every
    step before it succeeded; None while one runs, after a failure, when done, or while suspended."""
    if status.get("phase") in TERMINAL or job["spec"]["runPolicy"]["suspend"]:
        return None
    for index, step in enumerate(status.get("steps") or []):
        if step["phase"] == SUCCEEDED:
            continue
        return index if step["phase"] == WAITING else None
    return None


def finished_steps(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Steps that reached Succeeded/Failed in this reconcile (for metrics: observed exactly once)."""
    before = {s.get("jobName"): s.get("phase") for s in (previous or {}).get("steps") or []}
    return [s for s in current.get("steps") or [] if s["phase"] in TERMINAL and before.get(s["jobName"]) not in TERMINAL]
