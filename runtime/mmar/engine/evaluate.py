"""`mmar validate` and `mmar infer`: the MONAI evaluator over a datalist list, with any model format.

Both read the validation recipe (config_validation.json over config_train.json). `validate` needs ground
truth and writes `eval/metrics.json`, a per-case CSV and overlays; `infer` needs none and writes the task's
predictions. The task module says what a result looks like; this module only runs the evaluator.

Results are staged and moved into eval/ when complete (mmar.eval_output): validate's metrics.json and
per-case files as one set, infer's predictions each at a name that no other image of the list shares.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ignite.engine import Events

from mmar.archive import Archive
from mmar.engine import precision
from mmar.engine.handlers import quiet_engine_errors
from mmar.engine.metrics_json import is_undefined, nulls_for_undefined
from mmar.engine.workflow import base_dir, build_evaluator, device_for, keys_of, section_items, validation_loader
from mmar.eval_output import Staging, case_names, remove_abandoned
from mmar.io import file_sha256, write_json
from mmar.predict import default_checkpoint, load_predictor
from mmar.tasks import get_task


METRICS_FILE = "metrics.json"


def validate(archive: Archive, *, ckpt: str | None = None, model: str = "ckpt", allow_stale_export: bool = False,
             log=print) -> dict[str, Any]:
    task = get_task(archive.task)
    config = archive.config
    image_key, label_key = keys_of(config)
    items = section_items(archive, "validate")
    remove_abandoned(archive.eval_dir)  # half-written results of a killed run, before this one can fail too
    names = case_names([_image_file(item, image_key) for item in items], data_root(archive))
    device = device_for(archive)
    measured = Path(ckpt or default_checkpoint(archive, model))
    # what `mmar --gate` compares with the model a gated command will use (read under the MMAR's lock)
    measured_sha256 = file_sha256(measured) if measured.is_file() else None
    predictor = load_predictor(archive, model, ckpt, device, allow_stale=allow_stale_export)
    parser = archive.parser()
    collector = task.CaseCollector(config)
    loader = validation_loader(parser, items, keys=[image_key, label_key], device=device, log=log)
    run = _precision(config, predictor, model, device, log)
    evaluator = build_evaluator(parser, run.network, loader, device, amp=run.cuda_amp, amp_kwargs=run.amp_kwargs)
    quiet_engine_errors(evaluator)  # a data error is the CLI's one `error:` line, not a worker's traceback first
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, collector.on_iteration)
    started = time.perf_counter()
    evaluator.run()
    seconds = time.perf_counter() - started
    key_metric = config["validate"]["key_metric"]
    summary = task.summarize(evaluator, collector, config)
    value = float(evaluator.state.metrics[key_metric])
    metrics = {
        "key_metric": key_metric,
        key_metric: value,
        **summary,
        "num_cases": len(items),
        "model": model,
        "checkpoint": str(measured),
        "checkpoint_sha256": measured_sha256,
        "seconds": round(seconds, 2),
    }
    picked = _selection_of(measured) if model == "ckpt" else None
    if picked:  # which rule picked this checkpoint's epoch, and why (mmar.engine.selection)
        metrics["selection"] = picked
    interval = _intervals(task, evaluator, collector, config, items, key_metric, log)
    if interval:
        metrics["intervals"] = interval
    check = getattr(predictor, "export_check", None)
    if check:  # an exported model: which checkpoint it stands for, and whether that was verified
        metrics["export"] = {k: check[k] for k in ("status", "checkpoint", "exported_from_sha256") if k in check}
    eval_dir = archive.eval_dir
    # the whole set or nothing: a failure while writing leaves the previous metrics, cases and overlays
    with Staging(eval_dir, "validate") as staging:
        task.write_validation(staging.path, evaluator, collector, config, names=names)
        # strict JSON: an undefined metric is null (the task's summary names which), never a bare NaN
        write_json(staging.path / METRICS_FILE, nulls_for_undefined(metrics))
        staging.replace_set([*task.VALIDATION_OUTPUTS, METRICS_FILE], last=METRICS_FILE)
    defined = not is_undefined(value)
    shown = f"{value:.4f}" if defined else "undefined (null)"
    log(f"{key_metric} {shown} over {len(items)} cases -> {eval_dir / METRICS_FILE}")
    return {"command": "validate", "key_metric": key_metric, "metric": value if defined else None,
            "num_cases": len(items), "eval_dir": str(eval_dir)}


def infer(archive: Archive, *, ckpt: str | None = None, model: str = "ckpt", list_key: str | None = None,
          allow_stale_export: bool = False, log=print) -> dict[str, Any]:
    task = get_task(archive.task)
    config = archive.config
    image_key, _ = keys_of(config)
    list_key = list_key or config.get("infer", {}).get("datalist_key") or config["validate"].get("datalist_key", "validation")
    items = section_items(archive, "validate", list_key=list_key, require_label=False)
    for item in items:  # ground truth is not needed and not read at inference
        item.pop(config.get("label_key", "label"), None)
    remove_abandoned(archive.eval_dir)
    names = case_names([_image_file(item, image_key) for item in items], data_root(archive))
    device = device_for(archive)
    predictor = load_predictor(archive, model, ckpt, device, allow_stale=allow_stale_export)
    parser = archive.parser()
    loader = validation_loader(parser, items, keys=[image_key], device=device, log=log)
    run = _precision(config, predictor, model, device, log)
    evaluator = build_evaluator(parser, run.network, loader, device, with_metrics=False,
                                postprocessing=task.inference_postprocessing(parser),
                                amp=run.cuda_amp, amp_kwargs=run.amp_kwargs)
    quiet_engine_errors(evaluator)
    # predictions move into eval/ once all are written: a failed run leaves the previous ones as they were
    with Staging(archive.eval_dir, "infer") as staging:
        writer = task.PredictionWriter(staging.path, config, names=names)
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, writer.on_iteration)
        evaluator.run()
        writer.finish()
        outputs = staging.merge()
    log(f"{len(items)} predictions ({len(outputs)} files) -> {archive.eval_dir}")
    return {"command": "infer", "num_cases": len(items), "outputs": len(outputs), "eval_dir": str(archive.eval_dir)}


def _intervals(task, evaluator, collector, config, items, key_metric: str, log) -> dict[str, Any] | None:
    """metrics.json's `intervals` (mmar.engine.intervals): the key metric's bootstrap interval, and per label /
    class, resampling whole patients where the items say so (a `patient` key in every item)."""
    from mmar.engine import intervals

    wanted = intervals.settings(config)
    units, unit = intervals.units_of(items, wanted["group_key"])
    found = task.intervals(evaluator, collector, config, units, unit, wanted)
    if not found:
        return None
    low, high = found[key_metric]["lower"], found[key_metric]["upper"]
    if not (is_undefined(low) or is_undefined(high)):
        log(f"{key_metric}: {round(wanted['level'] * 100)} % bootstrap interval {low:.4f}-{high:.4f} "
            f"({wanted['resamples']} resamples of {found['units']} {unit}{'s' if found['units'] != 1 else ''})")
    return found


def _selection_of(path: Path) -> dict[str, Any] | None:
    """The model-selection record `mmar train` wrote into a checkpoint (model.ckpt), if any."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - the predictor has read it already; an odd file just has no record
        return None
    found = data.get("selection") if isinstance(data, dict) else None
    return found if isinstance(found, dict) else None


def data_root(archive: Archive) -> Path:
    """The folder the datalist's relative paths start from (as load_items resolves them): predictions are
    named relative to it."""
    base = base_dir(archive)
    return Path(base).resolve() if base else Path(archive.env["DATASET_JSON"]).resolve().parent


def _image_file(item: dict[str, Any], image_key: str) -> str:
    image = item[image_key]
    return os.fspath(image[0] if isinstance(image, (list, tuple)) else image)  # channel files: the first names it


def _precision(config, predictor, model: str, device, log) -> precision.Precision:
    """The config's `amp` for a checkpoint's network, as the per-epoch validation runs it: bf16 autocast on
    a CPU or GPU that computes bf16 natively, fp16 on older GPUs (engine/precision.py). The logits are
    float32 before the softmax, the mirror average and the metric. An exported model runs as it was
    exported (TensorRT's precision is chosen at export)."""
    run = precision.for_device(predictor, device, bool(config.get("amp", False)) and model == "ckpt")
    if run.name != "float32":
        log(f"precision: {run.name} (amp; `--set amp=false` for float32)")
    return run
