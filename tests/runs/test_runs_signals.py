"""SIGTERM / SIGINT stop training at a safe point with a message; a second command on the same MMAR is
refused while one runs; temp files of killed writers are removed by the next run (real CLI, tiny data)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import run_mmar
from runs_support import load, start, state_epoch, temp_files, wait_for


EPOCHS = 60  # more than the test lets it run: it is stopped after an epoch or two


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.slow
def test_sigterm_and_sigint_stop_at_a_safe_point_and_a_second_run_is_refused(seg_mmar):
    models, evals = seg_mmar / "models", seg_mmar / "eval"
    models.mkdir(exist_ok=True)
    evals.mkdir(exist_ok=True)
    dead = _dead_pid()
    stale = [models / f".model.ckpt.{dead}.k2j3.tmp.ckpt", evals / f".metrics.json.{dead}.x8q1.tmp.json"]
    live = models / f".train_state.pt.{os.getpid()}.a1b2.tmp.pt"  # a live writer's (this test's): left alone
    for path in [*stale, live]:
        path.write_bytes(b"half a file")

    process = start("train", str(seg_mmar), "--set", f"epochs={EPOCHS}")
    wait_for(lambda: state_epoch(models) >= 1 or process.poll() is not None, what="the first epoch")
    # a second command on the same MMAR is refused, naming the holder
    for command in (["train", str(seg_mmar)], ["validate", str(seg_mmar)]):
        second = run_mmar(*command, check=False)
        assert second.returncode == 1, second.stdout
        assert f"PID {process.pid} on host {socket.gethostname()}" in second.stderr, second.stderr
        assert f"in use by `mmar train {seg_mmar}" in second.stderr and "Traceback" not in second.stderr

    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    waited = time.monotonic() - sent
    assert process.returncode == 143, (out, err)
    assert waited < 30, f"SIGTERM took {waited:.0f} s to stop the run"
    assert "stopped by SIGTERM: training ended in" in err and "train_state.pt holds epoch" in err, err
    assert "Traceback" not in err and "terminating due to exception" not in err, err
    assert all(str(path) in out for path in stale), out  # removed at the start of the run, and said so
    assert temp_files(models) == [live.name] and not temp_files(evals)
    saved = load(models / "train_state.pt")["trainer"]["epoch"]
    assert 1 <= saved < EPOCHS

    # the re-run resumes; Ctrl-C stops it alike (SIGINT to the whole process group: loader workers included)
    process = subprocess.Popen([sys.executable, "-m", "mmar", "train", str(seg_mmar), "--set", f"epochs={EPOCHS}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: state_epoch(models) > saved or process.poll() is not None, what="an epoch of the resumed run")
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, (out, err)
    assert f"after epoch {saved}" in out
    assert "stopped by SIGINT: training ended" in err and "terminating due to exception" not in err, err
    assert "Traceback" not in err
    live.unlink()
    assert not temp_files(models)
    state = load(models / "train_state.pt")
    assert [r["epoch"] for r in state["progress"]["history"]] == list(range(1, state["trainer"]["epoch"] + 1))
    assert saved < state["trainer"]["epoch"] < EPOCHS and not state["complete"]
