"""What an MMAR is on disk, and how its configuration is read.

An MMAR is a folder:

    config/config_train.json       training recipe (MONAI bundle syntax: _target_, @ref, $expr)
    config/config_validation.json  the validation/inference recipe, laid over config_train.json
    config/environment.json        DATA_ROOT, DATASET_JSON, MMAR_CKPT_DIR, MMAR_EVAL_OUTPUT_PATH, ...
    commands/*.sh                  thin calls of the CLI
    models/                        checkpoints, training state, TensorBoard events
    eval/                          metrics, per-case CSV, predictions, overlays

Components are built by MONAI's `ConfigParser`; this module only finds the files, applies `--set`
overrides, checks the keys it knows and the values the runtime reads itself, and resolves environment
paths against the MMAR root.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mmar.errors import MMARError, user_error

CONFIG_DIR = "config"
TRAIN_CONFIG = "config_train.json"
VALIDATION_CONFIG = "config_validation.json"
ENVIRONMENT = "environment.json"

# Clara's environment keys (paths are relative to the MMAR root unless absolute).
ENV_KEYS = {
    "DATA_ROOT": "base folder of the datalist's relative paths (default: the datalist's folder)",
    "DATASET_JSON": "the datalist",
    "MMAR_CKPT_DIR": "checkpoints, training state and TensorBoard events",
    "MMAR_EVAL_OUTPUT_PATH": "metrics, per-case CSV, predictions and overlays",
    "PROCESSING_TASK": "segmentation or classification",
    "PRETRAIN_WEIGHTS_FILE": "checkpoint that --finetune starts from (default: MMAR_CKPT_DIR/model.ckpt)",
}

# Keys the runtime itself reads. Anything else in a section is a typo until proven otherwise: a user who
# writes "epoch": 100 must hear about it rather than silently train for the default.
TOP_LEVEL_KEYS = {
    "epochs", "learning_rate", "num_training_epoch_per_valid", "num_interval_per_valid", "amp",
    "determinism", "task", "num_classes", "image_key", "label_key", "image_base_dir", "spatial_size",
    "network", "train", "validate", "infer", "multi_gpu", "definitions", "label_format", "label_names",
}
SECTION_KEYS = {
    "determinism": {"random_seed"},
    "train": {
        "datalist_key", "batch_size", "num_workers", "cache", "loss", "optimizer", "lr_scheduler",
        "preprocessing", "augmentation", "samples_per_volume", "ema", "mixup",
    },
    "validate": {
        "datalist_key", "batch_size", "num_workers", "cache", "preprocessing", "inferer", "postprocessing",
        "key_metric", "metrics", "overlays", "schedule",
    },
    "infer": {"datalist_key", "output_postfix", "output_ext", "postprocessing"},
    "multi_gpu": {"lr_scaling", "warmup_epochs", "backend", "timeout_seconds"},
}


def switch_section(section: Any, where: str, key: str, *, example: float, fits, bounds: str) -> float | None:
    """A config section that turns a feature on with one number, e.g. `train#ema: {"decay": 0.99}`.

    None when the section is absent, null, false or its number is 0 (the feature off); otherwise the number,
    checked by `fits` (`bounds` says the accepted range in the message). Errors name `where` and `key`.
    """
    if section is None or section is False:
        return None
    if not isinstance(section, dict):
        raise MMARError(f"config: {where} must be an object such as {{\"{key}\": {example}}} (or null), got {section!r}")
    unknown = sorted(set(section) - {key})
    if unknown:
        raise MMARError(f"config: {where} has unknown key(s) {', '.join(unknown)}; it takes only '{key}'")
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not fits(value):
        raise MMARError(f"config: {where}#{key} must be a number in {bounds}, e.g. {example}; got {value!r}")
    return float(value) if value > 0 else None


@dataclass
class Archive:
    """A resolved MMAR: its root, environment (paths absolute) and merged configuration (a plain dict)."""

    root: Path
    env: dict[str, str]
    config: dict[str, Any]
    config_files: list[Path] = field(default_factory=list)

    @property
    def models_dir(self) -> Path:
        return Path(self.env["MMAR_CKPT_DIR"])

    @property
    def eval_dir(self) -> Path:
        return Path(self.env["MMAR_EVAL_OUTPUT_PATH"])

    @property
    def task(self) -> str:
        return self.env.get("PROCESSING_TASK") or self.config.get("task", "segmentation")

    def parser(self):
        """A MONAI ConfigParser over this configuration (components are instantiated from it)."""
        return _config_parser(copy.deepcopy(self.config), [str(p) for p in self.config_files] or [str(self.root)])

    def describe(self, key: str) -> str:
        return f"{self.config_files[-1] if self.config_files else self.root}: {key}"


def _config_parser(config: dict[str, Any], sources: list[str]):
    """A MONAI ConfigParser whose build errors name the config file(s) and the component's key.

    A wrong argument, an unknown `_target_` or a bad expression otherwise surfaces as a MONAI traceback;
    an MMARError raised while building (e.g. by a transform checking its input) passes through unchanged.
    """
    from monai.bundle import ConfigParser

    class _Parser(ConfigParser):
        def get_parsed_content(self, id: str = "", **kwargs: Any):
            try:
                return super().get_parsed_content(id, **kwargs)
            except Exception as error:  # noqa: BLE001 - re-raised with the file and key named
                if user_error(error) is not None:
                    raise  # an MMARError inside (e.g. a transform checking its input): the CLI shows it
                cause = error
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                message = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
                raise MMARError(
                    f"{' + '.join(sources)}: cannot build `{id or 'config'}`: {type(cause).__name__}: {message}"
                ) from error

    return _Parser(config)


def config_path(root: Path, name: str) -> Path:
    return Path(root) / CONFIG_DIR / name


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise MMARError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise MMARError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    except UnicodeDecodeError as error:
        raise MMARError(f"{path}: not a UTF-8 text file ({error.reason})") from None


def load_archive(
    root: str | os.PathLike,
    overrides: Iterable[str] = (),
    *,
    for_validation: bool = False,
    file_root: str | None = None,
) -> Archive:
    """Read an MMAR folder: environment + config(s), `--set` overrides applied, keys checked.

    `for_validation` lays config_validation.json over config_train.json (a top-level key in the
    validation file replaces the training one), as `validate` and `infer` do.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise MMARError(f"MMAR folder not found: {root}")
    env_file = config_path(root, ENVIRONMENT)
    env = read_json(env_file, "environment file")
    if not isinstance(env, dict):
        raise MMARError(f"{env_file}: must hold a JSON object")

    files = [config_path(root, TRAIN_CONFIG)]
    if for_validation and config_path(root, VALIDATION_CONFIG).is_file():
        files.append(config_path(root, VALIDATION_CONFIG))
    contents = []
    for path in files:
        content = read_json(path, "config file")
        if not isinstance(content, dict):
            raise MMARError(f"{path}: must hold a JSON object")
        contents.append(content)
    # a Clara Train MMAR is said to be one, once, before its keys are refused one at a time
    for path, content in zip(files, contents):
        check_not_clara(content, path, env)
    env = translate_clara_env(env, env_file)
    unknown = sorted(set(env) - set(ENV_KEYS))
    if "MMAR_TORCHSCRIPT" in unknown:
        raise MMARError(f"{env_file}: MMAR_TORCHSCRIPT is Clara v4's key: `mmar export` writes MMAR_CKPT_DIR/model.ts; "
                        f"remove it ({MIGRATION_DOC})")
    if unknown:
        raise MMARError(f"{env_file}: unknown key {_with_hint(unknown[0], ENV_KEYS)}")
    config: dict[str, Any] = {}
    for path, content in zip(files, contents):
        check_keys(content, path)
        check_values(content, path)
        config.update(content)

    env = {key: str(value) for key, value in env.items()}
    for item in overrides:
        [(key, value)] = parse_overrides([item])
        if key in ENV_KEYS:
            env[key] = str(value)
            continue
        check_no_code(item, key, value)
        set_by_path(config, key, value)
        # checked one by one: the error names the --set item at fault (the files passed already)
        check_keys(config, f"--set {item}")
        check_values(config, f"--set {item}")
    if file_root:
        config["image_base_dir"] = file_root

    env = resolve_env(root, env)
    return Archive(root=root, env=env, config=config, config_files=files)


