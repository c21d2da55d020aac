"""A classification datalist's `label_format`: what each position of an item's `label` list means.

    {"label_format": [1, 1, 3], "label_names": ["effusion", "mass", "view"],
     "training": [{"image": "a.png", "label": [0, 1, 2]}, ...]}

`1` is a binary label (values 0 or 1), `k > 1` a categorical label with k classes (values 0..k-1). The
network has one output per binary label and one segment of k outputs per categorical label, in the
order of `label_format`; `columns` names those outputs (a binary label by its name, a categorical one
as `name=class`). This module only parses, checks and lays out; it imports no torch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from mmar.errors import MMARError


@dataclass(frozen=True)
class LabelFormat:
    sizes: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def num_outputs(self) -> int:
        return sum(self.sizes)

    def segments(self) -> list[tuple[int, int]]:
        """[start, stop) of each label's outputs in the network's output vector."""
        bounds, start = [], 0
        for size in self.sizes:
            bounds.append((start, start + size))
            start += size
        return bounds

    def columns(self) -> list[str]:
        """One name per network output (CSV columns of probabilities)."""
        names: list[str] = []
        for name, size in zip(self.names, self.sizes):
            names.extend([name] if size == 1 else [f"{name}={c}" for c in range(size)])
        return names

    def describe(self, index: int) -> str:
        size = self.sizes[index]
        return "a binary label (0 or 1)" if size == 1 else f"a categorical label with {size} classes (0..{size - 1})"


def parse(value: Any, names: Any = None, where: str = "label_format") -> LabelFormat:
    """`label_format` (and optional `label_names`) -> LabelFormat; anything else is a clear error."""
    if not isinstance(value, list) or not value:
        raise MMARError(
            f"{where}: must be a non-empty list of natural numbers, one per label (1 = binary, k > 1 = "
            f"categorical with k classes), got {value!r}"
        )
    for index, size in enumerate(value):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise MMARError(f"{where}[{index}]: must be a natural number (1 = binary, k > 1 = k classes), got {size!r}")
    if names is None:
        names = [f"label_{i}" for i in range(len(value))]
    where_names = where.replace("label_format", "label_names") if "label_format" in where else f"{where} label_names"
    if not isinstance(names, list) or len(names) != len(value) or not all(isinstance(n, str) and n for n in names):
        raise MMARError(f"{where_names}: must be a list of {len(value)} non-empty names (one per label_format entry), got {names!r}")
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise MMARError(f"{where_names}: name {duplicate!r} appears more than once")
    return LabelFormat(tuple(value), tuple(names))


def check_label(label: Any, fmt: LabelFormat, where: str) -> list[int]:
    """An item's `label` as a list of ints, checked against the format (length, integer values, range).

    Clara's datalists often quote their labels: "1" is the number 1, and a format of one label takes the
    bare value ("label": 1 or "1") as well as a list of one.
    """
    if len(fmt.sizes) == 1 and (label_number(label) is not None or isinstance(label, str)):
        label = [label]
    if not isinstance(label, (list, tuple)):
        raise MMARError(f"{where}: label must be a list of {len(fmt.sizes)} numbers (label_format {list(fmt.sizes)}), got {label!r}")
    if len(label) != len(fmt.sizes):
        raise MMARError(
            f"{where}: label has {len(label)} values, label_format {list(fmt.sizes)} has {len(fmt.sizes)} labels"
        )
    values = []
    for index, (value, size) in enumerate(zip(label, fmt.sizes)):
        number = label_number(value)
        if number is None or not number.is_integer() or not 0 <= int(number) < max(2, size):
            raise MMARError(
                f"{where}: label[{index}] ({fmt.names[index]}) is {value!r}; label_format says it is {fmt.describe(index)}"
            )
        values.append(int(number))
    return values


def label_number(value: Any) -> float | None:
    """A label value as a number: a real number, or a string holding one ("1", "0.0"); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def check_items(items: Iterable[dict[str, Any]], fmt: LabelFormat, where: str, *, image_key: str = "image",
                label_key: str = "label") -> None:
    """Every item that has a label must fit the format; the error names the list, the index and the image."""
    for index, item in enumerate(items):
        if label_key in item:
            check_label(item[label_key], fmt, f"{where}[{index}] ({item.get(image_key)})")


def from_datalist(data: dict[str, Any], path: Any) -> LabelFormat:
    """The format a datalist declares (`label_format`, optional `label_names`)."""
    if "label_format" not in data:
        raise MMARError(
            f"{path}: a classification datalist needs 'label_format', one natural number per label "
            '(1 = binary, k = k classes), e.g. "label_format": [1, 1, 1] for three binary labels'
        )
    return parse(data["label_format"], data.get("label_names"), where=f"{path}: label_format")


def same_layout(a: LabelFormat, b: LabelFormat) -> bool:
    return a.sizes == b.sizes


def as_list(fmt: LabelFormat | Sequence[int]) -> list[int]:
    return list(fmt.sizes) if isinstance(fmt, LabelFormat) else list(fmt)
