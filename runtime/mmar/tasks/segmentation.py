"""3D segmentation: the default recipe `mmar init` writes, and how predictions and results are written.

The recipe is MONAI bundle syntax; everything here that is not a config template is about the task's
outputs (a NIfTI mask per case on the input's grid, per-class Dice, overlays).
"""

from __future__ import annotations

import csv
import io as _io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmar.eval_output import PREDICTIONS_DIR, name_of, short_names
from mmar.io import atomic_path, atomic_write

NAME = "segmentation"
KEY_METRIC = "val_mean_dice"
# what `mmar validate` writes beside metrics.json, replaced as one set (mmar.eval_output)
VALIDATION_OUTPUTS = ("cases.csv", "overlays")


def _keys(with_label: bool = True) -> list[str]:
    return ["@image_key", "@label_key"] if with_label else ["@image_key"]


def preprocessing(with_label: bool = True, pad: bool = False) -> list[dict[str, Any]]:
    """Deterministic steps (cached by the engine). `pad=True` is the training flavour: patches of
    `spatial_size` fit, the foreground/background voxel indices the patch sampler needs are computed once
    here instead of for every draw, and MONAI's metadata tracking is off (training needs no inverse or file
    names; plain tensors make every random transform after the cache cheaper)."""
    keys = _keys(with_label)
    steps: list[dict[str, Any]] = [
        # labels may be absent (inference reads the same recipe without ground truth)
        {"_target_": "mmar.transforms.LoadCased", "keys": keys, "allow_missing_keys": True},
        {"_target_": "EnsureChannelFirstd", "keys": keys, "allow_missing_keys": True},
        {
            "_target_": "mmar.transforms.SegmentationCased",
            "image_key": "@image_key",
            "label_key": "@label_key",
            "num_classes": "@num_classes",
        },
        {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True, "channel_wise": True},
    ]
    if pad:
        steps += [
            {"_target_": "SpatialPadd", "keys": keys, "spatial_size": "@spatial_size", "allow_missing_keys": True},
            {"_target_": "FgBgToIndicesd", "keys": "@label_key", "fg_postfix": "_fg", "bg_postfix": "_bg"},
            {"_target_": "EnsureTyped", "keys": keys, "track_meta": False},
        ]
    else:
        steps.append({"_target_": "EnsureTyped", "keys": keys, "track_meta": True, "allow_missing_keys": True})
    return steps


def augmentation() -> list[dict[str, Any]]:
    """Random steps on the cached tensors: foreground-oversampled patches (2 of 3 centred on a label voxel;
    nnU-Net forces 1 of 3), a random rotation (up to 15 degrees about each axis) and scaling (+-15 %) of one
    patch in 5 as nnU-Net does, flips on every axis, intensity jitter.

    The rotation works on the patch, after cropping: on the cached volume it would invalidate the
    foreground indices computed once in the cache. On hippocampus it raised the validation Dice of a 60-epoch
    run from 0.8781 to 0.8825 (docs/speed.md)."""
    keys = _keys()
    return [
        {
            "_target_": "RandCropByPosNegLabeld",
            "keys": keys,
            "label_key": "@label_key",
            "spatial_size": "@spatial_size",
            "pos": 2,
            "neg": 1,
            "num_samples": "@train#samples_per_volume",
            # computed once in the cached preprocessing; the sampler pops them, so they never reach a batch
            "fg_indices_key": "$@label_key + '_fg'",
            "bg_indices_key": "$@label_key + '_bg'",
        },
        {
            "_target_": "RandAffined",
            "keys": keys,
            "prob": 0.2,
            "rotate_range": [0.26, 0.26, 0.26],
            "scale_range": [0.15, 0.15, 0.15],
            "mode": ["bilinear", "nearest"],
            "padding_mode": "zeros",
            "spatial_size": "@spatial_size",
            "cache_grid": True,
        },
        {"_target_": "RandFlipd", "keys": keys, "prob": 0.5, "spatial_axis": 0},
        {"_target_": "RandFlipd", "keys": keys, "prob": 0.5, "spatial_axis": 1},
        {"_target_": "RandFlipd", "keys": keys, "prob": 0.5, "spatial_axis": 2},
        {"_target_": "RandScaleIntensityd", "keys": "@image_key", "factors": 0.1, "prob": 0.5},
        {"_target_": "RandShiftIntensityd", "keys": "@image_key", "offsets": 0.1, "prob": 0.5},
    ]


