"""bench/mirrors.py: mmar validate with the mirrors one call each and as one batch, alternating."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_both_variants_validate_the_same_model_alike(trained_seg_mmar, tmp_path):
    root = tmp_path / "mmar"
    shutil.copytree(trained_seg_mmar, root)  # validate rewrites eval/: the session's MMAR stays as it is
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "mirrors.py"), "--mmar", str(root), "--repeats", "1"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = dict(re.findall(r"^  (sequential|batched) .* metric (\d\.\d+) ", result.stdout, re.M))
    assert set(metrics) == {"sequential", "batched"}
    assert abs(float(metrics["sequential"]) - float(metrics["batched"])) < 1e-4  # one method, two schedules
    assert re.search(r"^  sequential .* ratio 1\.00$", result.stdout, re.M)


def test_an_mmar_without_a_model_is_refused(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "mirrors.py"), "--mmar", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "no models/model.ckpt" in result.stderr
