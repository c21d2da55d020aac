"""What differs between tasks (default recipe, outputs); the workflow itself is shared.

A task is a module of this package that provides everything `Task` lists: the engine, `mmar init`, export and
validate call these and nothing else, so a new task adds a module and the engine needs no change.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, cast

from mmar.errors import MMARError
from mmar.job.spec import TASKS  # the MMARJob's spec.task: the one list of task names  # noqa: F401


class Task(Protocol):
    """What the runtime calls on a task module (mmar.tasks.segmentation, mmar.tasks.classification)."""

    NAME: str
    KEY_METRIC: str  # the default validate#key_metric
    VALIDATION_OUTPUTS: Sequence[str]  # what `mmar validate` writes into eval/ beside metrics.json
    CaseCollector: type  # collects each validation case's outputs (`CaseCollector(config).on_iteration`)
    PredictionWriter: type  # writes each case's prediction (`PredictionWriter(dir, config, names=...)`)

    # `mmar init`: the facts of a datalist, then the default recipe built from them
    def inspect_datalist(self, datalist: Path) -> dict[str, Any]: ...
    def default_configs(self, **facts: Any) -> tuple[dict[str, Any], dict[str, Any]]: ...

    # checks before anything heavy runs
    def check_config(self, config: dict[str, Any]) -> None: ...
    def check_items(self, datalist: str | Path, list_key: str, items: list[dict[str, Any]], config: dict[str, Any]) -> None: ...

    # training: per-epoch scalars beside the key metric ({} when none), and `train#mixup`'s soft targets
    # (MMARError where the task has no mixup)
    def extra_scalars(self, evaluator: Any) -> dict[str, float]: ...
    def mixup_targets(self, config: dict[str, Any]) -> Callable[[Any], Any]: ...

    # validation and inference
    def summarize(self, evaluator: Any, collector: Any, config: dict[str, Any]) -> dict[str, Any]: ...
    def intervals(self, evaluator: Any, collector: Any, config: dict[str, Any], units: Any, unit: str,
                  settings: dict[str, Any]) -> dict[str, Any] | None: ...
    def write_validation(self, eval_dir: Path, evaluator: Any, collector: Any, config: dict[str, Any],
                         names: dict[str, str] | None = None) -> None: ...
    def inference_postprocessing(self, parser: Any) -> Any: ...


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise MMARError(f"unknown task {name!r} (PROCESSING_TASK / --task): choose one of {', '.join(TASKS)}")
    return cast(Task, importlib.import_module(f"mmar.tasks.{name}"))


def check_spatial_size(config: dict, default_dims: int, example: str) -> None:
    """`spatial_size` (the patch, sliding-window and export size) is one whole number per spatial axis of the
    network: `network#spatial_dims` where the config gives it, else the task's (3 for segmentation, 2 for
    classification). A wrong length otherwise surfaces as a traceback from deep inside MONAI's sliding
    window or crop, after the data were loaded. A reference or expression (`@x`, `$...`) is MONAI's to
    evaluate and is not checked here."""
    if "spatial_size" not in config:
        return
    value = config["spatial_size"]
    if isinstance(value, str) and value.startswith(("@", "$")):
        return
    network = config.get("network")
    key = next((k for k in ("spatial_dims", "dimensions") if isinstance(network, dict) and k in network), None)
    dims = network[key] if key else None  # `dimensions`: the name in MONAI before 0.6 (Clara v4 configs)
    source = f"network#{key}" if isinstance(dims, int) and not isinstance(dims, bool) and dims > 0 else None
    dims = dims if source else default_dims

    def whole(size) -> bool:
        return isinstance(size, int) and not isinstance(size, bool) and (size >= 1 or size == -1)

    if not (isinstance(value, (list, tuple)) and len(value) == dims and all(whole(s) for s in value)):
        import json

        try:
            shown = json.dumps(value)
        except (TypeError, ValueError):
            shown = repr(value)
        axes = f"({source} is {dims})" if source else f"of the task's {dims}-D images"
        raise MMARError(f"config: spatial_size must be {dims} whole numbers >= 1 (or -1 for a whole axis), one per "
                        f"spatial axis {axes}, e.g. spatial_size={example}; got {shown}")
