"""What each step reports when it ends: one typed definition the runtime writes and every reader reads.

A command's workflow returns a dict; `mmar.report.write_result` checks it against the definition of its
command here (`check`: an unknown, missing or mistyped key is a bug that raises, never a silently empty
field downstream) and writes it as the pod's termination message (`encode`: compact JSON within the
kubelet's 4096 bytes). The operator reads that message from the finished pod, `mmar run` from the file
MMAR_TERMINATION_LOG names; both turn it back into a dict (`decode`: a crash's log tail is None) and fold
it into the job's summary, `status.results` (`fold`).

The summary, across steps:

    epochs, keyMetric, bestMetric, bestEpoch   the last train/finetune step
    validation: {metric name: value}            metrics only (finite numbers), from the last validate step
    predictions: {cases, files, dir}            what the last infer step wrote, and where
    exported: [file, ...]                       the files the last export step wrote
    conversion: {converted, skipped, failed}    the last convert step's counts
    gate: {metric, atLeast|atMost, value, passed, message}   the last gated step's gate (mmar.job.gate_decision)

Imports nothing heavy: the operator image (no torch) imports this (tests/job/test_job_boundary.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

MAX_BYTES = 4096  # the kubelet keeps at most this much of a termination message
ERROR_MAX = 1024  # an error line longer than this is cut: the message must leave room for the rest
DROPPED = "dropped"  # envelope key: the fields left out to fit MAX_BYTES, so a reader knows they existed


class ResultError(ValueError):
    """A command's result does not match its definition here: a bug in the command, caught by the tests."""


@dataclass
class StepResult:
    """Fields every result has. Subclasses list their own; every field defaults to None so a reader can
    hold a partial message (an older runtime, or fields dropped to fit the size cap)."""

    command: str | None = None
    # `mmar --gate METRIC>=X COMMAND`: the gate's record (mmar.job.gate_decision): passed, or the skip itself
    gate: dict[str, Any] | None = None

    COMMANDS: ClassVar[tuple[str, ...]] = ()  # the `command` values this definition is for
    REQUIRED: ClassVar[tuple[str, ...]] = ()  # keys a command must report (the value may be None where typed so)
    DROP_ORDER: ClassVar[tuple[str, ...]] = ()  # left out first, in this order, when the message is too big

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-ready data; fields without a value are left out."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = False) -> StepResult:
        """strict (the writer): every key known, REQUIRED present, each value of its type, else ResultError.
        Lenient (the readers): unknown keys ignored, a value of the wrong type read as missing."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        if strict:
            unknown = sorted(set(data) - known)
            missing = [key for key in cls.REQUIRED if key not in data]
            if unknown or missing:
                raise ResultError(f"{cls.__name__} ({data.get('command')!r}): "
                                  + "; ".join(filter(None, [unknown and f"unknown keys {unknown} (add them to mmar/results.py)",
                                                            missing and f"missing keys {missing}"])))
        values = {}
        for key in known & set(data):
            try:
                values[key] = _conform(data[key], hints[key], f"{cls.__name__}.{key}")
            except ResultError:
                if strict:
                    raise
        return cls(**values)

    def fold(self, summary: dict[str, Any]) -> None:
        """Add what this result contributes to the job's summary (`status.results`), in place."""


@dataclass
class ConvertResult(StepResult):
    """`mmar convert`: how many inputs became NIfTI files, were left alone (output exists, not an image),
    or failed; `first_error`, when the run exits non-zero, is the first of its problem lines in the command's
    own words (`{label}: {reason}`, e.g. `case1: [Errno 13] Permission denied: '/data/imagesTr'`), so a step
    that failed every case says why without its log. Cut to ERROR_MAX like a Failure's error."""

    converted: int | None = None
    skipped: int | None = None
    failed: int | None = None
    first_error: str | None = None

    COMMANDS: ClassVar[tuple[str, ...]] = ("convert",)
    REQUIRED: ClassVar[tuple[str, ...]] = ("command", "converted", "skipped", "failed")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if self.first_error and len(self.first_error) > ERROR_MAX:
            data["first_error"] = self.first_error[: ERROR_MAX - 3] + "..."
        return data

    def fold(self, summary: dict[str, Any]) -> None:
        counts = {k: getattr(self, k) for k in ("converted", "skipped", "failed") if getattr(self, k) is not None}
        if counts:
            summary["conversion"] = counts


