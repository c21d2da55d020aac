"""mmar.job.outcome: the one rule for a job's end, shared by the operator's status and `mmar run`."""

from __future__ import annotations

from mmar.job import outcome


def step(name, phase, **extra):
    return {"name": name, "phase": phase, **extra}


def test_unfinished_jobs_have_no_outcome():
    assert outcome.job_outcome([step("train", "Succeeded"), step("validate", "Running")]) is None
    assert outcome.job_outcome([step("train", "Waiting")]) is None


def test_a_failed_step_fails_the_job_in_its_own_words():
    steps = [step("train", "Succeeded"), step("validate", "Failed", message="CUDA out of memory"), step("infer", "Waiting")]
    assert outcome.job_outcome(steps) == {"phase": "Failed", "reason": "StepFailed",
                                          "message": "step validate failed: CUDA out of memory"}
    # `mmar run` knows the exit code; a step without words of its own says only that
    assert outcome.job_outcome([step("a", "Failed", exitCode=3, message="boom")])["message"] == "step a failed (exit code 3): boom"
    assert outcome.job_outcome([step("a", "Failed", exitCode=3, message="exit code 3")])["message"] == "step a failed (exit code 3)"


def test_a_gate_skips_its_step_and_every_later_one():
    gate = outcome.skipped_by_gate({"command": "infer", "gate": {"metric": "m", "passed": False, "message": "m 0.1 < 0.5"}})
    assert gate is not None and outcome.skipped_by_gate({"gate": {"passed": True}}) is None
    steps = [step("train", "Succeeded"), step("infer", result={"gate": gate}, **outcome.gate_skipped(gate)),
             step("push", **outcome.skipped_after("infer"))]
    assert steps[1]["message"] == "skipped by its gate: m 0.1 < 0.5"
    assert steps[2]["message"] == "not run: step infer was skipped by its gate"
    assert outcome.job_outcome(steps) == {
        "phase": "Succeeded", "reason": "GateNotMet",
        "message": "step infer skipped by its gate: m 0.1 < 0.5; 1 step(s) succeeded, 2 skipped"}


def test_all_succeeded():
    assert outcome.job_outcome([step("a", "Succeeded")] * 2) == {"phase": "Succeeded", "reason": "AllStepsSucceeded",
                                                                  "message": "2 step(s) succeeded"}


def test_now_iso_is_rfc3339_utc():
    now = outcome.now_iso()
    assert now.endswith("Z") and len(now) == 20 and now[10] == "T"
