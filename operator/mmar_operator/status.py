"""Pure: the observed child Jobs (and their pods' termination messages) -> the MMARJob's status.

Nothing here talks to the API server; `handlers` observes, calls `compute`, and `apply` patches.
A step that finished keeps its recorded status even after its Job is gone (ttlSecondsAfterFinished), so
the status, not the children, is the memory of what has already run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Mapping

from mmar import job as contract
from mmar import results as result_contract
from mmar.job import outcome
# a step's and the job's phases, shared with `mmar run` (mmar.job.outcome: the one job-outcome rule)
from mmar.job.outcome import DONE, FAILED, NOT_RUN, PENDING, RUNNING, SKIPPED, SUCCEEDED, SUSPENDED, WAITING  # noqa: F401

from mmar_operator.render import CONTAINER, KUEUE_PREFIX, SPEC_HASH, child_name, passthrough_labels, spec_hash

TERMINAL = (SUCCEEDED, FAILED)
STEP_FINAL = (SUCCEEDED, FAILED, SKIPPED)  # a step's phase that never changes again
CONDITION_TYPES = (RUNNING, SUSPENDED, SUCCEEDED, FAILED)
SPEC_CHANGE_IGNORED = "SpecChangeIgnored"  # an edit to a step that started: not applied (see `ignored_edits`)
# A step's Job (or Service) name is taken by an object that is not this MMARJob's (another owner, or none):
# the step waits (Pending, reason ChildNameConflict) and the create is retried; never adopted
CHILD_NAME_CONFLICT = "ChildNameConflict"
# Jobs labelled with this MMARJob's name that are not its own (left by a deleted MMARJob of the same name,
# `kubectl delete --cascade=orphan`): never taken as this MMARJob's results, never adopted, left alone
FOREIGN_JOBS_IGNORED = "ForeignJobsIgnored"
MESSAGE_MAX = 512
# A pod's waiting reasons that are part of every start, not a problem (the pod is being set up)
STARTING = (None, "", "PodInitializing", "ContainerCreating")
# The step's and the job's reason while its Job exists but no pod of it runs yet, for no known problem
POD_STARTING = "PodStarting"
# How long a step's pod may stay unstartable (image not pullable, unschedulable, a missing Secret or
# claim) before the step fails with that reason: spec.runPolicy.pendingTimeoutSeconds, else the operator's
# MMAR_OPERATOR_PENDING_TIMEOUT_SECONDS (config.Config.pending_timeout_seconds)
DEFAULT_PENDING_TIMEOUT = 600
# A step whose Job the API server refused to create: Failed when the object itself is invalid (422),
# Pending while a policy forbids it (403: a ResourceQuota, RBAC), retried until it is created
JOB_CREATE_FAILED = "JobCreateFailed"
RETRIED_CREATE = (403,)


@dataclass(frozen=True)
class Observed:
    """What the cluster shows of one step: its Job (or None), its result's termination message and, for a
    failed step, why its pod failed in the failing container's own words (`pod_failure`)."""

    job: Mapping[str, Any] | None = None
    message: str | None = None
    failure: str | None = None
    # for an unfinished step whose Job has no ready pod: what its pods show (`pod_state`)
    pod: "PodState | None" = None
    # for a step whose Job (or Service) the API server refused to create: (HTTP status, "Job ns/name", its
    # message); 409: its name is taken by an object that is not this MMARJob's (CHILD_NAME_CONFLICT)
    refused: "tuple[int, str, str] | None" = None


@dataclass(frozen=True)
class PodState:
    """An unfinished step's pod as the kubelet and the scheduler describe it: `running` (a container or an
    init container runs), or why it does not run yet (`reason`, `message`; reason None: starting, no
    problem known) and since when (`since`, RFC 3339)."""

    running: bool
    reason: str | None = None
    message: str = ""
    since: str | None = None