# ---- `--set` values are data: no code -------------------------------------------------------------------

ALLOW_EXPRESSIONS = "MMAR_ALLOW_EXPRESSIONS"


def _code_in(value: Any) -> str | None:
    """What in a `--set` value would make MONAI run code or read another file, described; None for plain data.

    `$...` is a Python expression (eval), `%...` a macro (the content of another config file, itself possibly
    holding expressions), and a key such as `_target_` / `_mode_` / `_requires_` turns an object into a
    component: MONAI imports and calls whatever it names (`subprocess.run` as well as `monai.losses.DiceLoss`).
    `@other#key` references stay allowed: they only point at what the config files already hold.
    """
    if isinstance(value, str):
        if value.startswith("$"):
            return f"`{value}` is a Python expression (MONAI evaluates what follows `$`)"
        if value.startswith("%"):
            return f"`{value}` is a macro (MONAI reads it from another config file, expressions included)"
        return None
    if isinstance(value, dict):
        for key, inner in value.items():
            if _is_component_key(key):
                return f"`{key}` makes a component (MONAI imports and calls what it names)"
            found = _code_in(inner)
            if found:
                return found
    if isinstance(value, list):
        for inner in value:
            found = _code_in(inner)
            if found:
                return found
    return None


def _is_component_key(key: Any) -> bool:
    return isinstance(key, str) and len(key) > 2 and key.startswith("_") and key.endswith("_")


