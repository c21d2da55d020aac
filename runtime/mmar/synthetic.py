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
                               validation_fraction: float = 0.25) -> Path:
    import nibabel as nib

    out = Path(out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for index in range(cases):
        image, label = segmentation_case(size, rng)
        affine = random_affine(rng)
        name = f"case_{index:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), str(out / "imagesTr" / name))
        nib.save(nib.Nifti1Image(label, affine), str(out / "labelsTr" / name))
        items.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    split = max(1, int(round(cases * validation_fraction)))
    datalist = {"description": "mmar synthetic segmentation demo", "labels": {"0": "background", "1": "dim", "2": "bright"},
                "training": items[split:], "validation": items[:split]}
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist, indent=2))
    return path
