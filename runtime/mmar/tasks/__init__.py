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
