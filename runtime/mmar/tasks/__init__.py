"""What differs between tasks (default recipe, outputs); the workflow itself is shared."""

from __future__ import annotations

import importlib
from types import ModuleType

from mmar.errors import MMARError

TASKS = ("segmentation", "classification")


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise MMARError(f"unknown task {name!r} (PROCESSING_TASK / --task): choose one of {', '.join(TASKS)}")
    return importlib.import_module(f"mmar.tasks.{name}")


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