def check_no_code(item: str, key: str, value: Any) -> None:
    """`--set` (the command line, an MMARJob's `set:`) carries values, not code, unless MMAR_ALLOW_EXPRESSIONS=1.

    The config files may hold expressions and components: whoever writes them owns the MMAR. A `--set` value
    comes from a command line or a manifest, where someone allowed to start a job need not be allowed to run
    Python in the runtime image (docs/security.md).
    """
    if os.environ.get(ALLOW_EXPRESSIONS, "") == "1":
        return
    parts = split_key(key)
    found = next((f"`{part}` makes a component (MONAI imports and calls what it names)"
                  for part in parts if _is_component_key(part)), None) or _code_in(value)
    if found:
        raise MMARError(
            f"--set {item}: {found}; --set takes plain values (numbers, text, lists, objects), so that a command "
            f"line or an MMARJob's set: cannot run code. Write it in config/{TRAIN_CONFIG} instead, or set "
            f"{ALLOW_EXPRESSIONS}=1 to allow code in --set (docs/security.md)")


def check_set_item(item: str, where: str) -> None:
    """One `--set KEY=VALUE` item checked without the MMAR's config, raising MMARError that names `where`.

    What an MMARJob's `set:` can be refused for when the manifest is loaded (`mmar run`) or admitted (the
    operator), before any step runs rather than when its step starts after hours of earlier steps: code in the
    value (check_no_code), a key the runtime does not read at the top level or in a section it checks
    (`epoch`, `train#batchsize`), and a value of the wrong type or range for a key of VALUE_CHECKS / a cache key
    (`epochs: abc`). A component's own arguments (`network#channels`) are left to the runtime, which knows the
    component.
    """
    (key, value), = parse_overrides([item])
    if key in ENV_KEYS:
        return
    try:
        check_no_code(item, key, value)
    except MMARError as error:
        raise MMARError(f"{where}: {str(error).removeprefix(f'--set {item}: ')}") from None
    parts = split_key(key)
    if parts[0] not in TOP_LEVEL_KEYS:
        raise MMARError(f"{where}: unknown config key {_with_hint(parts[0], TOP_LEVEL_KEYS | set(ENV_KEYS))}")
    full = "#".join(parts)
    if len(parts) >= 2 and parts[0] in SECTION_KEYS and not parts[1].startswith("_") \
            and parts[1] not in SECTION_KEYS[parts[0]]:
        raise MMARError(f"{where}: unknown config key "
                        f"{_with_hint(f'{parts[0]}#{parts[1]}', SECTION_KEYS[parts[0]], parts[0])}")
    if full in VALUE_CHECKS:
        valid, expected = VALUE_CHECKS[full]
        if not valid(value):
            raise MMARError(f"{where}: {full} must be {expected}, got {_shown(value)}")
    if len(parts) == 3 and parts[0] in ("train", "validate") and parts[1] == "cache":
        if parts[2] not in CACHE_VALUES and not parts[2].startswith("_"):
            raise MMARError(f"{where}: unknown config key {_with_hint(full, CACHE_VALUES, f'{parts[0]}#cache')}")
        if parts[2] in CACHE_VALUES and not CACHE_VALUES[parts[2]][0](value):
            raise MMARError(f"{where}: {full} must be {CACHE_VALUES[parts[2]][1]}, got {_shown(value)}")