def metric_postprocessing() -> dict[str, Any]:
    # no softmax before the argmax: it does not change which class is largest. mmar's AsDiscreted is MONAI's
    # with a channel argmax 10x faster on CPUs (mmar/transforms.py)
    return {
        "_target_": "Compose",
        "transforms": [
            {
                "_target_": "mmar.transforms.AsDiscreted",
                "keys": ["pred", "label"],
                "argmax": [True, False],
                "to_onehot": ["@num_classes", "@num_classes"],
            },
        ],
    }


def sliding_window() -> dict[str, Any]:
    return {
        "_target_": "SlidingWindowInferer",
        "roi_size": "@spatial_size",
        "sw_batch_size": 8,
        "overlap": 0.25,
        "mode": "gaussian",
    }


def mirrored_sliding_window() -> dict[str, Any]:
    """The sliding window on the volume and its 7 mirrors, softmax averaged (nnU-Net's test-time mirroring).

    8 times the inference cost for +0.003 to +0.005 mean Dice on hippocampus (docs/speed.md); used by
    `mmar validate` and `mmar infer`, not by the per-epoch validation during training, which only has to
    rank the epochs. `--set 'validate#inferer#mirror_axes=[]'` turns it off."""
    return {**sliding_window(), "_target_": "mmar.inferers.SlidingWindowMirrorInferer", "mirror_axes": [0, 1, 2]}


def validate_section(mirrored: bool = False) -> dict[str, Any]:
    return {
        "datalist_key": "validation",
        "batch_size": 1,
        "num_workers": 0,
        "preprocessing": preprocessing(with_label=True),
        "inferer": mirrored_sliding_window() if mirrored else sliding_window(),
        "postprocessing": metric_postprocessing(),
        "key_metric": KEY_METRIC,
        "metrics": {
            KEY_METRIC: {
                "_target_": "MeanDice",
                "include_background": False,
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
                "save_details": True,
            }
        },
        "overlays": 3,
    }


# The default run is a fixed number of optimizer steps rather than of epochs, so that a small dataset
# is not under-trained and a large one does not run for days. 3500 steps of 4 patches: for hippocampus
# (167 cases, 84 steps an epoch) 42 epochs, so that the cosine schedule has annealed by about the half
# hour the speed issue allows on a 2-core CPU (an estimate from the per-epoch cost, docs/speed.md).
TRAINING_STEPS = 3500
BATCH_SIZE = 2
SAMPLES_PER_VOLUME = 2
EMA_DECAY = 0.99  # about 100 steps of memory: 1.2 epochs of hippocampus (docs/speed.md, round 6)


