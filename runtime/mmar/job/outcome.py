"""The one rule for how an MMARJob's steps end and what that makes of the job, for both of its runners:
the operator (`mmar_operator.status`) and `mmar run` (`mmar.local_run`). Pure: plain dicts in, plain dicts out.

A step's status entry is a dict with at least `name` and `phase` (and, as each runner records them,
`reason`, `message`, `result`, `exitCode`). The rules:

- a failed step: every later step that has not started is NotRun (`not_run`), the job Failed (StepFailed);
- a step its gate held back (its result carries a gate that did not pass: `skipped_by_gate`) is Skipped
  (`gate_skipped`), every later step too (`skipped_after`), and the job Succeeded with reason GateNotMet;
- otherwise the job Succeeded once every step did (AllStepsSucceeded).

`job_outcome(steps)` says which, with the job's message, or None while a step still has to run.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

# The API the MMARJob kind is served under (crds/mmar.dev_mmarjobs.yaml)
GROUP = "mmar.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "MMARJob"
PLURAL = "mmarjobs"

# Phases of a step and of a job (the CRD's status enums)
WAITING, PENDING, RUNNING, SUSPENDED = "Waiting", "Pending", "Running", "Suspended"
SUCCEEDED, FAILED, SKIPPED = "Succeeded", "Failed", "Skipped"
NOT_RUN = "NotRun"  # a step after a failed one: it never runs
DONE = (SUCCEEDED, SKIPPED)  # steps the job needs nothing more from
# Reasons
PREVIOUS_STEP_FAILED = "PreviousStepFailed"  # a NotRun step's
GATE_NOT_MET = "GateNotMet"  # a gate-skipped step's, every later step's, and the job's
STEP_FAILED = "StepFailed"  # the job's, when a step failed
ALL_STEPS_SUCCEEDED = "AllStepsSucceeded"  # the job's, when every step succeeded
RUNNER_LOST = "RunnerLost"  # `mmar run` only: the job's and its running step's, read from a status whose runner is
# gone (SIGKILL, the OOM killer, a reboot) without having recorded the end (`mmar.local_run.read_status`)


def now_iso() -> str:
    """Now as RFC 3339 UTC to the second with `Z`, as the API server writes timestamps."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def not_run(failed_step: str) -> dict[str, str]:
    """A later step's phase, reason and message once step `failed_step` failed: it never runs."""
    return {"phase": NOT_RUN, "reason": PREVIOUS_STEP_FAILED, "message": f"not run: step {failed_step} failed"}


def skipped_by_gate(result: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The gate record of a step that its gate skipped (its result carries a gate that did not pass), else None."""
    gate = result.get("gate") if isinstance(result, Mapping) else None
    if isinstance(gate, Mapping) and gate.get("passed") is False:
        return dict(gate)
    return None


def gate_skipped(gate: Mapping[str, Any]) -> dict[str, str]:
    """The phase, reason and message of the step whose gate (`skipped_by_gate`'s record) held it back."""
    return {"phase": SKIPPED, "reason": GATE_NOT_MET, "message": f"skipped by its gate: {gate.get('message', '')}"}


def skipped_after(gated_step: str) -> dict[str, str]:
    """A later step's phase, reason and message once step `gated_step` was skipped by its gate."""
    return {"phase": SKIPPED, "reason": GATE_NOT_MET, "message": f"not run: step {gated_step} was skipped by its gate"}


def job_outcome(steps: Sequence[Mapping[str, Any]]) -> dict[str, str] | None:
    """The job's end from its steps' status entries, in order, or None while a step still has to run.

    Takes the entries both runners record (`name`, `phase`; `message`, `result`, `exitCode` where known).
    Returns {"phase", "reason", "message"}:

    - the first Failed step: Failed, StepFailed, "step NAME failed[ (exit code N)][: its message]" (the exit
      code where the runner knows it: `mmar run`);
    - no step left to run and one skipped by its gate (a Skipped step with a `result`): Succeeded,
      GateNotMet, "step NAME skipped by its gate: ...; R step(s) succeeded, S skipped";
    - every step Succeeded: Succeeded, AllStepsSucceeded, "N step(s) succeeded".

    What an unfinished job is doing (pending, running, suspended, queued) is the caller's to say.
    """
    failed = next((s for s in steps if s.get("phase") == FAILED), None)
    if failed is not None:
        code = failed.get("exitCode")
        detail = failed.get("message")
        if code is not None and detail == f"exit code {code}":
            detail = None  # the step had no words of its own
        message = f"step {failed['name']} failed" + (f" (exit code {code})" if code is not None else "")
        return {"phase": FAILED, "reason": STEP_FAILED, "message": message + (f": {detail}" if detail else "")}
    if any(s.get("phase") not in DONE for s in steps):
        return None
    gated = next((s for s in steps if s.get("phase") == SKIPPED and s.get("result")), None)
    if gated is not None:
        ran = sum(s.get("phase") == SUCCEEDED for s in steps)
        return {"phase": SUCCEEDED, "reason": GATE_NOT_MET,
                "message": f"step {gated['name']} {gated.get('message', 'was skipped by its gate')}; "
                           f"{ran} step(s) succeeded, {len(steps) - ran} skipped"}
    return {"phase": SUCCEEDED, "reason": ALL_STEPS_SUCCEEDED, "message": f"{len(steps)} step(s) succeeded"}