@dataclass
class TrainResult(StepResult):
    """`mmar train` / `mmar train --finetune`: epochs run and the best key metric of per-epoch validation
    (None when no validation ran)."""

    epochs: int | None = None
    key_metric: str | None = None
    best_metric: float | None = None
    best_epoch: int | None = None
    minutes: float | None = None
    models_dir: str | None = None
    processes: int | None = None  # data-parallel processes, when more than one ran

    COMMANDS: ClassVar[tuple[str, ...]] = ("train", "finetune")
    REQUIRED: ClassVar[tuple[str, ...]] = ("command", "epochs", "key_metric", "best_metric", "best_epoch", "minutes", "models_dir")
    DROP_ORDER: ClassVar[tuple[str, ...]] = ("models_dir", "minutes", "processes")

    def fold(self, summary: dict[str, Any]) -> None:
        for source, target in (("epochs", "epochs"), ("key_metric", "keyMetric"), ("best_metric", "bestMetric"), ("best_epoch", "bestEpoch")):
            value = getattr(self, source)
            if value is not None and _finite(value):
                summary[target] = value


@dataclass
class ValidateResult(StepResult):
    """`mmar validate`: the key metric over the validation list; `metrics` may add more (name -> value)."""

    key_metric: str | None = None
    metric: float | None = None
    metrics: dict[str, float] | None = None
    num_cases: int | None = None
    eval_dir: str | None = None

    COMMANDS: ClassVar[tuple[str, ...]] = ("validate",)
    REQUIRED: ClassVar[tuple[str, ...]] = ("command", "key_metric", "metric", "num_cases", "eval_dir")
    DROP_ORDER: ClassVar[tuple[str, ...]] = ("metrics", "eval_dir")

    def fold(self, summary: dict[str, Any]) -> None:
        values = dict(self.metrics or {})
        if self.key_metric and self.metric is not None:
            values[self.key_metric] = self.metric
        # metrics only: a NaN (say, no foreground in any case) is no number the status schema accepts
        values = {name: value for name, value in values.items() if value is not None and _finite(value)}
        if values:
            summary["validation"] = values


@dataclass
class InferResult(StepResult):
    """`mmar infer`: cases predicted, prediction files written (one per case for segmentation, one CSV for
    classification) and the folder they are in."""

    num_cases: int | None = None
    outputs: int | None = None
    eval_dir: str | None = None
    dicom_segs: int | None = None  # DICOM Segmentation files written (`infer --dicom-seg` only)

    COMMANDS: ClassVar[tuple[str, ...]] = ("infer",)
    REQUIRED: ClassVar[tuple[str, ...]] = ("command", "num_cases", "outputs", "eval_dir")

    def fold(self, summary: dict[str, Any]) -> None:
        written = {"cases": self.num_cases, "files": self.outputs, "dir": self.eval_dir}
        written = {k: v for k, v in written.items() if v is not None}
        if written:
            summary["predictions"] = written


@dataclass
class ExportResult(StepResult):
    """`mmar export`: the files written (each checked against PyTorch), formats skipped, and the checks."""

    files: list[str] | None = None
    formats: list[str] | None = None
    skipped: list[str] | None = None
    precision: str | None = None
    input_shape: list[int] | None = None
    max_abs_diff: dict[str, float] | None = None
    stale_formats: list[str] | None = None  # formats left in models/ from another checkpoint (not re-exported)

    COMMANDS: ClassVar[tuple[str, ...]] = ("export",)
    REQUIRED: ClassVar[tuple[str, ...]] = ("command", "files", "formats", "skipped", "precision", "input_shape", "max_abs_diff")
    DROP_ORDER: ClassVar[tuple[str, ...]] = ("max_abs_diff", "input_shape", "skipped", "formats", "precision", "stale_formats")

    def fold(self, summary: dict[str, Any]) -> None:
        if self.files is not None:
            summary["exported"] = list(self.files)