def default_epochs(num_training: int, steps: int = TRAINING_STEPS, batch_size: int = BATCH_SIZE) -> int:
    steps_per_epoch = max(1, -(-int(num_training) // batch_size))
    return int(min(300, max(10, round(steps / steps_per_epoch))))


def default_configs(
    *, num_classes: int, in_channels: int, spatial_size: Sequence[int], epochs: int | None = None,
    num_training: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """config_train.json and config_validation.json for a new segmentation MMAR.

    The recipe is chosen for time to a good model (measured in bench/train.py, docs/speed.md):
    foreground-oversampled patches of about the median volume, 4 per step, with nnU-Net's rotation/scaling;
    a 3-level UNet of nnU-Net's width (32-64-128-256: +0.005 Dice over 16-128 on hippocampus, and with
    bf16 autocast a CPU step costs about what the narrow network's float32 step did; a 4th level would work
    on 2-5 voxel wide maps at these patch sizes); batch Dice over the foreground + cross-entropy; AdamW with
    a cosine schedule that anneals within the run; validation in one window per small volume, mirrored
    (test-time augmentation) in `mmar validate` / `mmar infer`.
    """
    if epochs is None:
        epochs = default_epochs(num_training) if num_training else 100
    train = {
        "task": NAME,
        "epochs": epochs,
        "learning_rate": 2e-3,
        "num_training_epoch_per_valid": 1,
        "amp": True,
        "determinism": {"random_seed": 42},
        "num_classes": num_classes,
        "image_key": "image",
        "label_key": "label",
        "spatial_size": list(spatial_size),
        "network": {
            "_target_": "monai.networks.nets.UNet",
            "spatial_dims": 3,
            "in_channels": in_channels,
            "out_channels": "@num_classes",
            "channels": [32, 64, 128, 256],
            "strides": [2, 2, 2],
            "num_res_units": 2,
            "norm": "INSTANCE",
        },
        "train": {
            "datalist_key": "training",
            "batch_size": BATCH_SIZE,
            "samples_per_volume": SAMPLES_PER_VOLUME,
            # random patches are drawn in worker processes while the network computes, over the shared
            # cache: "auto" is 2 on a CPU and up to 4 on a GPU, whose ~15 ms step 2 workers cannot keep fed
            "num_workers": "auto",
            "cache": {"rate": 1.0, "max_ram_fraction": 0.5},
            # Dice over the foreground classes only, pooled over the batch (nnU-Net's "batch dice"): a patch
            # without one of the structures then does not pull its Dice term to 0
            "loss": {
                "_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True,
                "include_background": False, "batch": True,
            },
            # fused: one kernel per step for all parameters (torch's default is a multi-tensor kernel per
            # operation on a GPU, a Python loop over the parameters on a CPU), and with fp16 scaling the
            # kernel reads the inf check on the device, so GradScaler.step does not wait for the GPU
            "optimizer": {
                "_target_": "torch.optim.AdamW",
                "params": "$@network.parameters()",
                "lr": "@learning_rate",
                "weight_decay": 1e-5,
                "fused": True,
            },
            "lr_scheduler": {
                "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
                "optimizer": "@train#optimizer",
                "T_max": "@epochs",
            },
            # validate and save an exponential moving average of the weights (engine/weight_average.py):
            # Dice 0.85 an epoch sooner on hippocampus and about +0.01 in epochs 8 to 10, same training
            "ema": {"decay": EMA_DECAY},
            "preprocessing": preprocessing(with_label=True, pad=True),
            "augmentation": augmentation(),
        },
        "validate": validate_section(),
    }
    validation = {
        "validate": validate_section(mirrored=True),
        "infer": {"datalist_key": "validation", "output_postfix": "seg", "output_ext": ".nii.gz"},
    }
    return train, validation


# ---- outputs -------------------------------------------------------------------------------------


def prediction_path(out_dir: Path, case_name: str, postfix: str, ext: str) -> Path:
    """`case_name` is the image's unique relative name (mmar.eval_output.case_names): 'case_a/imaging'
    -> out_dir/predictions/case_a/imaging_seg.nii.gz. `out_dir` is the output folder (eval/, or a run's
    staging folder in it); predictions are in infer's own folder there, so that no image's name (one under
    a data folder called `overlays/`, say) can put its prediction inside validate's set."""
    return Path(out_dir) / PREDICTIONS_DIR / f"{case_name}_{postfix}{ext}"


def write_mask(mask: np.ndarray, reference_file: str, path: Path) -> None:
    """Write `mask` (spatial, the reference image's voxel order) with the reference's exact geometry."""
    mask = mask.astype(np.uint8 if mask.max() < 256 else np.int16)
    if str(reference_file).endswith((".nii", ".nii.gz")) and str(path).endswith((".nii", ".nii.gz")):
        import nibabel as nib

        ref = nib.load(reference_file)
        header = ref.header.copy()
        header.set_data_dtype(mask.dtype)
        header["dim"][0] = 3
        header.set_data_shape(mask.shape)
        header["scl_slope"], header["scl_inter"] = 1, 0  # a mask is stored raw
        image = nib.Nifti1Image(mask, ref.affine, header)
        image.set_qform(ref.get_qform(), code=int(ref.header["qform_code"]))
        image.set_sform(ref.get_sform(), code=int(ref.header["sform_code"]))
        with atomic_path(path) as tmp:
            nib.save(image, str(tmp))
        return
    import SimpleITK as sitk

    ref = sitk.ReadImage(str(reference_file))
    out = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)))
    out.CopyInformation(ref) if ref.GetDimension() == 3 else None
    with atomic_path(path) as tmp:
        sitk.WriteImage(out, str(tmp))


