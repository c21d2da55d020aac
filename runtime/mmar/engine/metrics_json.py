"""Metrics as strict JSON: an undefined value (NaN, +-inf) is written as `null`, never as a bare `NaN`.

Python's `json` writes float("nan") as `NaN`, which is not JSON: strict parsers (JavaScript's `JSON.parse`,
Go's encoding/json, a Kubernetes status patch) reject the whole file. A metric is undefined where its
input does not define it (the AUC of a label without positives in the validation list, the Dice of a
class absent from every case); the task's summary names those (`labels_without_auc`,
`classes_without_dice`) and the value itself becomes `null`.
"""

from __future__ import annotations

import math
from typing import Any


def is_undefined(value: Any) -> bool:
    """A float-like value that is NaN or infinite (Python, numpy or 0-d torch scalars)."""
    if isinstance(value, bool) or value is None:
        return False
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    return isinstance(value, float) and not math.isfinite(value)


def nulls_for_undefined(data: Any) -> Any:
    """`data` with every undefined number replaced by None, recursively through dicts, lists and tuples."""
    if isinstance(data, dict):
        return {key: nulls_for_undefined(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [nulls_for_undefined(value) for value in data]
    return None if is_undefined(data) else data


def undefined_names(values: dict[str, Any]) -> list[str]:
    """The names whose value is undefined (for `labels_without_auc` and the like), in order."""
    return [name for name, value in values.items() if value is None or is_undefined(value)]
