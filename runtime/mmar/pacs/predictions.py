"""`mmar infer --dicom-seg`: the datalist entries that carry their source series (`"dicom"`, as `mmar pull`
writes them), the NIfTI prediction infer wrote for each, and the DICOM SEG written beside it
(`<case>_<postfix>.dcm`, e.g. `case_seg.dcm` beside `case_seg.nii.gz`).

The plan is made before inference runs, so a missing source folder or a classification MMAR fails in
seconds, not after the model has run over every case. Names follow infer's own (mmar.eval_output).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mmar.errors import MMARError

SEG_SUFFIX = ".dcm"


@dataclass
class Case:
    image: str  # absolute
    dicom: Path  # the source series folder, absolute
    prediction: Path  # the NIfTI infer writes
    seg: Path  # the DICOM SEG written beside it


def list_key_of(archive, key: str | None) -> str:
    """The list infer predicts (as mmar.engine.evaluate.infer chooses it)."""
    config = archive.config
    return key or config.get("infer", {}).get("datalist_key") or config["validate"].get("datalist_key", "validation")


def plan(archive, key: str | None) -> list[Case]:
    from mmar.datalist import load_items
    from mmar.engine.evaluate import data_root
    from mmar.eval_output import case_names, name_of
    from mmar.pacs.seg import check_source_uids
    from mmar.tasks.segmentation import prediction_path

    if archive.task != "segmentation":
        raise MMARError(f"--dicom-seg: DICOM Segmentations are made of segmentation predictions; this MMAR's task is "
                        f"{archive.task!r}")
    config = archive.config
    list_key = list_key_of(archive, key)
    image_key, label_key = config.get("image_key", "image"), config.get("label_key", "label")
    datalist = archive.env.get("DATASET_JSON")
    if not datalist:
        raise MMARError(f"{archive.root}/config/environment.json: DATASET_JSON is not set")
    base = config.get("image_base_dir") or archive.env.get("DATA_ROOT") or None
    items = load_items(datalist, list_key, base_dir=base, image_key=image_key, label_key=label_key, require_label=False)
    root = data_root(archive)
    images = [_first(item[image_key]) for item in items]
    names = case_names(images, root)
    infer = config.get("infer", {})
    postfix, ext = infer.get("output_postfix", "seg"), infer.get("output_ext", ".nii.gz")
    cases = []
    for index, (item, image) in enumerate(zip(items, images)):
        if not item.get("dicom"):
            continue
        source = Path(os.path.expanduser(str(item["dicom"])))
        if not source.is_absolute():  # relative to where the images' paths start (mmar.datalist.load_items)
            source = (Path(base).resolve() if base else Path(datalist).resolve().parent) / source
        if not source.is_dir():
            raise MMARError(f"{datalist}: {list_key}[{index}].dicom: source series folder not found: {source}")
        try:
            check_source_uids(source)
        except MMARError as error:
            raise MMARError(f"{datalist}: {list_key}[{index}].dicom: {error}") from None
        prediction = prediction_path(archive.eval_dir, name_of(names, image), postfix, ext)
        stem = prediction.name[: -len(ext)] if ext and prediction.name.endswith(ext) else prediction.name
        cases.append(Case(image, source, prediction, prediction.with_name(stem + SEG_SUFFIX)))
    return cases


def _first(value) -> str:
    return os.fspath(value[0] if isinstance(value, (list, tuple)) else value)


def label_names(archive) -> dict | None:
    """The class names: the datalist's `labels` (MSD style, {"1": "liver"}), else the config's `label_names`
    (a list indexed by class value, or the same mapping), else None ("class <k>")."""
    from mmar.datalist import load_json

    datalist = archive.env.get("DATASET_JSON")
    labels = load_json(datalist).get("labels") if datalist else None
    if isinstance(labels, dict) and labels:
        return labels
    configured = archive.config.get("label_names")
    if isinstance(configured, list):
        return {str(value): name for value, name in enumerate(configured)}
    return configured if isinstance(configured, dict) else None


def write_segs(archive, cases: list[Case], log=print) -> list[Path]:
    """One DICOM SEG per case, each written atomically beside its NIfTI prediction."""
    from mmar import __version__
    from mmar.pacs.seg import build_segmentation, read_source_series, write_segmentation

    names, num_classes = label_names(archive), archive.config.get("num_classes")
    algorithm = archive.root.resolve().name
    written = []
    for case in cases:
        if not case.prediction.is_file():
            raise MMARError(f"--dicom-seg: the prediction {case.prediction} of {case.image} was not written")
        sources = read_source_series(case.dicom)
        dataset = build_segmentation(case.prediction, sources, names, num_classes if isinstance(num_classes, int) else None,
                                     algorithm=f"mmar {algorithm}", version=__version__, log=log)
        write_segmentation(dataset, case.seg)
        written.append(case.seg)
    log(f"{len(written)} DICOM Segmentation(s) -> {archive.eval_dir}")
    return written