# ---- Clara Train MMARs ---------------------------------------------------------------------------------

MIGRATION_DOC = "docs/clara-migration.md"
# what only a Clara Train (v3 TensorFlow, v4 PyTorch) config holds: top-level keys, and train / validate keys
CLARA_TOP_LEVEL = {"dynamic_input_shape", "cudnn_benchmark", "dont_load_ckpt_model", "network_summary",
                   "use_scanning_window", "use_amp", "train_summary_recording_interval", "dont_save_segmentation",
                   "model"}
CLARA_SECTION = {"model", "pre_transforms", "post_transforms", "image_pipeline", "dataset", "dataloader",
                 "trainer", "evaluator", "handlers", "aux_ops", "model_loader", "train_summary_recording_interval"}
# v4's environment keys: the checkpoint file (its folder is MMAR_CKPT_DIR) and the TorchScript file
CLARA_ENV = {"MMAR_CKPT", "MMAR_TORCHSCRIPT"}
# Clara keys that mean the same in mmar (carried by `mmar init --from-clara`)
CLARA_SAME_KEYS = ("epochs", "learning_rate", "num_training_epoch_per_valid", "num_interval_per_valid", "amp",
                   "determinism")


def _clara_component(value: Any) -> str | None:
    """`{"name": "UNet", "args": {...}}` -> "UNet": Clara's component form (mmar's is `_target_`)."""
    if isinstance(value, dict) and isinstance(value.get("name"), str) and "_target_" not in value:
        return value["name"]
    return None


def clara_evidence(config: dict[str, Any]) -> list[str]:
    """The keys that make `config` a Clara Train config, each as `where (what)`; empty for an mmar config."""
    found = [key for key in config if key in CLARA_TOP_LEVEL]
    if isinstance(config.get("multi_gpu"), bool):
        found.append("multi_gpu (true/false)")
    name = _clara_component(config.get("network"))
    if name:
        found.append(f"network {{name: {name}}}")
    for section in ("train", "validate"):
        value = config.get(section)
        if not isinstance(value, dict):
            continue
        for key, inner in value.items():
            name = _clara_component(inner)
            if isinstance(inner, list):
                name = next((_clara_component(v) for v in inner if _clara_component(v)), None)
            if key in CLARA_SECTION or name:
                found.append(f"{section}#{key}" + (f" {{name: {name}, args}}" if name else ""))
    return found


def check_not_clara(config: dict[str, Any], path: Path, env: dict[str, Any]) -> None:
    """One error for a Clara Train config, naming it as such, instead of refusing its keys one at a time."""
    found = clara_evidence(config)
    if not found:
        return
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    raise MMARError(
        f"{path}: this is a Clara Train {_clara_version(config, env)} config ({shown}): mmar builds MONAI "
        "components declared with `_target_`, not Clara's {name, args}. Make an mmar MMAR from it with `mmar init "
        f"NEW_DIR --from-clara {path.parent.parent}` (it keeps the datalist, DATA_ROOT, epochs, learning_rate, "
        f"num_training_epoch_per_valid, amp, the random seed and the batch size); {MIGRATION_DOC} maps every "
        "Clara key")


