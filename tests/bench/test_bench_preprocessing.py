"""bench/preprocessing.py: the cached preprocessing, timed per transform, before and after round 7."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_both_variants_and_every_transform_are_timed(seg_data):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "preprocessing.py"), "--data", str(seg_data.parent), "--repeats", "2"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^\d+ train cases of .*, one thread, 2 repeats$", out, re.M)
    assert re.search(r"^  before .* ratio 1\.00$", out, re.M)
    assert re.search(r"^  now .* ratio \d\.\d\d$", out, re.M)
    for transform in ("LoadCased", "SegmentationCased", "NormalizeIntensityd", "SpatialPadd", "FgBgToIndicesd"):
        assert re.search(rf"^    {transform} +\d+\.\d\d$", out, re.M), transform


def test_a_folder_without_datalist_is_refused(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "preprocessing.py"), "--data", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "no datalist.json" in result.stderr
