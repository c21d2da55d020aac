"""`mmar --gate 'METRIC>=X' COMMAND ...`: run an infer, export or push only if the MMAR's last validation
reaches a threshold, and only with the model that validation measured.

The rule itself, the `--gate` text and the interval bounds are `mmar.job.gate` (pure, one definition for the
operator, `mmar run` and this). What this module adds is what only the runtime can see: the MMAR's `eval/metrics.json` (wherever its environment
puts the eval folder, `--set` overrides included) and whether the model the gated command is about to use
is the one that validation measured. `mmar validate` records the sha256 of the file it validated
(`checkpoint_sha256`); the gate compares it with the sha256 of the file the command will load (`--ckpt`,
`--model` and the MMAR's default alike), so neither a retrained, rolled-back (`mv` keeps the old mtime) or
quickly replaced `model.ckpt`, nor `--ckpt OTHER`, passes on another model's score. An exported model
(`--model ts|onnx|trt`) stands for the checkpoint `models/export.json` says it was made from, while that
record holds (`mmar.predict.export_check`); a validation of an export likewise speaks for its checkpoint.

`METRIC.lower` / `METRIC.upper` name a bound of the metric's bootstrap interval, which `mmar validate`
writes under `intervals` in metrics.json (mmar.engine.intervals): `mmar --gate 'val_mean_dice.lower>=0.8'
push ...` pushes only a model whose whole 95 % interval lies above 0.8, so a push never rests on a lucky
estimate from a small validation list (`with_interval_bounds`).

The gate is decided by the command itself, after its own argparse parser has read its arguments and under
the MMAR's lock (`mmar.commands._common.locked`), so a validation running beside it cannot change the answer
half-way. `mmar.cli` only reads `--gate`'s text (`require`) and leaves it in `PENDING`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from mmar.errors import MMARError
from mmar.job.gate import gate_decision, require, with_interval_bounds  # noqa: F401 (mmar.cli: gate.require)

# not imported from mmar.engine (that imports torch): evaluate.METRICS_FILE, checkpoint.MODEL_FILE
METRICS_FILE = "metrics.json"
MODEL_FILE = "model.ckpt"
SHA_FIELD = "checkpoint_sha256"  # in metrics.json: the sha256 of the model file `mmar validate` measured
# the lower bound of the metric's 95 % bootstrap interval (metrics.json's `intervals`): `with_interval_bounds`

# the gate this process's command must pass (`require`'s mapping), set by mmar.cli from `--gate`
PENDING: dict[str, Any] | None = None


def passes(command: str, archive, model: Path | None, kind: str = "ckpt") -> bool:
    """Decide the pending gate (none pending: True) for `command` on `archive`, which will use the model
    file `model` (of format `kind`). Not passed: the skip is the command's result (exit 0, nothing run).
    Passed: the command's own result will carry the gate's record (`mmar.report`)."""
    global PENDING
    if PENDING is None:
        return True
    from mmar import report

    gate, PENDING = PENDING, None  # decided once
    record = check(gate, command, archive, model, kind)
    if not record["passed"]:
        print(f"gate: {command} skipped: {record['message']}", flush=True)
        report.write_result({"command": command, "gate": record})
        return False
    print(f"gate: {record['message']}: running {command}", flush=True)
    report.GATE = record
    return True


def check(gate: dict[str, Any], command: str, archive, model: Path | None, kind: str = "ckpt") -> dict[str, Any]:
    """The gate record for `command` on `archive` with `model`: passed or not, and why."""
    metrics_file = archive.eval_dir / METRICS_FILE
    metrics = with_interval_bounds(_read_metrics(metrics_file))
    shown = _shown(metrics_file, archive.root)
    stale = _not_validated(metrics, shown, archive, model, kind) if metrics is not None else None
    return gate_decision(gate, metrics, shown, stale=stale)


def archive_of(argv: list[str]):
    """The MMAR of a command that decides no gate of its own (push): MMAR_DIR and `--set` as the shared
    archive arguments read them."""
    from mmar.archive import load_archive
    from mmar.commands._common import add_archive_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_archive_arguments(parser)
    args, _ = parser.parse_known_args(argv)
    return load_archive(args.mmar, args.overrides, for_validation=True, file_root=args.file_root)


def _read_metrics(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise MMARError(f"{path}: cannot read the validation metrics ({error.strerror or error})") from None
    try:
        # NaN / Infinity are not JSON (validate writes null); read as the text they are, never as a number
        # that passes `>=` (Infinity would)
        metrics = json.loads(text, parse_constant=lambda name: name)
    except ValueError as error:
        raise MMARError(f"{path}: not valid JSON ({error}); run validate again") from None
    if not isinstance(metrics, dict):
        raise MMARError(f"{path}: must hold a JSON object of metric name -> value")
    return {name: (value if not isinstance(value, float) or math.isfinite(value) else repr(value))
            for name, value in metrics.items()}  # 1e999 reads as inf too


def _not_validated(metrics: dict[str, Any], shown: str, archive, model: Path | None, kind: str) -> str | None:
    """Why the validation does not speak for `model`, or None when it measured that very model (or the
    checkpoint that export stands for)."""
    validated = _validated_digests(metrics)
    if not validated:
        return (f"{shown} does not record which model it measured ({SHA_FIELD}; written by an older mmar?): "
                f"run validate again")
    if model is None or not Path(model).is_file():
        return f"the model to use, {model}, does not exist"
    from mmar.io import file_sha256

    digest = file_sha256(model)
    used = {digest}
    if kind != "ckpt":
        from mmar.predict import export_check

        facts = export_check(archive, kind, Path(model))
        if facts.get("status") == "current" and facts.get("exported_from_sha256"):
            used.add(facts["exported_from_sha256"])
    if used & validated:
        return None
    return (f"{model} is not the model {shown} measured (sha256 {digest[:12]}, validated {_listed(validated)}): "
            f"validate it first (`mmar validate {archive.root}" + (f" --model {kind}" if kind != "ckpt" else "")
            + f" --ckpt {model}`)")


def _validated_digests(metrics: dict[str, Any]) -> set[str]:
    digests = set()
    if isinstance(metrics.get(SHA_FIELD), str):
        digests.add(metrics[SHA_FIELD])
    export = metrics.get("export")
    if isinstance(export, dict) and export.get("status") == "current" and isinstance(export.get("exported_from_sha256"), str):
        digests.add(export["exported_from_sha256"])  # a validated export speaks for the checkpoint it stands for
    return digests


def _listed(digests: set[str]) -> str:
    return " or ".join(sorted(d[:12] for d in digests))


def _shown(path: Path, root: Path) -> str:
    """The metrics file as a message names it: relative to the MMAR when inside it."""
    try:
        return str(path.resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)