def _clara_version(config: dict[str, Any], env: dict[str, Any]) -> str:
    """"v4" (PyTorch: datasets, data loaders, handlers, MMAR_CKPT), "v3" (TensorFlow: image pipelines, aux ops,
    dynamic_input_shape), else "v3/v4"."""
    sections = [config.get(name) for name in ("train", "validate") if isinstance(config.get(name), dict)]
    if ("num_interval_per_valid" in config or set(env) & CLARA_ENV
            or any(key in section for section in sections for key in ("dataset", "dataloader", "handlers"))):
        return "v4"
    if ("dynamic_input_shape" in config
            or any(key in section for section in sections for key in ("image_pipeline", "aux_ops", "model_loader"))):
        return "v3"
    return "v3/v4"


def translate_clara_env(env: dict[str, Any], env_file: Path) -> dict[str, Any]:
    """Clara v4's `MMAR_CKPT` (the checkpoint file) is read as `MMAR_CKPT_DIR`, its folder."""
    if "MMAR_CKPT" not in env:
        return env
    env = dict(env)
    ckpt = str(env.pop("MMAR_CKPT"))
    folder = os.path.dirname(ckpt.rstrip("/")) or "."
    if env.get("MMAR_CKPT_DIR") and os.path.normpath(str(env["MMAR_CKPT_DIR"])) != os.path.normpath(folder):
        raise MMARError(
            f"{env_file}: MMAR_CKPT ({ckpt}, Clara v4's checkpoint file) is not in MMAR_CKPT_DIR "
            f"({env['MMAR_CKPT_DIR']}): mmar keeps its checkpoints in MMAR_CKPT_DIR (model.ckpt); remove MMAR_CKPT "
            f"({MIGRATION_DOC})")
    env["MMAR_CKPT_DIR"] = env.get("MMAR_CKPT_DIR") or folder
    return env


# ---- fine-tuning ----------------------------------------------------------------------------------------

def finetune_start(archive: Archive, ckpt: str | None = None) -> Path | None:
    """The checkpoint a new fine-tuning starts from, checked before any work; None when models/ holds a run.

    `--ckpt`, else PRETRAIN_WEIGHTS_FILE, else MMAR_CKPT_DIR/model.ckpt (the engine's own order). Where
    models/ holds a training state, the engine decides (a fine-tuning resumed, or started from that run's
    model.ckpt, which it repairs from the state if a kill left it unwritten).
    """
    models = archive.models_dir
    if ckpt is None and (models / "train_state.pt").is_file():
        return None
    if ckpt:
        start, named = Path(ckpt).expanduser(), f"--ckpt {ckpt}"
    elif archive.env.get("PRETRAIN_WEIGHTS_FILE"):
        start, named = Path(archive.env["PRETRAIN_WEIGHTS_FILE"]), "PRETRAIN_WEIGHTS_FILE"
    else:
        start, named = models / "model.ckpt", "MMAR_CKPT_DIR/model.ckpt"
    if not start.is_file():
        raise MMARError(
            f"fine-tuning needs a model to start from: {start} ({named}) "
            f"{'is not a file' if start.exists() else 'does not exist'}. Train this MMAR first (commands/train.sh), "
            "or name a checkpoint: --ckpt PATH, or PRETRAIN_WEIGHTS_FILE in config/environment.json "
            "(or --set PRETRAIN_WEIGHTS_FILE=PATH)")
    return start