@dataclass
class PullResult(StepResult):
    """`mmar pull`: image series matched on the DICOMweb server, series skipped (not images), instances
    retrieved now and found already on disk (a resumed pull), and the datalist list written."""

    series: int | None = None
    skipped_series: int | None = None
    retrieved: int | None = None
    present: int | None = None
    cases: int | None = None
    datalist: str | None = None
    key: str | None = None

    COMMANDS: ClassVar[tuple[str, ...]] = ("pull",)
    REQUIRED: ClassVar[tuple[str, ...]] = ("command", "series", "skipped_series", "retrieved", "present", "cases",
                                           "datalist", "key")
    DROP_ORDER: ClassVar[tuple[str, ...]] = ("datalist",)


@dataclass
class PushResult(StepResult):
    """`mmar push`: DICOM Segmentation files found, stored now with STOW-RS, skipped because the server
    already holds their SOPInstanceUID, and not stored (unreadable, bad UIDs, refused by the server: the push
    goes on with the others and exits non-zero); `first_error`, when some were not stored, is the command's
    `error:` line (how many, and the first one's reason), cut to ERROR_MAX like a Failure's error."""

    found: int | None = None
    stored: int | None = None
    skipped: int | None = None
    failed: int | None = None
    url: str | None = None  # the service, as given (credentials are never in it)
    first_error: str | None = None

    COMMANDS: ClassVar[tuple[str, ...]] = ("push",)
    REQUIRED: ClassVar[tuple[str, ...]] = ("command", "found", "stored", "skipped", "failed", "url")
    DROP_ORDER: ClassVar[tuple[str, ...]] = ("url",)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if self.first_error and len(self.first_error) > ERROR_MAX:
            data["first_error"] = self.first_error[: ERROR_MAX - 3] + "..."
        return data


@dataclass
class GateSkipped(StepResult):
    """A gated command (infer, export, push) that did not run: its gate's record says why."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("command", "gate")


@dataclass
class Failure(StepResult):
    """Any command that did not finish: its error line and, when a signal stopped it, the signal's name."""

    error: str | None = None
    signal: str | None = None  # e.g. "SIGTERM"

    REQUIRED: ClassVar[tuple[str, ...]] = ("command", "error")
    DROP_ORDER: ClassVar[tuple[str, ...]] = ("signal",)


DEFINITIONS: dict[str, type[StepResult]] = {
    command: cls for cls in (ConvertResult, TrainResult, ValidateResult, InferResult, ExportResult, PullResult, PushResult)
    for command in cls.COMMANDS
}


def definition_of(data: Mapping[str, Any], step_type: str | None = None) -> type[StepResult] | None:
    """The definition a result dict follows: Failure when it carries an error, GateSkipped when its gate held
    the command back, else its command's (or, for a message without `command`, the step type's)."""
    if data.get("error") is not None:
        return Failure
    gate = data.get("gate")
    if isinstance(gate, Mapping) and gate.get("passed") is False:
        return GateSkipped
    command = data.get("command")
    return DEFINITIONS.get(command if isinstance(command, str) and command in DEFINITIONS else step_type or "")


# ---------------------------------------------------------------------------------------------- writer


def check(data: Mapping[str, Any]) -> StepResult:
    """A command's result dict as its typed result; ResultError when it does not match its definition."""
    if not isinstance(data, Mapping):
        raise ResultError(f"a result must be a mapping, got {type(data).__name__}")
    cls = definition_of(data)
    if cls is None:
        raise ResultError(f"result of unknown command {data.get('command')!r}: define it in mmar/results.py "
                          f"(known: {', '.join(DEFINITIONS)})")
    return cls.from_dict(data, strict=True)


