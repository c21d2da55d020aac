"""`mmar init`: scaffold an MMAR folder from a datalist, with a recipe fitted to the data.

The recipe's shape-dependent values (input channels, number of classes, patch size) are read from the
data's headers and a few labels, so a new MMAR trains without hand-editing.
"""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path
from typing import Any

from mmar.archive import CONFIG_DIR, ENVIRONMENT, TRAIN_CONFIG, VALIDATION_CONFIG, VALUE_CHECKS
from mmar.errors import MMARError
from mmar.io import atomic_write, write_json
from mmar.tasks import get_task

# commands/<name>.sh -> the `mmar` arguments it runs (the MMAR root goes after the first word; extra arguments
# are appended), and the comment lines at its top. Clara's set: train, fine-tune, 2-GPU train and fine-tune,
# validate, infer, export. For another GPU count copy a 2gpu script and change --gpus (docs/distributed.md).
FINETUNE_NOTE = ("Point DATASET_JSON (and DATA_ROOT) in config/environment.json at your data first, or pass "
                 "--set DATASET_JSON=/data/my_datalist.json")
LR_SCALING_NOTE = ("The learning rate is multiplied by the number of GPUs (multi_gpu#lr_scaling, on by default): "
                   "keep the single-GPU learning_rate, do not multiply it yourself")
COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "train.sh": ("train", ("Train this MMAR's model",)),
    "train_finetune.sh": ("train --finetune", (
        "Fine-tune from models/model.ckpt (or PRETRAIN_WEIGHTS_FILE) on DATASET_JSON, with a fresh optimizer",
        FINETUNE_NOTE)),
    "train_2gpu.sh": ("train --gpus 2", (
        "Train data-parallel on 2 GPUs (torchrun, one process per GPU; train#batch_size is per GPU)",
        LR_SCALING_NOTE)),
    "train_2gpu_finetune.sh": ("train --finetune --gpus 2", (
        "Fine-tune from models/model.ckpt (or PRETRAIN_WEIGHTS_FILE) on DATASET_JSON, data-parallel on 2 GPUs",
        FINETUNE_NOTE, LR_SCALING_NOTE)),
    "validate.sh": ("validate", ("Validate models/model.ckpt against ground truth -> eval/metrics.json",)),
    "infer.sh": ("infer", ("Predict every image of the validation list (or --key LIST) -> eval/",)),
    "export.sh": ("export", ("Export models/model.ckpt to TorchScript, ONNX (and TensorRT on a GPU) -> models/",)),
}

# Which `mmar` a script runs is decided where it runs, never where `init` ran: an MMAR is shipped to other
# machines, containers and volumes, where the init-time path of the CLI does not exist.
_FIND_MMAR = """\
if [[ -n "${MMAR_BIN:-}" ]]; then
  if ! type -P "$MMAR_BIN" >/dev/null; then
    echo "error: ${BASH_SOURCE[0]}: MMAR_BIN=$MMAR_BIN is not an executable (unset it to use \\`mmar\\` on PATH)" >&2
    exit 127
  fi
  mmar=("$MMAR_BIN")
elif type -P mmar >/dev/null; then
  mmar=(mmar)
elif python3 -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("mmar.cli") is None)' 2>/dev/null; then
  mmar=(python3 -m mmar)
else
  echo "error: ${BASH_SOURCE[0]}: the mmar CLI is not installed here: no MMAR_BIN, no \\`mmar\\` on PATH and no" \\
       "mmar module for python3. Activate the environment mmar is installed in, or set MMAR_BIN=/path/to/mmar" >&2
  exit 127
fi
"""


def command_script(arguments: str, comments: tuple[str, ...]) -> str:
    command, *options = arguments.split()
    header = "".join(textwrap.fill(f"{line}.", width=100, initial_indent="# ", subsequent_indent="# ") + "\n"
                     for line in comments)
    call = " ".join(["exec", '"${mmar[@]}"', command, '"$MMAR_ROOT"', *options, '"$@"'])
    return (
        "#!/usr/bin/env bash\n"
        f"{header}"
        "# Extra arguments are passed on, e.g.: --set epochs=10 learning_rate=1e-4\n"
        "# The CLI it runs: $MMAR_BIN if set, else `mmar` on PATH, else `python3 -m mmar`.\n"
        "set -euo pipefail\n"
        'MMAR_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"\n'
        f"{_FIND_MMAR}"
        f"{call}\n"
    )


def init(root: str | os.PathLike, *, task: str, datalist: str | os.PathLike, force: bool = False,
         exist_ok: bool = False, epochs: int | None = None, log=print) -> Path:
    root = Path(root).resolve()
    valid_epochs, expected = VALUE_CHECKS["epochs"]
    if epochs is not None and not valid_epochs(epochs):  # before anything is read or written
        raise MMARError(f"init {root}: epochs must be {expected}, got {epochs!r}")
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
    for name, (arguments, comments) in COMMANDS.items():
        path = root / "commands" / name
        with atomic_write(path, "w", encoding="utf-8") as handle:
            handle.write(command_script(arguments, comments))
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    # config_train.json marks a complete MMAR (init --exist-ok tests it): written last, so that pods of a
    # multi-node job running init at the same moment never take a half-written folder for an MMAR
    write_json(root / CONFIG_DIR / TRAIN_CONFIG, train_config)
    summary = ", ".join(f"{k}={v}" for k, v in facts.items())
    log(f"MMAR for {task} at {root} ({summary})")
    return root