def resolve_env(root: Path, env: dict[str, str]) -> dict[str, str]:
    """Make environment paths absolute (relative ones are relative to the MMAR root), fill defaults."""
    resolved = dict(env)
    resolved.setdefault("MMAR_CKPT_DIR", "models")
    resolved.setdefault("MMAR_EVAL_OUTPUT_PATH", "eval")
    for key in ("DATA_ROOT", "DATASET_JSON", "MMAR_CKPT_DIR", "MMAR_EVAL_OUTPUT_PATH", "PRETRAIN_WEIGHTS_FILE"):
        value = resolved.get(key)
        if value:
            path = Path(os.path.expandvars(os.path.expanduser(value)))
            resolved[key] = str(path if path.is_absolute() else (root / path).resolve())
    return resolved


def check_keys(config: dict[str, Any], source: Any) -> None:
    for key in config:
        if key.startswith("_"):  # MONAI's own keys (_meta_, _requires_, ...) and private helpers
            continue
        if key not in TOP_LEVEL_KEYS:
            raise MMARError(f"{source}: unknown config key {_with_hint(key, TOP_LEVEL_KEYS)}")
    for section, allowed in SECTION_KEYS.items():
        value = config.get(section)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise MMARError(f"{source}: `{section}` must be an object, got {type(value).__name__}")
        for key in value:
            if not key.startswith("_") and key not in allowed:
                raise MMARError(f"{source}: unknown config key {_with_hint(f'{section}#{key}', allowed, section)}")


def _whole_number(minimum: int, *, none: bool = False):
    def check(value: Any) -> bool:
        if none and value is None:
            return True
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    return check


