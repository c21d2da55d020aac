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

from mmar.archive import (CONFIG_DIR, ENVIRONMENT, MIGRATION_DOC, TRAIN_CONFIG, VALIDATION_CONFIG, VALUE_CHECKS,
                          check_values, read_json, set_by_path)
from mmar.datalist import load_json, relative_to
from mmar.errors import MMARError
from mmar.io import atomic_write, write_json
from mmar.label_format import label_number
from mmar.tasks import TASKS, get_task

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


# what each task reads (mmar.tasks): the image suffixes that tell a datalist's task when --task is not given
TASK_SUFFIXES = {
    "classification": (".png",),
    "segmentation": (".nii", ".nii.gz", ".hdr", ".img", ".mgz", ".mha", ".mhd", ".nrrd"),
}
TASK_READS = {"classification": "2D PNG images with the labels of the datalist's label_format",
              "segmentation": "3D NIfTI images and masks"}


def _first_item(data: dict[str, Any]) -> dict[str, Any] | None:
    items = data.get("training")
    if isinstance(items, list) and items and isinstance(items[0], dict):
        return items[0]
    return None


def _suffix_task(name: Any) -> str | None:
    name = name[0] if isinstance(name, list) and name else name
    if not isinstance(name, str):
        return None
    lower = name.lower()
    return next((task for task, suffixes in TASK_SUFFIXES.items() if lower.endswith(suffixes)), None)


def infer_task(datalist: Path) -> tuple[str, str]:
    """The task a datalist is for, and why: its `label_format` (classification), else its first training
    item's image suffix or label (a number: classification; a file: segmentation). One line naming --task
    when it cannot tell."""
    data = load_json(datalist)
    if "label_format" in data:
        return "classification", "the datalist declares label_format"
    item = _first_item(data)
    if item is None:
        return "segmentation", "the default"  # the task's own reading reports what is wrong with the datalist
    image, label = item.get("image"), item.get("label")
    by_suffix = _suffix_task(image)
    if by_suffix:
        shown = image[0] if isinstance(image, list) else image
        return by_suffix, f"training[0].image is {shown}"
    if label is not None and (label_number(label) is not None
                              or (isinstance(label, list) and label and label_number(label[0]) is not None)):
        return "classification", "training[0].label is a number"
    if _suffix_task(label) == "segmentation":
        return "segmentation", f"training[0].label is the file {label}"
    raise MMARError(f"{datalist}: cannot tell the task from training[0] (image {image!r}): pass --task segmentation "
                    f"({TASK_READS['segmentation']}) or --task classification ({TASK_READS['classification']})")


def check_task_fits(datalist: Path, task: str) -> None:
    """A datalist of the other task's images is one line naming the right --task (not a reader's traceback)."""
    item = _first_item(load_json(datalist))
    other = _suffix_task(item.get("image")) if item else None
    if other and other != task:
        image = item["image"][0] if isinstance(item["image"], list) else item["image"]
        raise MMARError(f"{datalist}: training[0].image {image} is not an image for --task {task} "
                        f"({TASK_READS[task]}): use --task {other} ({TASK_READS[other]})")