def per_class_dice(details) -> list[float]:
    """Mean Dice per foreground class from MeanDice's per-case details [cases, classes] (NaN skipped)."""
    if hasattr(details, "detach"):  # a tensor, on the GPU when validation ran there
        details = details.detach().cpu()
    array = np.asarray(details, dtype=float)
    if array.ndim == 1:
        array = array[:, None]
    return [float(np.nanmean(column)) if np.isfinite(column).any() else float("nan") for column in array.T]


def write_case_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    columns = list(rows[0])
    with atomic_write(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def best_slice(label: np.ndarray, pred: np.ndarray) -> int:
    """The axial slice (last axis) with the most structure in ground truth or prediction."""
    area = (label > 0).sum(axis=(0, 1)) + (pred > 0).sum(axis=(0, 1))
    return int(np.argmax(area)) if area.any() else label.shape[-1] // 2


def overlay_png(image: np.ndarray, label: np.ndarray, pred: np.ndarray, title: str, path: Path) -> None:
    """A slice with ground truth (green) and prediction (red) outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4, 4), dpi=100)
    axis.imshow(image.T, cmap="gray", origin="lower")
    for mask, color in ((label, "lime"), (pred, "red")):
        for value in np.unique(mask[mask > 0]):
            axis.contour((mask == value).T.astype(float), levels=[0.5], colors=color, linewidths=1)
    axis.set_title(title, fontsize=8)
    axis.axis("off")
    buffer = _io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())


# ---- the workflow's hooks ------------------------------------------------------------------------


def _spatial(tensor) -> np.ndarray:
    """[C, X, Y, Z] one-hot or index tensor -> [X, Y, Z] index array."""
    array = tensor.detach().cpu().numpy()
    return array.argmax(axis=0) if array.shape[0] > 1 else array[0]


def check_items(datalist, list_key: str, items: list[dict[str, Any]], config: dict[str, Any]) -> None:
    """The workflow's check where it reads a labelled list (training, validation), before any image is
    decoded: the config's spatial_size fits the 3-D network (mmar.tasks.check_spatial_size)."""
    check_config(config)


def check_config(config: dict[str, Any]) -> None:
    from mmar.tasks import check_spatial_size

    check_spatial_size(config, 3, "[96,96,96]")


def extra_scalars(evaluator) -> dict[str, float]:
    """No per-epoch scalars beyond the key metric (the Task protocol: classification adds per-label AUC)."""
    return {}


def mixup_targets(config: dict[str, Any]):
    """`train#mixup` mixes classification labels only: a segmentation config that asks for it is refused."""
    from mmar.errors import MMARError

    raise MMARError(f"config: train#mixup is not available for the {NAME} task (classification only); remove it")


def check_finite(image, reference: str) -> None:
    """A preprocessed image with a NaN or infinite voxel is refused, naming its file.

    One NaN voxel is enough: the intensity normalization's mean and standard deviation become NaN, every
    voxel with them, and the network's output; the argmax of NaN logits is class 0, so the case scored Dice
    0.0000 and its mask was all background, with no word of why. A preprocessing step that replaces such
    values (the image is then finite here) makes the image acceptable."""
    import torch

    tensor = image if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return
    from mmar.errors import MMARError

    raise MMARError(f"{reference}: {_non_finite_voxels(reference)}the intensity normalization spreads them over the "
                    "whole image, and its prediction would be all background (Dice 0). Replace them (e.g. with the "
                    "background value) in the image, or add a preprocessing step that does, and run again")


def _non_finite_voxels(reference: str) -> str:
    """'3 of 4096 voxels are NaN or infinite: ' read from the file itself (the preprocessed image is all NaN by
    then), or a plainer phrase where it cannot be read."""
    try:
        if str(reference).endswith((".nii", ".nii.gz")):
            import nibabel as nib

            data = np.asanyarray(nib.load(reference).dataobj)
        else:
            import SimpleITK as sitk

            data = sitk.GetArrayViewFromImage(sitk.ReadImage(str(reference)))
        count = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        if count:
            return f"{count} of {np.size(data)} voxels are NaN or infinite: "
    except Exception:  # noqa: BLE001 - only the figure is lost; the error names the file anyway
        pass
    return "the image holds NaN or infinite voxel values: "


class CaseCollector:
    """Per-case file names and one overlay slice per case, gathered while the evaluator runs."""

    def __init__(self, config: dict[str, Any]):
        check_config(config)
        self.label_key = config.get("label_key", "label")
        self.cases: list[dict[str, Any]] = []

    def on_iteration(self, engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        from mmar.transforms import source_file

        for output in outputs:
            check_finite(output["image"], source_file(output["image"]))
            image, label, pred = output["image"], _spatial(output["label"]), _spatial(output["pred"])
            z = best_slice(label, pred)
            self.cases.append({
                "image": source_file(image),
                "label": source_file(output["label"], ""),
                "slice": (image[0, :, :, z].detach().cpu().numpy(), label[:, :, z], pred[:, :, z], z),
            })


def summarize(evaluator, collector: CaseCollector, config: dict[str, Any]) -> dict[str, Any]:
    key = config["validate"]["key_metric"]
    details = evaluator.state.metric_details.get(key)
    if details is None:
        return {}
    per_class = per_class_dice(details)
    first = 0 if config["validate"]["metrics"][key].get("include_background", True) else 1
    from mmar.engine.metrics_json import undefined_names

    dice = {str(first + i): value for i, value in enumerate(per_class)}
    # a class absent from every case and every prediction has no Dice: null in metrics.json, named here
    return {"dice_per_class": dice, "classes_without_dice": undefined_names(dice)}


def intervals(evaluator, collector: CaseCollector, config: dict[str, Any], units, unit: str,
              settings: dict[str, Any]) -> dict[str, Any] | None:
    """Bootstrap intervals of the mean Dice over cases and of each class's mean Dice (mmar.engine.intervals)."""
    from mmar.engine import intervals as bootstrap

    key = config["validate"]["key_metric"]
    details = evaluator.state.metric_details.get(key)
    if details is None:
        return None
    first = 0 if config["validate"]["metrics"][key].get("include_background", True) else 1
    return bootstrap.segmentation(details, first, key, units, unit, settings)


def write_validation(eval_dir: Path, evaluator, collector: CaseCollector, config: dict[str, Any],
                     names: dict[str, str] | None = None) -> None:
    """eval/cases.csv (a row per case, the image's full path first) and overlays of the best and worst cases,
    each named after its case's shortest distinct path tail (`case_a_imaging`, not two `imaging`)."""
    key = config["validate"]["key_metric"]
    details = evaluator.state.metric_details.get(key)
    first = 0 if config["validate"]["metrics"][key].get("include_background", True) else 1
    rows = []
    for index, case in enumerate(collector.cases):
        row: dict[str, Any] = {"image": case["image"], "label": case["label"]}
        if details is not None:
            values = np.asarray(details[index].detach().cpu() if hasattr(details[index], "detach") else details[index], float)
            values = np.atleast_1d(values)
            for offset, value in enumerate(values):
                row[f"dice_{first + offset}"] = round(float(value), 6)
            row["mean_dice"] = round(float(np.nanmean(values)), 6) if np.isfinite(values).any() else float("nan")
        rows.append(row)
    write_case_csv(eval_dir / "cases.csv", rows)
    count = int(config["validate"].get("overlays", 3))
    if count <= 0 or not rows or "mean_dice" not in rows[0]:
        return
    order = sorted(range(len(rows)), key=lambda i: np.nan_to_num(rows[i]["mean_dice"], nan=-1.0))
    chosen = {("worst", i) for i in order[:count]} | {("best", i) for i in order[-count:]}
    overlay_names = short_names([name_of(names or {}, row["image"]) for row in rows])
    for kind, index in sorted(chosen):
        image, label, pred, z = collector.cases[index]["slice"]
        name = overlay_names[index]
        title = f"{kind}: {name} slice {z} Dice {rows[index]['mean_dice']:.3f} (green truth, red prediction)"
        overlay_png(image, label, pred, title, eval_dir / "overlays" / f"{kind}_{name}.png")


def inference_postprocessing(parser):
    if parser.config.get("infer", {}).get("postprocessing"):
        return parser.get_parsed_content("infer#postprocessing")
    from monai.transforms import Activationsd, AsDiscreted, Compose

    return Compose([Activationsd(keys="pred", softmax=True), AsDiscreted(keys="pred", argmax=True)])


class PredictionWriter:
    """One mask per case, on the input's grid (affine, spacing, orientation) and in its voxel order, at
    the image's unique relative name (`names`, from mmar.eval_output.case_names)."""

    def __init__(self, eval_dir: Path, config: dict[str, Any], names: dict[str, str] | None = None):
        check_config(config)  # made before the evaluator runs: a wrong spatial_size is named, not a traceback
        infer = config.get("infer", {})
        self.eval_dir = Path(eval_dir)
        self.names = names or {}
        self.postfix = infer.get("output_postfix", "seg")
        self.ext = infer.get("output_ext", ".nii.gz")
        self.written: list[Path] = []

    def on_iteration(self, engine) -> None:
        from mmar.errors import MMARError
        from mmar.transforms import source_file, spatial_shape

        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for output in outputs:
            reference = source_file(output["image"])
            check_finite(output["image"], reference)
            mask = _spatial(output["pred"])
            expected = spatial_shape(reference)
            if tuple(mask.shape) != tuple(expected):
                raise MMARError(
                    f"prediction for {reference} has shape {mask.shape}, the image {expected}: the validation "
                    "preprocessing changes the voxel grid (remove spatial transforms or add invertible ones)"
                )
            path = prediction_path(self.eval_dir, name_of(self.names, reference), self.postfix, self.ext)
            write_mask(mask, reference, path)
            self.written.append(path)

    def finish(self) -> list[Path]:
        return self.written


# ---- init: fit the recipe to the data ----------------------------------------------------------


def patch_size(shapes: list[tuple[int, ...]], cap: int = 96, multiple: int = 8) -> list[int]:
    """The median shape rounded up to a multiple of 8 (the default UNet's 3 poolings), at most `cap` per axis.

    Small volumes are then trained nearly whole with little padding (hippocampus, median 35x50x36:
    40x56x40, nnU-Net's own patch for it, where rounding up to 16 gave 48x64x48, 57 % of it zero
    padding); large ones (CT) as 96^3 patches. Validation windows are the same size, so
    a small volume is validated in one window.
    """
    median = np.median(np.asarray(shapes), axis=0)
    return [int(min(cap, max(multiple, -(-int(m) // multiple) * multiple))) for m in median]


def inspect_datalist(datalist: Path, sample: int = 12) -> dict[str, Any]:
    """Input channels, number of classes and patch size, from the training list's headers and labels."""
    import nibabel as nib

    from mmar.datalist import load_items
    from mmar.errors import MMARError

    items = load_items(datalist, "training")
    chosen = items[:: max(1, len(items) // sample)][:sample]
    first = chosen[0]["image"]
    if isinstance(first, list):
        in_channels = len(first)
    else:
        shape = nib.load(first).shape
        in_channels = int(shape[3]) if len(shape) > 3 else 1
    shapes = []
    num_classes = 2
    for item in chosen:
        image = item["image"][0] if isinstance(item["image"], list) else item["image"]
        shapes.append(tuple(nib.load(image).shape[:3]))
        try:
            label = np.asanyarray(nib.load(item["label"]).dataobj)
        except Exception as error:
            raise MMARError(f"{datalist}: cannot read label {item['label']}: {error}") from None
        if label.ndim > 3 and label.shape[3] > 1:  # one-hot: one channel per class (background optional)
            channels = int(label.shape[3])
            num_classes = max(num_classes, channels if np.all(label.sum(axis=3) >= 1) else channels + 1)
        else:
            num_classes = max(num_classes, int(label.max()) + 1)
    return {"num_classes": num_classes, "in_channels": in_channels, "spatial_size": patch_size(shapes),
            "num_training": len(items)}
