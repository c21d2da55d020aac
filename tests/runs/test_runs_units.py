"""The pieces behind "never lose a result", on their own (fast): the re-run decision, the MMAR lock, the
temp files of dead writers, the repair of model files from the state, a full disk named."""

from __future__ import annotations

import errno
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmar.engine import checkpoint
from mmar.engine.train import plan_run
from mmar.errors import MMARError
from mmar.io import atomic_path, atomic_write, remove_stale_temp_files, temp_writer_pid
from mmar.lock import hold


def _state(epoch, max_epochs, mode="train", complete=None):
    return {"trainer": {"epoch": epoch, "max_epochs": max_epochs}, "mode": mode,
            "complete": epoch >= max_epochs if complete is None else complete,
            "progress": {"key_metric": "val_mean_dice", "best_metric": 0.5, "best_epoch": 2, "model_epoch": 2}}


def test_the_re_run_decision():
    assert plan_run(None, "train", 4, restart=False).action == "fresh"
    assert plan_run(_state(2, 4), "train", 4, restart=False).action == "resume"
    finished = plan_run(_state(4, 4), "train", 4, restart=False)
    assert finished.action == "finished" and "already finished 4 epochs" in finished.message
    assert "best val_mean_dice 0.5000 at epoch 2" in finished.message and "--restart" in finished.message
    assert plan_run(_state(4, 4), "train", 6, restart=False).action == "resume"  # extended
    assert plan_run(_state(4, 4), "train", 4, restart=True).action == "fresh"
    assert plan_run(_state(3, 10), "train", 2, restart=False).action == "finished"  # epochs lowered below the state
    # fine-tuning a trained model is a new run; `train` over a fine-tuning is not silently a new one
    assert plan_run(_state(4, 4), "finetune", 2, restart=False).action == "fresh"
    assert plan_run(_state(1, 1, "finetune"), "train", 4, restart=False).action == "finished"
    with pytest.raises(MMARError, match="unfinished fine-tuning.*--finetune.*--restart"):
        plan_run(_state(1, 3, "finetune"), "train", 4, restart=False)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temp_files_of_dead_writers_are_removed(tmp_path):
    with atomic_path(tmp_path / "model.ckpt") as tmp:
        assert temp_writer_pid(tmp.name) == os.getpid()  # the name carries the writer
    dead = _dead_pid()
    stale = [tmp_path / f".model.ckpt.{dead}.ab12.tmp.ckpt", tmp_path / "sub" / f".a.nii.gz.{dead}.x.tmp.nii.gz"]
    alive = tmp_path / ".model.ckpt.1.cd34.tmp.ckpt"  # PID 1 is alive (and not this process)
    other = tmp_path / ".hidden"
    for path in [*stale, alive, other]:
        path.parent.mkdir(exist_ok=True)
        path.write_text("x")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert alive.exists() and other.exists() and not any(p.exists() for p in stale)


def test_a_second_holder_is_refused_with_the_holders_pid_and_host(tmp_path):
    (tmp_path / "config").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from mmar.lock import hold
        with hold({str(tmp_path)!r}, "train {tmp_path}"):
            print("held", flush=True)
            sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(MMARError, match=rf"in use by `mmar train {tmp_path}` \(PID {holder.pid} on host "):
            with hold(tmp_path, "validate"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with hold(tmp_path, "validate") as path:  # the kernel released the dead holder's lock
        assert path == tmp_path / "models" / ".mmar.lock"


def test_a_full_disk_is_named_and_the_previous_file_kept(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(MMARError, match=f"no space left on device writing {target}"):
        with atomic_write(target) as handle:
            handle.write("new")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    with pytest.raises(ValueError):  # any other error goes on up as it is
        with atomic_write(target):
            raise ValueError("not a disk problem")


def test_model_files_are_repaired_from_the_state(tmp_path):
    weights = {"weight": torch.ones(2)}
    averaged = {"weight": torch.full((2,), 3.0)}
    state = {"trainer": {"epoch": 3}, "model": weights, "ema": {"updates": 9, "weights": averaged},
             "complete": True, "meta": {"task": "segmentation"},
             "progress": {"key_metric": "dice", "best_metric": 0.7, "best_epoch": 3, "model_epoch": 3}}
    checkpoint.save_weights(tmp_path / "model.ckpt", weights, epoch=2, metric=0.6)
    assert checkpoint.repair_models(tmp_path, state, log=lambda *_: None) == ["model.ckpt", "model_final.ckpt"]
    best = torch.load(tmp_path / "model.ckpt", weights_only=False)
    assert (best["epoch"], best["metric"], best["task"]) == (3, 0.7, "segmentation")
    torch.testing.assert_close(best["model"]["weight"], averaged["weight"])
    assert checkpoint.repair_models(tmp_path, state, log=lambda *_: None) == []  # nothing twice
    # a state whose model.ckpt is of an earlier epoch: nothing it could write (the weights are not in it)
    state["progress"].update(best_epoch=2, model_epoch=2, best_metric=-math.inf)
    (tmp_path / "model.ckpt").unlink()
    assert checkpoint.repair_models(tmp_path, state, log=lambda *_: None) == []
    assert not Path(tmp_path / "model.ckpt").exists()