def _timestamp(pod: Mapping[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("creationTimestamp") or "")


def pod_state(pods: Iterable[Mapping[str, Any]]) -> PodState | None:
    """What keeps an unfinished step's newest live pod from running, in the kubelet's or the scheduler's
    words: `PodScheduled=False` (Unschedulable: Insufficient cpu, an unbound or missing claim), else a
    container's waiting reason other than the ones of every start (ErrImageNeverPull, ImagePullBackOff,
    ErrImagePull, CreateContainerConfigError, ...), init containers first. None: no live pod."""
    live = [p for p in pods if (p.get("status") or {}).get("phase") in (None, PENDING, RUNNING)
            and not (p.get("metadata") or {}).get("deletionTimestamp")]
    if not live:
        return None
    if any((p.get("status") or {}).get("phase") == RUNNING for p in live):
        return PodState(running=True)
    pod = max(live, key=_timestamp)
    st = pod.get("status") or {}
    since = rfc3339((pod.get("metadata") or {}).get("creationTimestamp")) or None
    for condition in st.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return PodState(False, condition.get("reason") or "Unschedulable", condition.get("message") or "",
                            rfc3339(condition.get("lastTransitionTime")) or since)
    for statuses, init in ((st.get("initContainerStatuses"), True), (st.get("containerStatuses"), False)):
        for cs in statuses or []:
            state = cs.get("state") or {}
            if init and state.get("running"):
                return PodState(running=True)  # `mmar init` runs: the step's work has started
            waiting = state.get("waiting")
            if waiting and waiting.get("reason") not in STARTING:
                what = f"{'init container' if init else 'container'} {cs.get('name')}"
                return PodState(False, waiting["reason"], f"{what}: {waiting.get('message') or waiting['reason']}", since)
    return PodState(False, None, "", since)


def _plus_seconds(start: str, seconds: int) -> str:
    try:
        return rfc3339(datetime.fromisoformat(str(rfc3339(start)).replace("Z", "+00:00")) + timedelta(seconds=seconds))
    except ValueError:
        return f"{seconds} s after {start}"


def _seconds_between(start: str | None, end: str) -> float:
    try:
        a = datetime.fromisoformat(str(rfc3339(start)).replace("Z", "+00:00"))
        b = datetime.fromisoformat(str(rfc3339(end)).replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (b - a).total_seconds()


def rfc3339(value: Any) -> Any:
    """A timestamp as RFC 3339 UTC with `Z` (what the API server writes), whatever form it came in: a
    datetime, or text with `+00:00` (the client's serialization) or fractional seconds. Other values pass."""
    if isinstance(value, str) and value:
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return value


def queue_of(job: Mapping[str, Any]) -> str | None:
    """The Kueue LocalQueue an MMARJob's Jobs are submitted to (its `kueue.x-k8s.io/queue-name` label)."""
    return passthrough_labels(job).get(f"{KUEUE_PREFIX}queue-name")


def _conditions_of(obj: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return {c.get("type"): c for c in conditions if c.get("status") == "True"}


def job_phase(child: Mapping[str, Any], queue: str | None = None) -> tuple[str, str, str]:
    """(phase, reason, message) of a batch/v1 Job; `queue`: the Kueue queue it was submitted to, if any
    (Kueue owns such a Job's suspend field: suspended means not admitted yet)."""
    true = _conditions_of(child)
    status = child.get("status") or {}
    if "Complete" in true:
        return SUCCEEDED, "Completed", true["Complete"].get("message") or ""
    if "Failed" in true:
        c = true["Failed"]
        return FAILED, c.get("reason") or "JobFailed", c.get("message") or ""
    if (child.get("spec") or {}).get("suspend"):
        if queue:
            return PENDING, "Queued", f"its Job waits for admission by Kueue (queue {queue})"
        return SUSPENDED, "JobSuspended", "its Job is suspended (spec.runPolicy.suspend)"
    if "ready" in status:
        # Kubernetes counts ready pods (1.24+): the Job controller sets `active` and `startTime` as soon as
        # it created a pod, while that pod may still be Pending (unpullable image, unschedulable): only a
        # ready pod means the step runs. A Job between two pods (one ended, the next not created) still runs.
        if status["ready"]:
            return RUNNING, "JobRunning", ""
        if status.get("active"):
            return PENDING, POD_STARTING, "its Job's pod is not running yet"
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


def _own_words(message: str | None) -> str | None:
    """A container's termination message as one line: its result's `error` (a convert's `first_error`: the
    first failed case's words), else (FallbackToLogsOnError: the log tail of a crash) the last `error:` line or
    the last line."""
    result = result_contract.decode(message)
    if result is not None:
        words = result.get("error") or result.get("first_error")
        return str(words) if words else None
    return result_contract.error_line(message)


def _container_failure(cs: Mapping[str, Any], init: bool) -> str | None:
    state = cs.get("state") or {}
    what = f"{'init container' if init else 'container'} {cs.get('name')}"
    terminated = state.get("terminated")
    if terminated and terminated.get("exitCode") not in (0, None):
        code, reason = terminated.get("exitCode"), terminated.get("reason") or ""
        if reason in ("", "Error"):
            how = f"exited with code {code}"
        elif reason == "OOMKilled":
            how = f"was OOMKilled (exit code {code})"
        else:  # StartError, ContainerCannotRun, DeadlineExceeded...
            how = f"failed ({reason}, exit code {code})"
        words = _own_words(terminated.get("message"))
        return f"{what} {how}" + (f": {words}" if words else "")
    waiting = state.get("waiting")
    if waiting and waiting.get("reason") not in (None, "PodInitializing", "ContainerCreating"):
        return f"{what} could not start ({waiting['reason']})" + (f": {waiting['message']}" if waiting.get("message") else "")
    return None


def pod_failure(pods: Iterable[Mapping[str, Any]]) -> str | None:
    """Why a failed step's pod failed, in the failing container's own words, from the latest failed pod:
    an init container (`mmar init`) first, as it runs first, then the main one; or the pod's own reason
    (evicted, deadline). The Job's condition alone says only "Job has reached the specified backoff limit"."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == FAILED]
    for pod in sorted(failed, key=_finished_at, reverse=True):
        st = pod.get("status") or {}
        for statuses, init in ((st.get("initContainerStatuses"), True), (st.get("containerStatuses"), False)):
            for cs in statuses or []:
                found = _container_failure(cs, init)
                if found:
                    return found[:MESSAGE_MAX]
        if st.get("reason") or st.get("message"):
            return "; ".join(x for x in (st.get("reason"), st.get("message")) if x)[:MESSAGE_MAX]
    return None


def _finished_at(pod: Mapping[str, Any]) -> str:
    st = pod.get("status") or {}
    times = [str(((cs.get("state") or {}).get("terminated") or {}).get("finishedAt") or "")
             for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or [])]
    return max(times, default="")


def _step_message(reason_message: str, failure: str | None, raw: str | None) -> str:
    """A failed step's message: the Job's reason, then the failing container's own words."""
    detail = failure or _own_words(raw)
    return "; ".join(part for part in (reason_message, detail) if part)[:MESSAGE_MAX]


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
        "lastTransitionTime": now if moved else rfc3339(old.get("lastTransitionTime", now)),
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def pending_timeout(job: Mapping[str, Any], default: int = DEFAULT_PENDING_TIMEOUT) -> int:
    """Seconds a step's pod may stay unstartable before the step fails: the MMARJob's
    spec.runPolicy.pendingTimeoutSeconds, else the operator's default."""
    return int(job["spec"]["runPolicy"].get("pendingTimeoutSeconds") or default)


def _pending(entry: dict[str, Any], pod: PodState | None, timeout: int, now: str) -> None:
    """A step whose Job has no ready pod: Running if a container of its pod runs; Pending with the kubelet's
    or the scheduler's reason while it cannot start; Failed with that reason once that lasted `timeout` s."""
    if pod is None:
        return
    if pod.running:
        entry.update(phase=RUNNING, reason="JobRunning")
        entry.pop("message", None)
        return
    if pod.reason is None:
        return
    waited = _seconds_between(pod.since, now)
    if waited >= timeout:
        entry.update(phase=FAILED, reason=pod.reason, completionTime=now,
                     message=f"its pod did not start within {timeout} s (spec.runPolicy.pendingTimeoutSeconds): "
                             f"{pod.reason}: {pod.message}"[:MESSAGE_MAX])
        entry.setdefault("startTime", now)
    else:  # words that stay the same from one reconcile to the next: no status patch while nothing changes
        deadline = _plus_seconds(pod.since, timeout) if pod.since else f"{timeout} s"
        entry.update(phase=PENDING, reason=pod.reason,
                     message=f"its pod cannot start (the step fails at {deadline}, spec.runPolicy.pendingTimeoutSeconds "
                             f"{timeout}): {pod.reason}: {pod.message}"[:MESSAGE_MAX])


def job_name_of(seen: "Observed | None") -> str | None:
    return (((seen.job if seen else None) or {}).get("metadata") or {}).get("name")


def compute(job: Mapping[str, Any], previous: Mapping[str, Any] | None, observed: Mapping[str, Observed], now: str,
            *, pending_timeout_default: int = DEFAULT_PENDING_TIMEOUT, foreign: Iterable[str] | None = None) -> dict[str, Any]:
    """The MMARJob status from the spec, the previous status and what each step's Job shows now (`observed`,
    by step name: a step's name is its identity, its index is not). A step recorded as finished is matched by
    its name, whatever its Job was called (an older operator named Jobs `<mmarjob>-<index>-<step>`).
    `pending_timeout_default`: the operator's default of spec.runPolicy.pendingTimeoutSeconds. `foreign`: the
    names of Jobs labelled with this MMARJob's name that are not its own (None: not looked at this time)."""
    previous = dict(previous or {})
    generation = job["metadata"].get("generation")
    remembered = {s.get("name"): s for s in previous.get("steps") or []}
    results: dict[str, Any] = dict(previous.get("results") or {})
    steps: list[dict[str, Any]] = []
    queue = queue_of(job)
    blocked: dict[str, Any] | None = None  # the step whose gate skipped it: every later step is skipped too
    failed_at: str | None = None  # the first failed step: every later step not started is NotRun

    for step in contract.steps_of(job):
        seen = observed.get(step["name"]) or Observed()
        name = job_name_of(seen) or child_name(job, step["name"])
        old = remembered.get(step["name"])
        if blocked is not None and (old is None or old.get("phase") not in STEP_FINAL):
            steps.append({"name": step["name"], "type": step["type"], "jobName": name, **outcome.skipped_after(blocked["name"])})
            continue
        if old and old.get("phase") in STEP_FINAL:
            if old.get("phase") == SKIPPED and blocked is None:
                blocked = old
            if old.get("phase") == FAILED and failed_at is None:
                failed_at = old["name"]
            # finished: never re-evaluated, even if its Job was garbage-collected
            steps.append({**old, **{k: rfc3339(old[k]) for k in ("startTime", "completionTime") if old.get(k)}})
            continue
        if failed_at is not None and seen.job is None:  # after a failed step: never runs (as `mmar run` records it)
            steps.append({"name": step["name"], "type": step["type"], "jobName": name, **outcome.not_run(failed_at)})
            continue
        entry: dict[str, Any] = {"name": step["name"], "type": step["type"], "jobName": name, "phase": WAITING}
        if seen.job is not None:
            phase, reason, message = job_phase(seen.job, queue)
            child_status = seen.job.get("status") or {}
            entry.update(phase=phase, reason=reason)
            if child_status.get("startTime"):
                entry["startTime"] = rfc3339(child_status["startTime"])
            if phase in TERMINAL:
                result = result_contract.decode(seen.message)
                finished = child_status.get("completionTime") or (_conditions_of(seen.job).get("Complete" if phase == SUCCEEDED else "Failed") or {}).get("lastTransitionTime") or now
                entry["completionTime"] = rfc3339(finished)
                entry.setdefault("startTime", entry["completionTime"])
                if result is not None:
                    entry["result"] = result
                    if phase == SUCCEEDED:
                        results = result_contract.fold(results, step["type"], result)
                gate = outcome.skipped_by_gate(result) if phase == SUCCEEDED else None
                if gate is not None:
                    skipped = outcome.gate_skipped(gate)
                    entry.update(phase=skipped["phase"], reason=skipped["reason"])
                    message = skipped["message"]
                    blocked = entry
                message = _step_message(message, seen.failure, seen.message) if phase == FAILED else message
            if message:
                entry["message"] = message[:MESSAGE_MAX]
            if phase == PENDING and reason == POD_STARTING:
                _pending(entry, seen.pod, pending_timeout(job, pending_timeout_default), now)
        elif seen.refused is not None:
            code, what, words = seen.refused
            if code == 409:
                entry.update(phase=PENDING, reason=CHILD_NAME_CONFLICT,
                             message=f"{words}; retried until the name is free"[:MESSAGE_MAX])
            elif code in RETRIED_CREATE:
                entry.update(phase=PENDING, reason=JOB_CREATE_FAILED,
                             message=f"the API server refused to create {what} ({code}); retried until it is created: {words}"[:MESSAGE_MAX])
            else:
                entry.update(phase=FAILED, reason=JOB_CREATE_FAILED, startTime=now, completionTime=now,
                             message=f"the API server refused to create {what} ({code}): {words}"[:MESSAGE_MAX])
        if entry["phase"] == FAILED and failed_at is None:
            failed_at = step["name"]
        steps.append(entry)

    status = _summarize(job, previous, steps, now, generation)
    status["results"] = results
    for extra in (_spec_condition(job, previous, observed, now, generation),
                  _conflict_condition(previous, steps, now, generation),
                  _foreign_condition(previous, foreign, now, generation)):
        if extra is not None:
            status["conditions"].append(extra)
    return status


def ignored_edits(job: Mapping[str, Any], observed: Mapping[str, Observed]) -> list[tuple[str, str]]:
    """(step name, Job name) of each step whose Job exists and was made from another spec than the step's
    now (`render.spec_hash`, kept on the Job): the edit is not applied to it (a started step runs with the
    spec it started with). Jobs made before the hash was kept say nothing."""
    found = []
    for index, step in enumerate(contract.steps_of(job)):
        seen = observed.get(step["name"])
        made_from = (((seen.job if seen else None) or {}).get("metadata") or {}).get("annotations", {}) or {}
        if made_from.get(SPEC_HASH) and made_from[SPEC_HASH] != spec_hash(job, index):
            found.append((step["name"], job_name_of(seen) or child_name(job, step["name"])))
    return found


def _flag(previous: Mapping[str, Any], kind: str, message: str | None, reasons: tuple[str, str], now: str,
          generation: int | None) -> dict[str, Any] | None:
    """A condition that is True with `message` while there is something to say; False (`reasons[1]`) once
    there is nothing, if it was ever there; absent otherwise."""
    old_conditions = previous.get("conditions") or []
    if message:
        return _set_condition(old_conditions, kind, True, reasons[0], message, now, generation)
    if any(c.get("type") == kind for c in old_conditions):
        return _set_condition(old_conditions, kind, False, reasons[1], "", now, generation)
    return None


def _spec_condition(job: Mapping[str, Any], previous: Mapping[str, Any], observed: Mapping[str, Observed], now: str,
                    generation: int | None) -> dict[str, Any] | None:
    """Condition SpecChangeIgnored: True while a step's Job runs (or ran) with a spec edited since."""
    ignored = ignored_edits(job, observed)
    message = None
    if ignored:
        steps = ", ".join(f"{name} (Job {job_name})" for name, job_name in ignored)
        message = (f"the spec was edited (generation {generation}) after step(s) {steps} started: they run with the spec they "
                   f"started with; edits apply only to steps not yet started (delete and re-create the MMARJob to run them again)")
    return _flag(previous, SPEC_CHANGE_IGNORED, message, ("StepAlreadyStarted", "NoStartedStepEdited"), now, generation)


def _conflict_condition(previous: Mapping[str, Any], steps: list[dict[str, Any]], now: str,
                        generation: int | None) -> dict[str, Any] | None:
    """Condition ChildNameConflict: True while a step waits for its child's name, taken by another object."""
    conflict = next((s for s in steps if s.get("reason") == CHILD_NAME_CONFLICT), None)
    message = f"step {conflict['name']}: {conflict.get('message', '')}" if conflict else None
    return _flag(previous, CHILD_NAME_CONFLICT, message, ("NameTaken", "NoConflict"), now, generation)


def _foreign_condition(previous: Mapping[str, Any], foreign: Iterable[str] | None, now: str,
                       generation: int | None) -> dict[str, Any] | None:
    """Condition ForeignJobsIgnored: True while Jobs labelled with this MMARJob's name but not owned by it
    exist (e.g. left by a deleted MMARJob of the same name); `foreign` None: unknown, the condition stays."""
    if foreign is None:
        return next((dict(c) for c in previous.get("conditions") or [] if c.get("type") == FOREIGN_JOBS_IGNORED), None)
    names = sorted(foreign)
    message = None
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        message = (f"Job(s) {shown} carry this MMARJob's name but are not its own (another owner's, or orphaned by a "
                   f"deleted MMARJob of this name): not taken as its results, not adopted, left alone; delete them "
                   f"if they are of no use")
    return _flag(previous, FOREIGN_JOBS_IGNORED, message, ("NotOwned", "NoForeignJobs"), now, generation)


def _summarize(job: Mapping[str, Any], previous: Mapping[str, Any], steps: list[dict[str, Any]], now: str, generation: int | None) -> dict[str, Any]:
    failed = next((s for s in steps if s["phase"] == FAILED), None)
    # the step being worked on: the one whose Job is there and unfinished (an edit may have put a step that
    # waits before it), else the first one not done
    current = next((s for s in steps if s["phase"] not in DONE and s["phase"] != WAITING), None) \
        or next((s for s in steps if s["phase"] not in DONE), None)
    suspended = bool(job["spec"]["runPolicy"]["suspend"])
    queue = queue_of(job)
    end = outcome.job_outcome(steps)  # a failed step, or no step left to run (`current` None): as `mmar run` says
    if end is not None:
        phase, reason, message = end["phase"], end["reason"], end["message"]
        if failed is not None and failed.get("reason") == JOB_CREATE_FAILED:
            reason = JOB_CREATE_FAILED
    elif suspended and queue:  # Kueue owns the Jobs' suspend field: only the next step is held back
        phase, reason, message = SUSPENDED, "Suspended", f"suspended: no step starts after {current['name']} (spec.runPolicy.suspend; Kueue owns the admitted Job)"
    elif suspended:
        phase, reason, message = SUSPENDED, "Suspended", f"suspended before step {current['name']} completed (spec.runPolicy.suspend)"
    elif current.get("reason") == "Queued":
        phase, reason, message = PENDING, "Queued", f"step {current['name']} is queued: {current.get('message') or 'its Job waits for admission'}"
    elif current["phase"] == PENDING and current.get("reason") not in (POD_STARTING, "JobCreated"):
        # the kubelet's or the scheduler's reason (ErrImageNeverPull, Unschedulable, ...): not running
        phase, reason, message = PENDING, current["reason"], f"step {current['name']} is pending: {current.get('message', '')}"
    elif current["phase"] == RUNNING or any(s["phase"] == SUCCEEDED for s in steps):
        # between two steps (the next Job created, its pod not started) the job is still running
        phase, reason, message = RUNNING, "StepRunning", f"step {current['name']} is {_doing(current)}"
    else:
        phase, reason, message = PENDING, "StepPending", f"step {current['name']} is {_doing(current)}"

    old_conditions = previous.get("conditions") or []
    conditions = [_set_condition(old_conditions, kind, *_condition_of(kind, phase, reason, message), now, generation) for kind in CONDITION_TYPES]
    status: dict[str, Any] = {
        "phase": phase,
        "reason": reason,
        "observedGeneration": generation,
        "currentStep": (failed or current or steps[-1])["name"],
        "conditions": conditions,
        "steps": steps,
        "message": message[:MESSAGE_MAX],
    }
    starts = [s["startTime"] for s in steps if s.get("startTime")]
    if previous.get("startTime") or starts:
        status["startTime"] = rfc3339(previous.get("startTime") or min(starts))
    if phase in TERMINAL:
        status["completionTime"] = rfc3339(previous.get("completionTime") or now)
    if generation is None:
        del status["observedGeneration"]
    return status


def _doing(step: Mapping[str, Any]) -> str:
    """What a step that has not finished is doing, in words that are true for each of its phases."""
    if step["phase"] == SUSPENDED:  # the MMARJob was resumed; its Job is being released
        return "resuming (its Job is still suspended)"
    if step["phase"] == PENDING:
        return "pending (its Job has no running pod yet)"
    return step["phase"].lower()


def _condition_of(kind: str, phase: str, reason: str, message: str) -> tuple[bool, str, str]:
    """(true, reason, message) of condition `kind`. While Pending, Running=False says why (Queued,
    StepPending): the one condition whose reason tells a queued job from one whose pod is starting."""
    if phase == kind:
        return True, reason, message
    if kind == RUNNING and phase == PENDING:
        return False, reason, message
    return False, f"Not{kind}", ""


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
    status = {"phase": FAILED, "reason": "InvalidSpec", "conditions": conditions, "message": message[:MESSAGE_MAX],
              "steps": previous.get("steps") or [], "results": previous.get("results") or {},
              "completionTime": rfc3339(previous.get("completionTime") or now)}
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def _uncreated(step: Mapping[str, Any]) -> bool:
    """A step with no Job: not created yet, or its create refused for now (retried)."""
    return step["phase"] == WAITING or (step["phase"] == PENDING and step.get("reason") in (JOB_CREATE_FAILED, CHILD_NAME_CONFLICT))


def next_step(job: Mapping[str, Any], status: Mapping[str, Any]) -> int | None:
    """The index of the step whose Job should be created now: the first one not done, once no other step's
    Job is unfinished (never two steps at once, whatever order an edit left them in); None while one runs,
    after a failure, when done, or while suspended."""
    if status.get("phase") in TERMINAL or job["spec"]["runPolicy"]["suspend"]:
        return None
    steps = status.get("steps") or []
    if any(s["phase"] not in STEP_FINAL and s["phase"] != NOT_RUN and not _uncreated(s) for s in steps):
        return None
    for index, step in enumerate(steps):
        if step["phase"] in DONE:
            continue
        return index if _uncreated(step) else None
    return None


def finished_steps(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Steps that reached Succeeded/Failed/Skipped in this reconcile (for metrics: observed exactly once)."""
    before = {s.get("name"): s.get("phase") for s in (previous or {}).get("steps") or []}
    return [s for s in current.get("steps") or [] if s["phase"] in STEP_FINAL and before.get(s["name"]) not in STEP_FINAL]
