"""The gate: `gate: {metric: val_mean_dice, atLeast: 0.85}` on an infer, export or push step runs the step only
if the MMAR's last validation (its eval/metrics.json) reaches the threshold.

The runtime decides, in the step's own pod or process (`mmar --gate 'val_mean_dice>=0.85' infer ...`),
because only it can read the MMAR's files (mmar.gate: the metrics file, the model's digest); below the
threshold it writes a skip as its result and exits 0. The operator and `mmar run` read that result the same
way (mmar.job.outcome: `skipped_by_gate`): the step and every later one are Skipped, the job Succeeded with
reason GateNotMet: a gated push never sends what a later or earlier step should not have made.

Pure: the spec's gate <-> the `--gate` text, the rule (`gate_decision`) and the interval bounds as metrics.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from mmar.errors import MMARError
from mmar.job.spec import GATED_TYPES, check_part, value_text

GATE_BOUNDS = {"atLeast": ">=", "atMost": "<="}
EXAMPLE = "mmar --gate 'val_mean_dice>=0.85' infer MMAR_DIR"


def check_gate(gate: Any, where: str) -> None:
    """MMARError naming `where` unless `gate` is a gate as the CRD defines it, with a finite threshold."""
    check_part(gate, where, "spec", "steps", "[]", "gate")
    for bound in GATE_BOUNDS:
        if isinstance(gate.get(bound), float) and not math.isfinite(gate[bound]):
            raise MMARError(f"{where}.{bound}: must be a finite number")


def gate_text(gate: Mapping[str, Any]) -> str:
    """The gate as the runtime's `--gate` value: `val_mean_dice>=0.85` / `val_loss<=0.2`, with `bound: lower`
    `val_mean_dice.lower>=0.85` (the runtime's name for an end of the interval: mmar.gate)."""
    (bound,) = [key for key in GATE_BOUNDS if key in gate]
    metric = f"{gate['metric']}.{gate['bound']}" if gate.get("bound") else gate["metric"]
    return f"{metric}{GATE_BOUNDS[bound]}{value_text(gate[bound])}"


def parse_gate_text(text: str) -> dict[str, Any]:
    """`--gate` text back into the spec's mapping; MMARError naming `--gate` when it is not one."""
    for bound, operator in GATE_BOUNDS.items():
        metric, sep, number = text.partition(operator)
        if sep:
            try:
                value = float(number)
            except ValueError:
                break
            gate = {"metric": metric.strip(), bound: int(value) if value.is_integer() and "." not in number else value}
            try:
                check_gate(gate, "--gate")
            except MMARError:
                break
            return gate
    raise MMARError(f"--gate: expected METRIC>=NUMBER or METRIC<=NUMBER, quoted (e.g. --gate 'val_mean_dice>=0.85': "
                    f"unquoted, the shell reads > as a redirect), got {text!r}")


def gate_decision(gate: Mapping[str, Any], metrics: Mapping[str, Any] | None, source: str = "eval/metrics.json",
                  stale: str | None = None) -> dict[str, Any]:
    """Whether `metrics` (the MMAR's last validation, or None when there is none) let a gated step run.

    Returns the record kept in the step's result and the job's `status.results.gate`: metric, the bound,
    value (None when missing or not a number), passed, and a message that says why. `stale` says why the
    validation no longer speaks for the model (it was retrained since): then the gate does not pass.
    Pure: the one rule every caller uses.
    """
    (bound,) = [key for key in GATE_BOUNDS if key in gate]
    metric, threshold = gate["metric"], gate[bound]
    record: dict[str, Any] = {"metric": metric, bound: threshold, "value": None, "passed": False}
    wanted = f"{GATE_BOUNDS[bound]} {value_text(threshold)}"
    if metrics is None:
        record["message"] = f"no validation result ({source} is missing): run a validate step first; {metric} {wanted} required"
        return record
    if metric not in metrics:
        known = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise MMARError(f"gate.metric: {metric!r} is not in {source} (its metrics: {', '.join(known) or 'none'})")
    value = metrics[metric]
    # NaN and +-Infinity (a bare `Infinity` in a hand-edited metrics.json) are undefined: never a pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        record["message"] = f"{metric} is undefined in {source} ({value!r}); {wanted} required"
        return record
    record["value"] = value
    passed = value >= threshold if bound == "atLeast" else value <= threshold
    relation = (">=" if passed else "<") if bound == "atLeast" else ("<=" if passed else ">")
    record["message"] = f"{metric} {value:.4g} {relation} {value_text(threshold)} ({source})"
    if passed and stale:
        passed = False
        record["message"] += f", but {stale}"
    record["passed"] = passed
    return record


def require(text: str, command: str) -> dict[str, Any]:
    """`--gate TEXT` for `command`, checked before anything runs; the parsed gate (`mmar.job`'s mapping).

    A value without a bound (`val_mean_dice`) is what the shell leaves of an unquoted `val_mean_dice>=0.85`:
    it read `>` as a redirect (and wrote stdout to a file `=0.85`). That error says to quote it."""
    if not any(mark in text for mark in "<>="):
        raise MMARError(f"--gate {text!r} has no bound (>= or <=): quote it: the shell reads `>` as a redirect "
                        f"(and `<`), e.g. {EXAMPLE}")
    gate = parse_gate_text(text)
    if command not in GATED_TYPES:
        raise MMARError(f"--gate: only {', '.join(GATED_TYPES)} can be gated, not {command}")
    return gate


BOUNDS = ("lower", "upper")  # `NAME.lower` / `NAME.upper`: a bound of NAME's interval in metrics.json


def with_interval_bounds(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """metrics.json with the bounds of its bootstrap intervals (`intervals`, written by `mmar validate`:
    mmar.engine.intervals) as metrics of their own: `val_mean_dice.lower`, `val_mean_auc.upper`, and per label
    or class `auc_per_label.effusion.lower`, `dice_per_class.1.lower`. A gate on `val_mean_dice.lower>=0.8`
    then passes only when the whole interval lies above 0.8, not just the point estimate. A metrics.json
    without intervals (an older mmar, or `validate#interval: null`) has none of these names, and the gate says
    which metrics it has."""
    if not metrics or not isinstance(metrics.get("intervals"), dict):
        return metrics
    flat = dict(metrics)

    def add(prefix: str, entry: Any) -> None:
        if not isinstance(entry, dict):
            return
        if any(bound in entry for bound in BOUNDS):
            for bound in BOUNDS:
                if bound in entry:
                    value = entry[bound]
                    # null (an undefined bound) stays None: the gate then says it is undefined
                    flat[f"{prefix}.{bound}"] = value if not isinstance(value, float) or math.isfinite(value) else repr(value)
            return
        for name, inner in entry.items():
            add(f"{prefix}.{name}", inner)

    for name, entry in metrics["intervals"].items():
        add(name, entry)
    return flat
