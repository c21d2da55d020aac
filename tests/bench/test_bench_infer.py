"""bench/infer.py: PyTorch eager against eager under the config's amp (what `mmar validate` runs), one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mmar.engine.precision import cpu_bf16_supported

ROOT = Path(__file__).resolve().parents[2]


def test_eager_and_eager_amp_run_on_the_same_volumes(tmp_path):
    report = tmp_path / "infer.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "infer.py"), "--data", str(tmp_path / "none"), "--cases", "2",
         "--repeats", "1", "--formats", "eager,eager-amp", "--roi", "32,32,32", "--json", str(report)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    formats = json.loads(report.read_text())["formats"]
    if not cpu_bf16_supported():
        assert list(formats) == ["eager"] and "eager-amp: skipped" in result.stdout
        return
    assert list(formats) == ["eager", "eager-amp"] and "eager-amp: torch.bfloat16 autocast" in result.stdout
    # the same network in bf16: close to float32's logits, not equal to them
    assert 0 < formats["eager-amp"]["max_abs_diff_vs_eager"] < 1.0
