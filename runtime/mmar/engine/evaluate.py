"""`mmar validate` and `mmar infer`: the MONAI evaluator over a datalist list, with any model format.

Both read the validation recipe (config_validation.json over config_train.json). `validate` needs ground
truth and writes `eval/metrics.json`, a per-case CSV and overlays; `infer` needs none and writes the task's
predictions. The task module says what a result looks like; this module only runs the evaluator.
"""

from __future__ import annotations

import time
from typing import Any

from ignite.engine import Events

from mmar.archive import Archive
from mmar.engine import precision
from mmar.engine.workflow import build_evaluator, device_for, keys_of, section_items, validation_loader
from mmar.io import write_json
from mmar.predict import default_checkpoint, load_predictor
from mmar.tasks import get_task


def validate(archive: Archive, *, ckpt: str | None = None, model: str = "ckpt", log=print) -> dict[str, Any]:
    task = get_task(archive.task)
    config = archive.config
    image_key, label_key = keys_of(config)
    items = section_items(archive, "validate")
    device = device_for(archive)
    predictor = load_predictor(archive, model, ckpt, device)
    parser = archive.parser()
    collector = task.CaseCollector(config)
    loader = validation_loader(parser, items, keys=[image_key, label_key], device=device, log=log)
    run = _precision(config, predictor, model, device, log)
    evaluator = build_evaluator(parser, run.network, loader, device, amp=run.cuda_amp, amp_kwargs=run.amp_kwargs)
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, collector.on_iteration)
    started = time.perf_counter()
    evaluator.run()
    seconds = time.perf_counter() - started
    key_metric = config["validate"]["key_metric"]
    summary = task.summarize(evaluator, collector, config)
    metrics = {
        "key_metric": key_metric,
        key_metric: float(evaluator.state.metrics[key_metric]),
        **summary,
        "num_cases": len(items),
        "model": model,
        "checkpoint": str(ckpt or default_checkpoint(archive, model)),
        "seconds": round(seconds, 2),
    }
    eval_dir = archive.eval_dir
    task.write_validation(eval_dir, evaluator, collector, config)
    write_json(eval_dir / "metrics.json", metrics)
    log(f"{key_metric} {metrics[key_metric]:.4f} over {len(items)} cases -> {eval_dir / 'metrics.json'}")
    return {"command": "validate", "key_metric": key_metric, "metric": metrics[key_metric],
            "num_cases": len(items), "eval_dir": str(eval_dir)}


def infer(archive: Archive, *, ckpt: str | None = None, model: str = "ckpt", list_key: str | None = None,
          log=print) -> dict[str, Any]:
    task = get_task(archive.task)
    config = archive.config
    image_key, _ = keys_of(config)
    list_key = list_key or config.get("infer", {}).get("datalist_key") or config["validate"].get("datalist_key", "validation")
    items = section_items(archive, "validate", list_key=list_key, require_label=False)
    for item in items:  # ground truth is not needed and not read at inference
        item.pop(config.get("label_key", "label"), None)
    device = device_for(archive)
    predictor = load_predictor(archive, model, ckpt, device)
    parser = archive.parser()
    loader = validation_loader(parser, items, keys=[image_key], device=device, log=log)
    writer = task.PredictionWriter(archive.eval_dir, config)
    run = _precision(config, predictor, model, device, log)
    evaluator = build_evaluator(parser, run.network, loader, device, with_metrics=False,
                                postprocessing=task.inference_postprocessing(parser),
                                amp=run.cuda_amp, amp_kwargs=run.amp_kwargs)
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, writer.on_iteration)
    evaluator.run()
    outputs = writer.finish()
    log(f"{len(items)} predictions -> {archive.eval_dir}")
    return {"command": "infer", "num_cases": len(items), "outputs": len(outputs), "eval_dir": str(archive.eval_dir)}


def _precision(config, predictor, model: str, device, log) -> precision.Precision:
    """The config's `amp` for a checkpoint's network, as the per-epoch validation runs it: bf16 autocast on
    a CPU or GPU that computes bf16 natively, fp16 on older GPUs (engine/precision.py). The logits are
    float32 before the softmax, the mirror average and the metric. An exported model runs as it was
    exported (TensorRT's precision is chosen at export)."""
    run = precision.for_device(predictor, device, bool(config.get("amp", False)) and model == "ckpt")
    if run.name != "float32":
        log(f"precision: {run.name} (amp; `--set amp=false` for float32)")
    return run
