"""`mmar export` on a full disk: one line naming the file, exit 1, no temp file, the previous export kept.

TorchScript used to abort the whole process (exit 134, a C++ `c10::Error` trace from torch's zip writer,
its temp file left behind); ONNX first printed a misleading "dynamic spatial axes not possible" and
exported again. The disk is simulated as tests/runs/test_runs_disk.py does: a file size limit (EFBIG, always
possible) and, where the tests run as root, a tmpfs that is really full (ENOSPC).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import run_mmar
from runs_support import digests, file_size_limit, mount_tmpfs, temp_files

FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}


@pytest.fixture(scope="module")
def exported(trained_seg_mmar, tmp_path_factory):
    """A copy of the trained MMAR with a complete earlier export (what a failed export must leave alone)."""
    root = tmp_path_factory.mktemp("export_disk") / "mmar"
    shutil.copytree(trained_seg_mmar, root)
    run_mmar("export", str(root), "--formats", "torchscript,onnx")
    return root


@pytest.fixture
def mmar(exported, tmp_path):
    root = tmp_path / "mmar"
    shutil.copytree(exported, root)
    return root


def _export(root, fmt, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", "mmar", "export", str(root), "--formats", fmt],
                          capture_output=True, text=True, preexec_fn=preexec_fn)


def _assert_one_line(result, models, fmt, before, message):
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [f"error: {message} writing {models / FILES[fmt]} (nothing was exported: the previous export "
                      f"in {models}, if any, is kept as it was; free some space and run the command again)"], \
        result.stderr
    for noise in ("Traceback", "c10::Error", "terminate called", "dynamic spatial axes"):
        assert noise not in result.stdout + result.stderr
    assert not temp_files(models), "temp files left behind"
    assert digests(models) == before  # model.ts, model.onnx and export.json of the earlier export, unchanged


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_an_export_past_the_file_size_limit_names_the_file(mmar, fmt):
    """model.ts and model.onnx (150-230 kB) cannot be written; the checkpoint is only read."""
    models = mmar / "models"
    before = digests(models)
    result = _export(mmar, fmt, preexec_fn=file_size_limit(60_000))
    _assert_one_line(result, models, fmt, before, "file size limit exceeded")


def test_an_export_on_a_full_disk_names_the_file(mmar, tmp_path):
    """models/ on a file system with room for what is there and 40 kB more (ENOSPC for either format)."""
    models = mmar / "models"
    saved = tmp_path / "saved"
    shutil.copytree(models, saved)
    used = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file())
    if not mount_tmpfs(models, used + 4096 * (len(list(saved.rglob("*"))) + 8) + 40_000):
        pytest.skip("no tmpfs can be mounted here (needs root); the file size limit test covers the write path")
    try:
        shutil.copytree(saved, models, dirs_exist_ok=True)
        before = digests(models)
        for fmt in FILES:
            _assert_one_line(_export(mmar, fmt), models, fmt, before, "no space left on device")
    finally:
        subprocess.run(["umount", str(models)], check=True)