def failure(command: str, error: str, signal: str | None = None) -> Failure:
    return Failure(command=command, error=error, signal=signal)


def encode(result: StepResult, limit: int = MAX_BYTES) -> str:
    """The result as a termination message: compact JSON of at most `limit` bytes, always valid.

    When too big, the fields in the definition's DROP_ORDER go first, then long strings are cut, and as a
    last resort only `command` (and an error line) remains; `dropped` names what was left out.
    """
    data = result.to_dict()
    if isinstance(result, Failure) and result.error and len(result.error) > ERROR_MAX:
        data["error"] = result.error[: ERROR_MAX - 3] + "..."
    dropped: list[str] = []
    for key in result.DROP_ORDER:
        if _fits(data, dropped, limit):
            break
        if key in data:
            del data[key]
            dropped.append(key)
    if not _fits(data, dropped, limit):  # a path or name of pathological length
        data = {k: (v[:256] + "..." if isinstance(v, str) and len(v) > 259 else v) for k, v in data.items()}
    if not _fits(data, dropped, limit):
        keep = {k: data[k] for k in ("command", "error") if k in data}
        dropped += [k for k in data if k not in keep]
        data = keep
        while data.get("error") and not _fits(data, dropped, limit):  # non-ASCII is escaped: 6 bytes a character
            data["error"] = data["error"][: len(data["error"]) // 2]
    return _dumps({**data, DROPPED: dropped} if dropped else data)


def _fits(data: Mapping[str, Any], dropped: list[str], limit: int) -> bool:
    return len(_dumps({**data, DROPPED: dropped} if dropped else data).encode()) <= limit


def _dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), allow_nan=False)


# --------------------------------------------------------------------------------------------- readers


def decode(message: str | None) -> dict[str, Any] | None:
    """A termination message as a dict, or None when there is none or it is not a JSON object (with
    terminationMessagePolicy FallbackToLogsOnError a crash leaves its log tail there instead)."""
    if not message:
        return None
    try:
        value = json.loads(message)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read(step_type: str, data: Mapping[str, Any] | None) -> StepResult | None:
    """A decoded message as the typed result of a step of `step_type` (unknown keys ignored), or None."""
    if not data:
        return None
    cls = definition_of(data, step_type)
    if cls is None:
        return None
    result = cls.from_dict(data)
    if result.command is None:
        result.command = step_type
    return result


def fold(summary: Mapping[str, Any], step_type: str, data: Mapping[str, Any] | None) -> dict[str, Any]:
    """The job's summary with one succeeded step's result folded in (a new dict; later steps win)."""
    merged = dict(summary)
    result = read(step_type, data)
    if result is not None:
        result.fold(merged)
        if result.gate:
            merged["gate"] = dict(result.gate)
    return merged


def error_line(text: str | None) -> str | None:
    """The error a failed command printed, from its stderr or log tail: the last `error: ...` line (the
    CLI's user errors), else the last non-empty line (a traceback ends with the exception), else None."""
    lines = [line.strip() for line in (text or "").replace("\r", "\n").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:"):].strip() or line
    return lines[-1] if lines else None


# --------------------------------------------------------------------------------------------- values


def _conform(value: Any, hint: Any, where: str) -> Any:
    """`value` as the JSON-ready type `hint` names (numpy scalars become numbers); ResultError if it is not."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is list and isinstance(value, (list, tuple)):
        return [_conform(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _conform(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is Any and (value is None or isinstance(value, (str, bool, numbers.Real))):
        return _plain(float(value) if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)) else value)
    if hint is str and isinstance(value, str):
        return value
    if hint is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if hint is float and value is None:
        return None  # a metric that is not a number (NaN was written as null)
    if hint is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise ResultError(f"{where}: expected {_name(hint)}, got {value!r}")


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint)


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _plain(value: Any) -> Any:
    """JSON has no NaN or infinity: such a number is written as null (the reader reads it as missing)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
