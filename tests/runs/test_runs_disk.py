"""A write that fails for want of space names the file and keeps every earlier result (real CLI)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from runs_support import copy_mmar, digests, file_size_limit, load, mount_tmpfs, temp_files

KEPT = ("model.ckpt", "model_final.ckpt", "train_state.pt")


@pytest.fixture
def trained(trained_seg_mmar, tmp_path):
    return copy_mmar(trained_seg_mmar, tmp_path / "mmar")


def _train(root, *args, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", "mmar", "train", str(root), *args], capture_output=True, text=True,
                          preexec_fn=preexec_fn)


def _assert_kept(models, before, result, message):
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"error: {message} writing {models / 'train_state.pt'}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "unexpected pos" not in result.stderr
    after = digests(models)
    assert {name: after[name] for name in KEPT} == {name: before[name] for name in KEPT}
    assert load(models / "train_state.pt")["trainer"]["epoch"] == 2
    assert not temp_files(models)


def test_a_write_past_the_file_size_limit_names_the_file(trained):
    """train_state.pt (600 kB) cannot be written, model.ckpt (150 kB) could: the state is the first write
    of the epoch, so nothing changes."""
    models = trained / "models"
    before = digests(models)
    result = _train(trained, "--set", "epochs=3", preexec_fn=file_size_limit(400_000))
    _assert_kept(models, before, result, "file size limit exceeded")


def test_a_full_disk_names_the_file(trained, tmp_path):
    """models/ on a file system with room for what is there and 300 kB more (ENOSPC for the state)."""
    models = trained / "models"
    saved = tmp_path / "saved"
    shutil.copytree(models, saved)
    used = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file())
    if not mount_tmpfs(models, used + 4096 * (len(list(saved.rglob("*"))) + 8) + 300_000):
        pytest.skip("no tmpfs can be mounted here (needs root); the file size limit test covers the write path")
    try:
        shutil.copytree(saved, models, dirs_exist_ok=True)
        before = digests(models)
        result = _train(trained, "--set", "epochs=3")
        _assert_kept(models, before, result, "no space left on device")
    finally:
        subprocess.run(["umount", str(models)], check=True)
