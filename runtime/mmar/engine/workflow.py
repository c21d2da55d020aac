"""Shared building blocks of training, validation and inference: the datalist of a section, the device,
the dataset/loader from the recipe's transforms, and the MONAI evaluator.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.transforms import Compose, EnsureTyped

from mmar.archive import Archive
from mmar.datalist import check_channels_aligned, load_items, load_json
from mmar.engine.data import loader_workers, make_dataset, make_loader
from mmar.engine.window_batches import CropWindowPaddingd, PadToWindowCollate, SameWindowBatches, batchable_window
from mmar.errors import MMARError
from mmar.tasks import get_task


def device_for(archive: Archive) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def keys_of(config: dict[str, Any]) -> tuple[str, str]:
    return config.get("image_key", "image"), config.get("label_key", "label")


def base_dir(archive: Archive) -> str | None:
    return archive.config.get("image_base_dir") or archive.env.get("DATA_ROOT") or None


def has_list(archive: Archive, list_key: str) -> bool:
    data = load_json(_datalist_path(archive))
    return isinstance(data.get(list_key), list) and bool(data[list_key])


def _datalist_path(archive: Archive):
    path = archive.env.get("DATASET_JSON")
    if not path:
        raise MMARError(f"{archive.root}/config/environment.json: DATASET_JSON is not set")
    return path


def section_items(archive: Archive, section: str, *, list_key: str | None = None, require_label: bool = True):
    """The checked, absolute-path items of the datalist list a section reads."""
    config = archive.config
    image_key, label_key = keys_of(config)
    key = list_key or config.get(section, {}).get("datalist_key") or ("training" if section == "train" else "validation")
    items = load_items(
        _datalist_path(archive), key, base_dir=base_dir(archive),
        image_key=image_key, label_key=label_key, require_label=require_label,
    )
    for index, item in enumerate(items):
        check_channels_aligned(item, image_key, f"{_datalist_path(archive)}: {key}[{index}].{image_key}")
    if require_label:  # task-specific label checks, before any image is decoded
        get_task(archive.task).check_items(_datalist_path(archive), key, items, config)
    return items


def dataset_transforms(parser, section: str, *, keys, with_augmentation: bool, plain: bool = False):
    """The section's deterministic (cached) and random transforms, instantiated from the config.

    Training batches are always plain tensors: a MetaTensor's metadata is pickled from the loader's workers
    and collated with every batch, and each op of the forward pass pays MetaTensor's __torch_function__;
    training reads neither (2 workers yield a batch 1.3x faster on a 2-core CPU). `plain` makes a dataset
    without augmentation cache plain tensors too (training's per-epoch validation, which reads no metadata).
    """
    config = parser.config
    deterministic = parser.get_parsed_content(f"{section}#preprocessing", instantiate=True)
    random = parser.get_parsed_content(f"{section}#augmentation") if with_augmentation and config[section].get("augmentation") else []
    if with_augmentation:
        random = [*random, _plain_tensors(keys)]
    elif plain:
        deterministic = [*deterministic, _plain_tensors(keys)]
    return deterministic, random


def build_dataset(parser, section: str, items, *, keys, with_augmentation: bool, plain: bool = False, log=print):
    deterministic, random = dataset_transforms(parser, section, keys=keys, with_augmentation=with_augmentation,
                                               plain=plain)
    return make_dataset(items, deterministic, random, keys=keys, cache=parser.config[section].get("cache"), log=log)


def _plain_tensors(keys) -> EnsureTyped:
    return EnsureTyped(keys=list(keys), data_type="tensor", track_meta=False, allow_missing_keys=True)


class KeyedBatch:
    """`prepare_batch` for MONAI engines with configurable data keys (MONAI's default reads 'image'/'label')."""

    def __init__(self, image_key: str, label_key: str):
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, batch, device=None, non_blocking=False, **kwargs):
        image = batch[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        label = batch.get(self.label_key)
        if isinstance(label, torch.Tensor):
            label = label.to(device=device, non_blocking=non_blocking, **kwargs)
        else:
            label = None
        return image, label


def build_evaluator(parser, network, loader, device, *, with_metrics: bool = True, postprocessing=None,
                    amp: bool = False, amp_kwargs: dict[str, Any] | None = None, handlers=()) -> SupervisedEvaluator:
    config = parser.config
    image_key, label_key = keys_of(config)
    metrics: dict[str, Any] = {}
    key_metric = None
    if with_metrics:
        metrics = dict(parser.get_parsed_content("validate#metrics"))
        key_metric = config["validate"].get("key_metric")
        if key_metric not in metrics:
            raise MMARError(
                f"config: validate#key_metric {key_metric!r} is not one of validate#metrics ({', '.join(metrics)})"
            )
    if postprocessing is None:
        postprocessing = parser.get_parsed_content("validate#postprocessing")
    if _window_batched(loader):  # cases padded to shared windows: cropped back (the output's keys) first
        postprocessing = Compose([CropWindowPaddingd(keys=["pred", "label"]), postprocessing])
    return SupervisedEvaluator(
        device=device,
        val_data_loader=loader,
        network=network,
        inferer=parser.get_parsed_content("validate#inferer"),
        prepare_batch=KeyedBatch(image_key, label_key),
        postprocessing=postprocessing,
        key_val_metric={key_metric: metrics.pop(key_metric)} if key_metric else None,
        additional_metrics=metrics or None,
        val_handlers=list(handlers) or None,
        non_blocking=True,  # see the trainer in engine/train.py
        amp=amp,
        amp_kwargs=amp_kwargs,
    )


def validation_loader(parser, items, *, keys, device: torch.device, plain: bool = False, dataset=None,
                      inferer=None, log=print):
    """The validation section's loader, over `dataset` when one was built already.

    `plain`: cases as plain tensors, for an evaluator whose outputs are only scored (training's per-epoch
    validation): MONAI's MetaTensor costs every op of the inference, the post-processing and the metric a
    `__torch_function__` dispatch, and the loader a collation of metadata.
    `inferer`: the evaluator's; when it is a sliding window, `validate#batch_size` is 1 (the default) and
    every case is cached, the cases that pad to the same windows share batches of up to `sw_batch_size`
    (engine/window_batches.py; `build_evaluator` then crops them back before the metric).
    """
    section = parser.config["validate"]
    workers = loader_workers(section.get("num_workers", 0), device.type, where="validate#num_workers")
    if dataset is None:
        dataset = build_dataset(parser, "validate", items, keys=keys, with_augmentation=False, plain=plain, log=log)
    batch_size = int(section.get("batch_size", 1))
    fully_cached = len(dataset) > 0 and getattr(dataset, "cache_num", 0) == len(dataset)
    if inferer is None or batch_size != 1 or not fully_cached:
        return make_loader(dataset, batch_size=batch_size, num_workers=workers)
    image_key, label_key = keys[0], keys[1] if len(keys) > 1 else None
    shapes = [tuple(dataset[index][image_key].shape[1:]) for index in range(len(dataset))]  # read from the cache
    window = batchable_window(inferer, spatial_dims=len(shapes[0]))
    if window is None:
        return make_loader(dataset, batch_size=batch_size, num_workers=workers)
    return make_loader(dataset, batch_sampler=SameWindowBatches(shapes, window, inferer.sw_batch_size),
                       collate_fn=PadToWindowCollate(window, image_key, label_key, cval=inferer.cval),
                       num_workers=workers)


def _window_batched(loader) -> bool:
    return isinstance(getattr(loader, "batch_sampler", None), SameWindowBatches)
