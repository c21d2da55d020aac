"""`mmar init`: scaffold an MMAR folder from a datalist, with a recipe fitted to the data.

The recipe's shape-dependent values (input channels, number of classes, patch size) are read from the
data's headers and a few labels, so a new MMAR trains without hand-editing.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

from mmar.archive import CONFIG_DIR, ENVIRONMENT, TRAIN_CONFIG, VALIDATION_CONFIG
from mmar.errors import MMARError
from mmar.io import atomic_write, write_json
from mmar.tasks import get_task

# commands/<name>.sh -> the `mmar` arguments it runs (after the MMAR root); extra arguments are appended
COMMANDS = {
    "train.sh": ("train", "Train this MMAR's model"),
    "train_finetune.sh": ("train --finetune", "Fine-tune from models/model.ckpt (or PRETRAIN_WEIGHTS_FILE) on DATASET_JSON"),
    "validate.sh": ("validate", "Validate models/model.ckpt against ground truth -> eval/metrics.json"),
    "infer.sh": ("infer", "Predict every image of the validation list (or --key LIST) -> eval/"),
    "export.sh": ("export", "Export models/model.ckpt to TorchScript, ONNX (and TensorRT on a GPU) -> models/"),
    # train_Ngpu: copy this file and change --gpus (one process per GPU, DistributedDataParallel)
    "train_2gpu.sh": ("train --gpus 2", "Train data-parallel on 2 GPUs (torchrun, one process per GPU)"),
}


def mmar_executable() -> str:
    """The `mmar` that ran init: the scripts keep working from any directory, venv activated or not."""
    candidate = Path(sys.argv[0])
    if candidate.name == "mmar" and candidate.exists():
        return str(candidate.resolve())
    found = shutil.which("mmar")
    return found or "mmar"


def command_script(arguments: str, description: str, executable: str) -> str:
    return f"""#!/usr/bin/env bash
# {description}.
# Extra arguments are passed on, e.g.: --set epochs=10 learning_rate=1e-4
set -euo pipefail
MMAR_ROOT="$(cd "$(dirname "${{BASH_SOURCE[0]}}")/.." && pwd)"
exec "${{MMAR_BIN:-{executable}}}" {arguments.split()[0]} "$MMAR_ROOT" {" ".join(arguments.split()[1:])} "$@"
""".replace("  \"$@\"", " \"$@\"")


def init(root: str | os.PathLike, *, task: str, datalist: str | os.PathLike, force: bool = False,
         exist_ok: bool = False, epochs: int | None = None, log=print) -> Path:
    root = Path(root).resolve()
    config_file = root / CONFIG_DIR / TRAIN_CONFIG
    if config_file.exists():
        if exist_ok:
            log(f"{root} already is an MMAR; left unchanged")
            return root
        if not force:
            raise MMARError(f"{config_file} exists: not overwriting an MMAR (use --force to rewrite its configs)")
    datalist = Path(datalist).resolve()
    module = get_task(task)
    facts = module.inspect_datalist(datalist)
    kwargs: dict[str, Any] = dict(facts)
    if epochs is not None:
        kwargs["epochs"] = epochs
    train_config, validation_config = module.default_configs(**kwargs)
    environment = {
        # empty: relative paths are relative to the datalist's own folder, so pointing DATASET_JSON at another
        # datalist is enough; set it when the datalist's paths are relative to some other data root (Clara)
        "DATA_ROOT": "",
        "DATASET_JSON": str(datalist),
        "PROCESSING_TASK": task,
        "MMAR_CKPT_DIR": "models",
        "MMAR_EVAL_OUTPUT_PATH": "eval",
    }
    for folder in ("config", "commands", "models", "eval", "docs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    write_json(root / CONFIG_DIR / VALIDATION_CONFIG, validation_config)
    write_json(root / CONFIG_DIR / ENVIRONMENT, environment)
    executable = mmar_executable()
    for name, (arguments, description) in COMMANDS.items():
        path = root / "commands" / name
        with atomic_write(path, "w", encoding="utf-8") as handle:
            handle.write(command_script(arguments, description, executable))
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    # config_train.json marks a complete MMAR (init --exist-ok tests it): written last, so that pods of a
    # multi-node job running init at the same moment never take a half-written folder for an MMAR
    write_json(root / CONFIG_DIR / TRAIN_CONFIG, train_config)
    summary = ", ".join(f"{k}={v}" for k, v in facts.items())
    log(f"MMAR for {task} at {root} ({summary})")
    return root
