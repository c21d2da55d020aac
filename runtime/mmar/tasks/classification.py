"""2D (multi-label) classification from PNG: the default recipe `mmar init` writes, and the task's outputs.

Labels follow the datalist's `label_format` (see mmar.label_format): a 2D DenseNet121 trained on mixed
pairs (`train#mixup`) with a moving average of its weights (chosen by bench/train_classification.py,
docs/classification.md) with one output per binary label and a segment of k outputs per k-class
label, BCE + CE (mmar.losses.MultiLabelLoss),
sigmoid/softmax per segment, and the mean AUC over labels as the key metric. Outputs: `eval/metrics.json`
(mean/per-label AUC and accuracy), `eval/cases.csv` (one row per validated image) and, from `infer`,
`eval/predictions.csv` (one row per image: the image path, then one probability per network output).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmar.errors import MMARError
from mmar.io import atomic_write
from mmar import label_format as lf

NAME = "classification"
KEY_METRIC = "val_mean_auc"
PREDICTIONS_FILE = "predictions.csv"
CASES_FILE = "cases.csv"
# what `mmar validate` writes beside metrics.json, replaced as one set (mmar.eval_output)
VALIDATION_OUTPUTS = (CASES_FILE,)


def config_format(config: dict[str, Any]) -> lf.LabelFormat:
    return lf.parse(config.get("label_format"), config.get("label_names"), where="config: label_format")


# ---- the recipe ----------------------------------------------------------------------------------


def preprocessing() -> list[dict[str, Any]]:
    """Read (colour -> one channel), check the label, scale to [0, 1], bring to the configured size."""
    return [
        {
            "_target_": "mmar.transforms.LoadCased",
            "keys": "@image_key",
            "reader": "PILReader",  # pinned: ITK (if installed) would read RGB as a vector image
            "converter": {"_target_": "mmar.classification_transforms.PILGrayscale"},
        },
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key", "channel_dim": "no_channel"},
        {
            "_target_": "mmar.classification_transforms.ClassificationLabeld",
            "keys": "@label_key",
            "image_key": "@image_key",
            "label_format": "@label_format",
            "label_names": "@label_names",
        },
        # per image: 8- and 16-bit PNGs end up on the same scale
        {"_target_": "ScaleIntensityd", "keys": "@image_key", "minv": 0.0, "maxv": 1.0},
        {
            "_target_": "Resized",
            "keys": "@image_key",
            "spatial_size": "@spatial_size",
            "mode": "bilinear",
            "anti_aliasing": True,
        },
        {"_target_": "EnsureTyped", "keys": "@image_key", "dtype": "$torch.float32"},
    ]


def augmentation() -> list[dict[str, Any]]:
    # no flips: left/right matters on a chest X-ray (heart, situs)
    return [
        {
            "_target_": "RandAffined",
            "keys": "@image_key",
            "prob": 0.5,
            "rotate_range": 0.1,
            "scale_range": 0.1,
            "padding_mode": "zeros",
        },
        {"_target_": "RandScaleIntensityd", "keys": "@image_key", "factors": 0.1, "prob": 0.5},
        {"_target_": "RandShiftIntensityd", "keys": "@image_key", "offsets": 0.1, "prob": 0.5},
    ]


def validate_section() -> dict[str, Any]:
    return {
        "datalist_key": "validation",
        "batch_size": 64,
        "num_workers": 0,
        "preprocessing": preprocessing(),
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "mmar.classification_transforms.LabelActivationsd",
            "keys": "pred",
            "label_format": "@label_format",
        },
        "key_metric": KEY_METRIC,
        "metrics": {
            KEY_METRIC: {
                "_target_": "mmar.classification_metrics.MultiLabelAUC",
                "label_format": "@label_format",
                "label_names": "@label_names",
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
            }
        },
    }


# The default run is a fixed number of optimizer steps, as segmentation's (tasks/segmentation.py): a small
# list is not under-trained, a large one does not run for days. 600 steps of 32 images: 33 epochs of
# BreastMNIST (546 images), 32 of the NIH sample (600), each about 2 minutes on a 2-core CPU
# (docs/classification.md).
TRAINING_STEPS = 600
BATCH_SIZE = 32
# weights validated and saved: their moving average over ~100 steps (engine/weight_average.py); on
# BreastMNIST the validation AUC then moves 0.004-0.017 over the last third of training, 0.04-0.05 without
EMA_DECAY = 0.99
# training batches mixed in pairs, weight ~ Beta(1, 1), i.e. uniform (engine/mixup.py): on the NIH sample's
# held-out patients the last epoch's mean AUC was 0.48-0.60 without it, as the network memorised its 480
# images, and 0.60-0.66 with it; alpha 1 ahead of 0.4 there, level on BreastMNIST (docs/classification.md)
MIXUP_ALPHA = 1.0


def default_epochs(num_training: int, steps: int = TRAINING_STEPS, batch_size: int = BATCH_SIZE) -> int:
    steps_per_epoch = max(1, -(-int(num_training) // batch_size))
    return int(min(200, max(10, round(steps / steps_per_epoch))))


def network() -> dict[str, Any]:
    """MONAI's 2D DenseNet121 from scratch: one input channel, one output per binary label, k per k-class label.

    Chosen over a ResNet-18 with a stem sized to the image (the default of issue 23's first round), which
    scored 0.03-0.08 lower last-epoch AUC on both held-out fifths of BreastMNIST's training list and 0.007
    lower on its validation list (docs/classification.md).
    DenseNet121 pools a 32 px image down to 1x1 maps; on these small, weakly structured images that global
    summary generalised better than the ResNet's 2x2 maps, so the network is not sized to the image.
    """
    return {
        "_target_": "monai.networks.nets.DenseNet121",
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": "$sum(@label_format)",
    }


def default_configs(
    *, label_format: Sequence[int], label_names: Sequence[str], spatial_size: Sequence[int], epochs: int | None = None,
    num_training: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """config_train.json and config_validation.json for a new classification MMAR.

    Measured in bench/train_classification.py (docs/classification.md, which also says which goals the
    figures do not meet): DenseNet121, AdamW 1e-3 with a cosine schedule over a fixed step budget, mixup of
    the training batches, the moving average of the weights as the model (stable per-epoch validation, so
    the best-model rule does not pick a noisy peak), small affine + intensity augmentation and no flips
    (left/right matters on a chest X-ray).
    """
    if epochs is None:
        epochs = default_epochs(num_training) if num_training else 30
    train = {
        "task": NAME,
        "epochs": epochs,
        "learning_rate": 1e-3,
        "num_training_epoch_per_valid": 1,
        "amp": True,
        "determinism": {"random_seed": 42},
        "image_key": "image",
        "label_key": "label",
        "label_format": list(label_format),
        "label_names": list(label_names),
        "spatial_size": list(spatial_size),
        "network": network(),
        "train": {
            "datalist_key": "training",
            "batch_size": BATCH_SIZE,
            "num_workers": 0,
            "cache": {"rate": 1.0, "max_ram_fraction": 0.5},
            "loss": {"_target_": "mmar.losses.MultiLabelLoss", "label_format": "@label_format"},
            "optimizer": {  # fused AdamW, as segmentation's (tasks/segmentation.py says why)
                "_target_": "torch.optim.AdamW",
                "params": "$@network.parameters()",
                "lr": "@learning_rate",
                "weight_decay": 1e-4,
                "fused": True,
            },
            "lr_scheduler": {
                "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
                "optimizer": "@train#optimizer",
                "T_max": "@epochs",
            },
            # validate and save the moving average of the weights (engine/weight_average.py)
            "ema": {"decay": EMA_DECAY},
            # train on mixed pairs of images and labels (engine/mixup.py)
            "mixup": {"alpha": MIXUP_ALPHA},
            "preprocessing": preprocessing(),
            "augmentation": augmentation(),
        },
        "validate": validate_section(),
    }
    validation = {"validate": validate_section(), "infer": {"datalist_key": "validation"}}
    return train, validation


def mixup_targets(config: dict[str, Any]):
    """For `train#mixup` (engine/mixup.py): labels [B, len(label_format)] -> one column per network output,
    a binary label's 0/1 as it is, a categorical label's class index one-hot over its segment, which
    `mmar.losses.MultiLabelLoss` reads as soft targets once mixed."""
    import torch

    sizes = list(config_format(config).sizes)

    def targets(label: "torch.Tensor") -> "torch.Tensor":
        label = label.reshape(label.shape[0], -1)
        columns = []
        for index, size in enumerate(sizes):
            value = label[:, index]
            if size == 1:
                columns.append(value.float()[:, None])
            else:
                columns.append(torch.nn.functional.one_hot(value.long(), size).float())
        return torch.cat(columns, dim=1)

    return targets


# ---- init: fit the recipe to the data ------------------------------------------------------------


def spatial_size_for(shapes: list[tuple[int, int]], multiple: int = 32, smallest: int = 32, cap: int = 256) -> list[int]:
    """The median image size rounded up to a multiple of 32 (so that every stage of the network, which
    halves the grid up to 5 times, works on whole pixels), capped.

    28 px (MedMNIST) -> 32; 64 -> 64; a 1024 px chest X-ray -> 256 (prepare smaller PNGs to go faster).
    """
    median = np.median(np.asarray(shapes), axis=0)
    return [int(min(cap, max(smallest, -(-int(m) // multiple) * multiple))) for m in median]


def png_size(path: str) -> tuple[int, int]:
    """(width, height) from the header, in the order MONAI's PILReader returns the array."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return tuple(image.size)  # type: ignore[return-value]
    except (OSError, UnidentifiedImageError) as error:
        raise MMARError(f"cannot read image {path}: {error}") from None


def inspect_datalist(datalist: Path, sample: int = 16) -> dict[str, Any]:
    """label_format/label_names from the datalist (every item checked), spatial size from PNG headers."""
    from mmar.datalist import load_items, load_json

    data = load_json(datalist)
    fmt = lf.from_datalist(data, datalist)
    items = load_items(datalist, "training")
    for key, value in data.items():  # every list, so a bad validation item is found at init, not at epoch 1
        if isinstance(value, list) and value and isinstance(value[0], dict):
            lf.check_items(value, fmt, f"{datalist}: {key}")
    chosen = items[:: max(1, len(items) // sample)][:sample]
    shapes = [png_size(item["image"] if isinstance(item["image"], str) else item["image"][0]) for item in chosen]
    return {"label_format": list(fmt.sizes), "label_names": list(fmt.names), "spatial_size": spatial_size_for(shapes),
            "num_training": len(items)}


def check_config(config: dict[str, Any]) -> None:
    from mmar.tasks import check_spatial_size

    check_spatial_size(config, 2, "[224,224]")


def check_items(datalist: str | Path, list_key: str, items: list[dict[str, Any]], config: dict[str, Any]) -> None:
    """Every labelled item fits the configured label_format, and so does the datalist's own declaration.

    Meant to run where the workflow reads a list (before any image is decoded); the same check runs per
    image in `ClassificationLabeld` as a second line. And the config's spatial_size fits the 2-D network.
    """
    check_config(config)
    fmt = config_format(config)
    data = json.loads(Path(datalist).read_text(encoding="utf-8"))
    if "label_format" in data:
        declared = lf.from_datalist(data, datalist)
        if not lf.same_layout(declared, fmt):
            raise MMARError(
                f"{datalist}: label_format {list(declared.sizes)} differs from the MMAR's config label_format "
                f"{list(fmt.sizes)} (the network was built for the latter; re-run `mmar init --force` or fix one)"
            )
    lf.check_items(items, fmt, f"{datalist}: {list_key}", image_key=config.get("image_key", "image"),
                   label_key=config.get("label_key", "label"))


# ---- the workflow's hooks ------------------------------------------------------------------------


def _outputs(engine) -> list[dict[str, Any]]:
    return engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]


def _image_name(output: dict[str, Any], image_key: str) -> str:
    from mmar.transforms import source_file

    return source_file(output.get("image", output.get(image_key)))


def _rows(probs, label=None):
    return np.asarray(probs.detach().cpu() if hasattr(probs, "detach") else probs, dtype=float).reshape(-1)


class CaseCollector:
    """Per image: file name, probabilities and ground truth, gathered while the evaluator runs."""

    def __init__(self, config: dict[str, Any]):
        self.format = config_format(config)
        self.image_key = config.get("image_key", "image")
        self.images: list[str] = []
        self.probs: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def on_iteration(self, engine) -> None:
        for output in _outputs(engine):
            self.images.append(_image_name(output, self.image_key))
            self.probs.append(_rows(output["pred"]))
            self.labels.append(_rows(output["label"]))

    def arrays(self):
        import torch

        return torch.as_tensor(np.stack(self.probs)), torch.as_tensor(np.stack(self.labels))


def summarize(evaluator, collector: CaseCollector, config: dict[str, Any]) -> dict[str, Any]:
    from mmar.classification_metrics import summary

    if not collector.probs:
        return {}
    return summary(*collector.arrays(), collector.format)


def intervals(evaluator, collector: CaseCollector, config: dict[str, Any], units, unit: str,
              settings: dict[str, Any]) -> dict[str, Any] | None:
    """Bootstrap intervals of the mean AUC and of each label's AUC (mmar.engine.intervals)."""
    from mmar.engine import intervals as bootstrap

    if not collector.probs:
        return None
    probs, labels = collector.arrays()
    return bootstrap.classification(probs.numpy(), labels.numpy(), collector.format, config["validate"]["key_metric"],
                                    units, unit, settings)


def write_validation(eval_dir: Path, evaluator, collector: CaseCollector, config: dict[str, Any],
                     names: dict[str, str] | None = None) -> None:
    """eval/cases.csv: image, then per label the truth, the prediction (0.5 / argmax), per output the probability."""
    from mmar.classification_metrics import predicted

    if not collector.probs:
        return
    fmt = collector.format
    probs, labels = collector.arrays()
    preds = predicted(probs, fmt)
    header = (["image"] + [f"{n}_true" for n in fmt.names] + [f"{n}_pred" for n in fmt.names]
              + [f"{c}_prob" for c in fmt.columns()] + ["labels_correct"])
    with atomic_write(Path(eval_dir) / CASES_FILE, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for image, p, y, hat in zip(collector.images, probs.tolist(), labels.long().tolist(), preds.tolist()):
            writer.writerow([image, *y, *hat, *(f"{v:.6f}" for v in p), sum(a == b for a, b in zip(y, hat))])


def extra_scalars(evaluator) -> dict[str, float]:
    """Per-label AUC (and accuracy) of the last validation, for TensorBoard and the history."""
    details = getattr(evaluator.state, "metric_details", {}) or {}
    scalars: dict[str, float] = {}
    for value in details.values():
        if isinstance(value, dict) and "auc_per_label" in value:
            scalars.update({f"auc/{name}": auc for name, auc in value["auc_per_label"].items() if auc == auc})
            scalars["val_accuracy"] = value["accuracy"]
    return scalars


def inference_postprocessing(parser):
    if parser.config.get("infer", {}).get("postprocessing"):
        return parser.get_parsed_content("infer#postprocessing")
    from mmar.classification_transforms import LabelActivationsd

    return LabelActivationsd(keys="pred", label_format=config_format(parser.config))


class PredictionWriter:
    """eval/predictions.csv: one row per image, the path first, then one probability per network output.

    Rows are kept in memory and the file is written once, atomically, at the end: an interrupted run
    leaves the previous predictions.csv as it was.
    """

    def __init__(self, eval_dir: Path, config: dict[str, Any], names: dict[str, str] | None = None):
        check_config(config)
        # rows name each image by its full path: images sharing a file name stay apart (names unused)
        self.path = Path(eval_dir) / PREDICTIONS_FILE
        self.format = config_format(config)
        self.image_key = config.get("image_key", "image")
        self.rows: list[list[Any]] = []

    def on_iteration(self, engine) -> None:
        for output in _outputs(engine):
            probs = _rows(output["pred"])
            if probs.size != self.format.num_outputs:
                raise MMARError(
                    f"prediction for {_image_name(output, self.image_key)} has {probs.size} values, label_format "
                    f"{list(self.format.sizes)} needs {self.format.num_outputs}"
                )
            self.rows.append([_image_name(output, self.image_key), *(f"{v:.6f}" for v in probs)])

    def finish(self) -> list[Path]:
        with atomic_write(self.path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", *self.format.columns()])
            writer.writerows(self.rows)
        return [self.path]
