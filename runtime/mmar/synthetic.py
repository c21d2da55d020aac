"""Synthetic data for the demo and the tests: small volumes with learnable structures.

Each volume holds two ellipsoids of different brightness on a noisy background (labels 1 and 2), with a
random, non-identity affine so that geometry bugs show. Uses MONAI's `create_test_image_3d` for the shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def random_affine(rng: np.random.Generator) -> np.ndarray:
    spacing = rng.uniform(0.8, 1.5, size=3)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = rng.uniform(-50, 50, size=3)
    return affine


def segmentation_case(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    from monai.data import create_test_image_3d

    shape = (size, size + 4, size - 2)  # anisotropic grid: axes mixed up would be caught
    image, label = create_test_image_3d(*shape, num_objs=4, rad_max=max(4, size // 5), rad_min=3,
                                        noise_max=0.3, num_seg_classes=2, random_state=np.random.RandomState(int(rng.integers(1 << 31))))
    image = (image * 1000 + 100).astype(np.float32)  # MR-like intensities
    return image, label.astype(np.uint8)


def write_segmentation_dataset(out: str | Path, *, cases: int = 24, size: int = 32, seed: int = 0,
                               validation_fraction: float = 0.25, raw: bool = False) -> Path:
    """Volumes, masks and `datalist.json` under `out`.

    `raw=True` writes the volumes as a scanner would hand them over, at anisotropic spacing, under
    `out/raw/imagesTr` and `out/raw/labelsTr`; the datalist then names the 1 mm isotropic files that
    `mmar convert -r 1` makes from them in `out/imagesTr` and `out/labelsTr` (the demo's first steps).
    """
    import nibabel as nib

    out = Path(out)
    target = out / "raw" if raw else out
    (target / "imagesTr").mkdir(parents=True, exist_ok=True)
    (target / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for index in range(cases):
        image, label = segmentation_case(size, rng)
        affine = random_affine(rng)
        if raw:  # thick slices along the last axis, as in a clinical MR or CT series
            affine[:3, 2] *= 2.0
        name = f"case_{index:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), str(target / "imagesTr" / name))
        nib.save(nib.Nifti1Image(label, affine), str(target / "labelsTr" / name))
        items.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    split = max(1, int(round(cases * validation_fraction)))
    datalist = {"description": "mmar synthetic segmentation demo", "labels": {"0": "background", "1": "dim", "2": "bright"},
                "training": items[split:], "validation": items[:split]}
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist, indent=2))
    return path


# ---- 2D classification ----------------------------------------------------------------------------

CLASSIFICATION_FORMAT = [1, 1, 3]
CLASSIFICATION_NAMES = ["disk", "bar", "square_position"]
PNG_KINDS = ("8-bit", "16-bit", "RGBA")  # cycled over the cases, so every dataset mixes all three


def classification_case(size: int, labels: list[int], rng: np.random.Generator) -> np.ndarray:
    """A noisy image in [0, 1]: a bright disk (label 0), a horizontal bar (label 1), and a small square in the
    left, middle or right third (label 2, categorical). Positions and sizes vary, so it has to be learnt."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    image = rng.normal(0.2, 0.05, (size, size)).astype(np.float32)
    if labels[0]:
        cy, cx, r = rng.uniform(size * 0.25, size * 0.75, 2).tolist() + [size * rng.uniform(0.12, 0.2)]
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] += 0.5
    if labels[1]:
        row, thickness = int(rng.integers(size // 8, size - size // 4)), max(2, size // 10)
        image[row:row + thickness, size // 8: size - size // 8] += 0.35
    third = size // 3
    side = max(3, size // 6)
    top = int(rng.integers(0, size - side))
    left = labels[2] * third + int(rng.integers(0, max(1, third - side)))
    image[top:top + side, left:left + side] += 0.6
    return np.clip(image, 0, 1)


def save_png(image: np.ndarray, path: Path, kind: str) -> None:
    """Write a [0, 1] image as 8-bit grayscale, 16-bit grayscale or RGBA (gray in R = G = B, opaque alpha)."""
    from PIL import Image

    if kind == "16-bit":
        Image.fromarray(np.round(image * 40000).astype(np.uint16)).save(path)
        return
    gray = np.round(image * 255).astype(np.uint8)
    if kind == "RGBA":
        Image.fromarray(np.stack([gray, gray, gray, np.full_like(gray, 255)], axis=-1), mode="RGBA").save(path)
    else:
        Image.fromarray(gray).save(path)


def write_classification_dataset(out: str | Path, *, cases: int = 24, size: int = 32, seed: int = 0,
                                 validation_fraction: float = 0.25) -> Path:
    """PNG images with two binary labels and one 3-class label (label_format [1, 1, 3]) and their datalist.

    Labels are laid out so that any 6 consecutive cases hold both values of each binary label and all three
    classes, hence the validation list (the first cases) has a defined AUC for every label.
    """
    out = Path(out)
    (out / "png").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for index in range(cases):
        labels = [(index // 3) % 2, (index // 2) % 2, index % 3]
        kind = PNG_KINDS[index % len(PNG_KINDS)]
        name = f"png/case_{index:03d}.png"
        save_png(classification_case(size, labels, rng), out / name, kind)
        items.append({"image": name, "label": labels})
    split = max(1, int(round(cases * validation_fraction)))
    datalist = {"description": "mmar synthetic multi-label classification demo",
                "label_format": CLASSIFICATION_FORMAT, "label_names": CLASSIFICATION_NAMES,
                "training": items[split:], "validation": items[:split]}
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist, indent=2))
    return path