def _number_in(low: float, high: float, *, low_open: bool = False):
    def check(value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return (low < value if low_open else low <= value) and value <= high
    return check


def _positive_number_or_reference(value: Any) -> bool:
    """A number > 0, or a MONAI reference / expression (`@other_key`, `$1e-3 * 2`) that MONAI evaluates."""
    if isinstance(value, str):
        return value.startswith(("@", "$"))
    return _number_in(0, float("inf"), low_open=True)(value)


def _object_or_null(value: Any) -> bool:
    return value is None or isinstance(value, dict)


# Values the runtime itself reads (with int(), float(), bool()), checked when the MMAR is read, so that
# `--set epochs=abc` is a one-line error naming the key and `epochs=2.5` (which int() would make 2 while the
# schedule's "@epochs" got 2.5) or `amp=False` (a string, which bool() makes true) never run.
VALUE_CHECKS: dict[str, tuple[Any, str]] = {
    "epochs": (_whole_number(1), "a whole number of epochs, 1 or more (e.g. epochs=10)"),
    "learning_rate": (_positive_number_or_reference, "a number > 0 (e.g. learning_rate=1e-4)"),
    "num_training_epoch_per_valid": (_whole_number(1), "a whole number of epochs, 1 or more"),
    "num_interval_per_valid": (_whole_number(1), "a whole number of epochs, 1 or more"),
    "amp": (lambda value: isinstance(value, bool), "true or false"),
    "determinism#random_seed": (_whole_number(0, none=True), "a whole number >= 0, or null for a random seed"),
    "train#batch_size": (_whole_number(1), "a whole number of cases, 1 or more"),
    "validate#batch_size": (_whole_number(1), "a whole number of cases, 1 or more"),
    # not `false`: the engine reads a missing, null or empty cache section as "cache everything"
    "train#cache": (_object_or_null, 'an object (e.g. {"rate": 0} to cache nothing)'),
    "validate#cache": (_object_or_null, 'an object (e.g. {"rate": 0} to cache nothing)'),
}
# the keys of train#cache / validate#cache (mmar.engine.data.make_dataset reads them)
CACHE_VALUES: dict[str, tuple[Any, str]] = {
    "rate": (_number_in(0, 1), "the share of the cases to cache, from 0 (none) to 1 (all)"),
    "max_ram_fraction": (_number_in(0, 1, low_open=True),
                         "the share of the available RAM the cache may use, above 0 and at most 1"),
    "num_workers": (_whole_number(1), "a whole number of threads, 1 or more"),
}


def check_values(config: dict[str, Any], source: Any) -> None:
    """The values of VALUE_CHECKS' keys that `config` holds have the type and range the runtime needs."""
    for key, (valid, expected) in VALUE_CHECKS.items():
        found, value = _lookup(config, key)
        if found and not valid(value):
            raise MMARError(f"{source}: {key} must be {expected}, got {_shown(value)}")
    for section in ("train", "validate"):
        found, cache = _lookup(config, f"{section}#cache")
        if not found or cache is None:
            continue
        unknown = sorted(name for name in cache if name not in CACHE_VALUES and not name.startswith("_"))
        if unknown:
            raise MMARError(f"{source}: unknown config key "
                            f"{_with_hint(f'{section}#cache#{unknown[0]}', CACHE_VALUES, f'{section}#cache')}")
        for name, (valid, expected) in CACHE_VALUES.items():
            if name in cache and not valid(cache[name]):
                raise MMARError(f"{source}: {section}#cache#{name} must be {expected}, got {_shown(cache[name])}")


def _lookup(config: dict[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = config
    for part in key.split("#"):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _shown(value: Any) -> str:
    """As it was written in JSON (`null`, `"abc"`, `[1]`), which is how a user wrote it."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def known_keys() -> set[str]:
    """Every config key the runtime reads, written in full (`train#batch_size`, `validate#cache#rate`)."""
    keys = set(TOP_LEVEL_KEYS)
    for section, allowed in SECTION_KEYS.items():
        keys |= {f"{section}#{key}" for key in allowed}
    for section in ("train", "validate"):
        keys |= {f"{section}#cache#{key}" for key in CACHE_VALUES}
    return keys


def _with_hint(key: str, known: Iterable[str], section: str = "") -> str:
    """`'train#batchsize' (did you mean 'train#batch_size'?)`: the key in full, quoted whole, and the closest
    known key, in full too: the same name in another section (`batch_size` -> `train#batch_size`,
    `train#key_metric` -> `validate#key_metric`), else the closest among the keys of the same section (`known`,
    named without the section), else the closest among every key the runtime reads."""
    prefix = f"{section}#" if section else ""
    name = key[len(prefix):]
    every = known_keys() | ({prefix + other for other in known})
    close = sorted(other for other in every if other.rsplit("#", 1)[-1] == name and other != key)[:1]
    close = close or [prefix + match for match in difflib.get_close_matches(name, list(known), n=1)]
    close = close or difflib.get_close_matches(key, sorted(every), n=1)
    return f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """`key=value` strings -> (key, value); values are JSON when they parse as JSON, else strings."""
    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MMARError(f"--set {item!r}: expected KEY=VALUE (e.g. epochs=10 or train#batch_size=2)")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        parsed.append((key, value))
    return parsed


def split_key(key: str) -> list[str]:
    """`train#batch_size` (MONAI) and `train.batch_size` (Clara) name the same key."""
    return [part for part in key.replace(".", "#").split("#") if part]


def set_by_path(config: dict[str, Any], key: str, value: Any) -> None:
    parts = split_key(key)
    node: Any = config
    for index, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, key)]
            continue
        if part not in node:
            if index == 0 and part not in SECTION_KEYS:
                raise MMARError(f"--set {key}: unknown config key {_with_hint(part, TOP_LEVEL_KEYS | set(ENV_KEYS))}")
            node[part] = {}  # a known section the recipe leaves out (e.g. multi_gpu), or a component's argument
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise MMARError(f"--set {key}: '{part}' is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise MMARError(f"--set {key}: '{part}' is not an index of a list of {len(node)}")
    return int(part)


def num_training_epoch_per_valid(config: dict[str, Any]) -> int:
    """Clara 3's key, or v4's `num_interval_per_valid`."""
    value = config.get("num_training_epoch_per_valid", config.get("num_interval_per_valid", 1))
    if not isinstance(value, int) or value < 1:
        raise MMARError(f"config: num_training_epoch_per_valid must be a positive integer, got {value!r}")
    return value