def clara_settings(clara_root: str | os.PathLike) -> dict[str, Any]:
    """What a Clara Train (v3, v4) MMAR says that means the same in mmar, for `mmar init --from-clara`.

    {"datalist", "data_root", "task": from environment.json (None where absent), "overrides": {mmar config key:
    value} for the keys that map one to one, "left": the Clara components mmar's recipe replaces}.
    """
    clara_root = Path(clara_root).resolve()
    env_file, config_file = clara_root / CONFIG_DIR / ENVIRONMENT, clara_root / CONFIG_DIR / TRAIN_CONFIG
    env, config = read_json(env_file, "Clara environment file"), read_json(config_file, "Clara config file")
    if not isinstance(env, dict) or not isinstance(config, dict):
        raise MMARError(f"{env_file if not isinstance(env, dict) else config_file}: must hold a JSON object")

    def path_of(key: str) -> Path | None:  # Clara's relative paths are relative to the MMAR root
        value = env.get(key)
        if not isinstance(value, str) or not value:
            return None
        path = Path(os.path.expandvars(os.path.expanduser(value)))
        return path if path.is_absolute() else (clara_root / path).resolve()

    task = env.get("PROCESSING_TASK")
    overrides: dict[str, Any] = {}
    for clara_key, key in (("epochs", "epochs"), ("learning_rate", "learning_rate"),
                           ("num_training_epoch_per_valid", "num_training_epoch_per_valid"),
                           ("num_interval_per_valid", "num_training_epoch_per_valid"),
                           ("amp", "amp"), ("use_amp", "amp")):
        if clara_key in config:
            overrides[key] = config[clara_key]
    determinism = config.get("determinism")
    if isinstance(determinism, dict) and "random_seed" in determinism:
        overrides["determinism#random_seed"] = determinism["random_seed"]
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    for holder in ("dataloader", "image_pipeline"):  # v4's data loader, v3's image pipeline
        args = train[holder].get("args") if isinstance(train.get(holder), dict) else None
        if isinstance(args, dict) and "batch_size" in args:
            overrides["train#batch_size"] = args["batch_size"]
    for key, value in overrides.items():  # a Clara value mmar cannot use is named with its Clara file
        valid, expected = VALUE_CHECKS[key]
        if not valid(value):
            raise MMARError(f"{config_file}: {key} must be {expected} to carry it over, got {value!r}")
    left = []
    for section in ("train", "validate"):
        content = config.get(section)
        for key, value in (content.items() if isinstance(content, dict) else ()):
            names = [v.get("name") for v in (value if isinstance(value, list) else [value])
                     if isinstance(v, dict) and isinstance(v.get("name"), str)]
            if names:
                left.append(f"{section}#{key} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    return {"datalist": path_of("DATASET_JSON"), "data_root": path_of("DATA_ROOT"),
            "task": task if task in TASKS else None, "overrides": overrides, "left": left, "root": clara_root}


def init(root: str | os.PathLike, *, task: str | None = None, datalist: str | os.PathLike | None = None,
         force: bool = False, exist_ok: bool = False, epochs: int | None = None, file_root: str | None = None,
         from_clara: str | os.PathLike | None = None, log=print) -> Path:
    """Scaffold an MMAR for `datalist`. `task` None: told by the datalist (`infer_task`). `file_root`: the folder
    the datalist's relative paths are relative to (DATA_ROOT). `from_clara`: a Clara Train MMAR whose datalist,
    DATA_ROOT, task and one-to-one keys (epochs, learning_rate, ...) are taken where not given here."""
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
    clara = clara_settings(from_clara) if from_clara else None
    if clara:
        datalist = datalist or clara["datalist"]
        file_root = file_root or (str(clara["data_root"]) if clara["data_root"] else None)
        task = task or clara["task"]
        if datalist is None:
            raise MMARError(f"{clara['root'] / CONFIG_DIR / ENVIRONMENT}: no DATASET_JSON: name the datalist with --datalist")
    if datalist is None:
        raise MMARError(f"init {root}: name the datalist with --datalist PATH")
    datalist = Path(datalist).resolve()
    data_root = Path(file_root).expanduser().resolve() if file_root else None
    if data_root is not None and not data_root.is_dir():
        raise MMARError(f"init {root}: the data root (--file_root) {data_root} is not a folder")
    if task is None:
        task, reason = infer_task(datalist)
        log(f"task: {task} ({reason}; --task to choose)")
    else:
        check_task_fits(datalist, task)
    module = get_task(task)
    with relative_to(data_root):
        facts = module.inspect_datalist(datalist)
    kwargs: dict[str, Any] = dict(facts)
    if epochs is not None:
        kwargs["epochs"] = epochs
    train_config, validation_config = module.default_configs(**kwargs)
    if clara:
        carried = {key: value for key, value in clara["overrides"].items()
                   if not (key == "epochs" and epochs is not None)}
        for key, value in carried.items():
            set_by_path(train_config, key, value)
        check_values(train_config, clara["root"] / CONFIG_DIR / TRAIN_CONFIG)
        log(f"from Clara MMAR {clara['root']}: " + (", ".join(f"{k}={v}" for k, v in carried.items()) or "no keys carried"))
        if clara["left"]:
            log(f"not carried, mmar's {task} recipe replaces them ({MIGRATION_DOC}): {'; '.join(clara['left'])}")
    environment = {
        # empty: relative paths are relative to the datalist's own folder, so pointing DATASET_JSON at another
        # datalist is enough; --file_root sets it when the datalist's paths are relative to another data root (Clara)
        "DATA_ROOT": str(data_root) if data_root else "",
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
