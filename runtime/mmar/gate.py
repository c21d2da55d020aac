"""`mmar --gate METRIC>=X COMMAND ...`: run an infer, export or push only if the MMAR's last validation
reaches a threshold.

The rule itself is `mmar.job.gate_decision` (one definition for the operator, `mmar run` and this). What
this module adds is what only the runtime can see: the MMAR's `eval/metrics.json` (wherever its environment
puts the eval folder, `--set` overrides included) and whether the checkpoint that validation measured has
been replaced since (a retrained model must be validated again before its gate can pass).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mmar import job as contract
from mmar.errors import MMARError

# not imported from mmar.engine (that imports torch): evaluate.METRICS_FILE, checkpoint.MODEL_FILE
METRICS_FILE = "metrics.json"
MODEL_FILE = "model.ckpt"


def check(text: str, command: str, argv: list[str]) -> dict[str, Any]:
    """The gate record for `command argv` (the command's own arguments): passed or not, and why."""
    gate = contract.parse_gate_text(text)
    if command not in contract.GATED_TYPES:
        raise MMARError(f"--gate: only {', '.join(contract.GATED_TYPES)} can be gated, not {command}")
    archive = _archive(argv)
    metrics_file = archive.eval_dir / METRICS_FILE
    metrics = _read_metrics(metrics_file)
    shown = _shown(metrics_file, argv)
    stale = _stale(metrics, metrics_file, archive.models_dir / MODEL_FILE) if metrics is not None else None
    return contract.gate_decision(gate, metrics, shown, stale=stale)


def _archive(argv: list[str]):
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
        metrics = json.loads(text)
    except ValueError as error:
        raise MMARError(f"{path}: not valid JSON ({error}); run validate again") from None
    if not isinstance(metrics, dict):
        raise MMARError(f"{path}: must hold a JSON object of metric name -> value")
    return metrics


def _stale(metrics: dict[str, Any], metrics_file: Path, model: Path) -> str | None:
    """Why the validation no longer speaks for the model, or None: the checkpoint it measured, or the MMAR's
    model (the one a gated export or infer uses by default), was written after it."""
    recorded = metrics.get("checkpoint")
    candidates = [model] + ([Path(recorded)] if isinstance(recorded, str) and Path(recorded).is_absolute() else [])
    try:
        validated_at = metrics_file.stat().st_mtime
    except OSError:
        return None
    for path in candidates:
        try:
            if path.stat().st_mtime > validated_at:
                return f"{path.name} was replaced after {metrics_file.name} was written: validate the current model first"
        except OSError:
            continue
    return None


def _shown(path: Path, argv: list[str]) -> str:
    """The metrics file as a message names it: relative to the MMAR when inside it."""
    root = next((Path(a) for a in argv if not a.startswith("-")), None)
    try:
        return str(path.resolve().relative_to(root.resolve())) if root else str(path)
    except ValueError:
        return str(path)
