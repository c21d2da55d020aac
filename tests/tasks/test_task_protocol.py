"""mmar.tasks.Task: every task module provides everything the runtime calls on it (no getattr probes)."""

from __future__ import annotations

import inspect
import typing

import pytest

from mmar import tasks
from mmar.errors import MMARError
from mmar.job import spec


def members() -> set[str]:
    names = set(typing.get_type_hints(tasks.Task)) | {n for n, v in vars(tasks.Task).items() if inspect.isfunction(v)}
    return {n for n in names if not n.startswith("_")}


@pytest.mark.parametrize("name", tasks.TASKS)
def test_each_task_provides_the_protocol(name):
    task = tasks.get_task(name)
    missing = sorted(m for m in members() if not hasattr(task, m))
    assert missing == [], f"mmar.tasks.{name} lacks {missing}"
    for member in members():
        declared = vars(tasks.Task).get(member)
        if inspect.isfunction(declared):  # the same parameters, less the protocol's self
            wanted = [p for p in inspect.signature(declared).parameters if p != "self"]
            got = list(inspect.signature(getattr(task, member)).parameters)
            assert got[:len(wanted)] == wanted or "facts" in wanted, (name, member, got)


def test_the_task_names_are_the_jobs():
    assert tasks.TASKS is spec.TASKS
    with pytest.raises(MMARError, match="choose one of segmentation, classification"):
        tasks.get_task("detection")


def test_the_defaults_of_a_task_without_the_hook():
    segmentation = tasks.get_task("segmentation")
    assert segmentation.extra_scalars(None) == {}
    with pytest.raises(MMARError, match="train#mixup is not available for the segmentation task"):
        segmentation.mixup_targets({})
