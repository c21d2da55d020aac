"""Issue 31, through the real CLI: the MMAR lock whatever the options look like (1), a second signal during
`torch.save` (10), `mmar run` never leaving an orphaned step (5), no orphan TensorBoard run (smaller items),
and the `--gate` value a shell redirect cut short (issue 36, item 2)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_mmar
from runs_support import (
    digests, kill_when, load, signal_frozen, signal_when, state_epoch, temp_files, wait_for,
)

from mmar import job as contract
from mmar import local_run


@pytest.fixture
def held(seg_mmar):
    """`seg_mmar` with its lock held by another process (as a running training holds it)."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from mmar.lock import hold
        with hold({str(seg_mmar)!r}, "train {seg_mmar} --set epochs=6"):
            print("held", flush=True)
            sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield seg_mmar, holder.pid
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("argv", [
    ["train", "--fine", "{mmar}", "--set", "epochs=2"],  # --finetune, abbreviated: the lost training
    ["train", "--res", "{mmar}"],                         # --restart
    ["validate", "--allow", "{mmar}"],                    # --allow-stale-export
    ["infer", "--dicom", "{mmar}"],                       # --dicom-seg
    ["export", "--formats=onnx", "--input-s", "1,1,16,16,16", "{mmar}"],  # --input-shape, abbreviated
], ids=["train-fine", "train-res", "validate-allow", "infer-dicom", "export-input"])
def test_an_abbreviated_option_before_the_mmar_still_takes_the_lock(held, argv):
    mmar, holder = held
    before = digests(mmar)
    run = run_mmar(*[a.format(mmar=mmar) for a in argv], check=False)
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert f"in use by `mmar train {mmar} --set epochs=6` (PID {holder} on host {socket.gethostname()}" in run.stderr
    assert "Traceback" not in run.stderr
    assert digests(mmar) == before  # nothing was moved, written or scaffolded


# ---- a second signal while torch.save writes (item 10) -----------------------------------------------


BIG_NETWORK = ["network#channels=[64,128,256,512]", "network#strides=[2,2,2]", "network#num_res_units=2"]
BIG_CHECKPOINT_MB = 75  # model.ckpt of BIG_NETWORK (19 M float32 weights)
CHECKPOINT_TEMP = r"\.model\.ckpt\..+\.tmp.*"


# An MMAR on NFS or FUSE: a write there can be interrupted by a signal, and Python then runs the handler inside
# it, in the middle of torch.save's write callback (on a local disk a write of the page cache is not
# interrupted, and the handler runs between torch.save's records, where stopping is clean). The commands the
# test starts write checkpoints through such a file: in Python, a megabyte at a time.
INTERRUPTIBLE_WRITES = """
import contextlib
import mmar.io

_atomic_write = mmar.io.atomic_write


class InterruptibleFile:
    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        view = memoryview(data).cast("B")
        for start in range(0, len(view), 1 << 20):
            self._handle.write(view[start:start + (1 << 20)])
        return len(view)

    def __getattr__(self, name):
        return getattr(self._handle, name)


@contextlib.contextmanager
def atomic_write(path, mode="w", **kwargs):
    with _atomic_write(path, mode, **kwargs) as handle:
        yield InterruptibleFile(handle) if "b" in mode else handle


mmar.io.atomic_write = atomic_write
"""


@pytest.mark.slow
def test_a_second_sigterm_inside_torch_save_ends_as_the_signal_not_a_crash(seg_mmar, tmp_path):
    """SIGTERM when `.model.ckpt.*tmp` appears; once the run has taken it, SIGTERM again while the temp file
    holds 2 to 60 of the checkpoint's 75 MB (the run frozen while that is checked): the second signal lands
    inside torch.save's write callback, which then raises."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(INTERRUPTIBLE_WRITES)
    models = seg_mmar / "models"
    log = tmp_path / "termination-log"
    process = subprocess.Popen([sys.executable, "-m", "mmar", "train", str(seg_mmar), "--set", "epochs=40",
                                *BIG_NETWORK], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "MMAR_TERMINATION_LOG": str(log),
                                    "PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))})
    lines: list[str] = []
    first_taken = threading.Event()

    def read_stderr():
        for line in process.stderr:
            lines.append(line)
            if "SIGTERM received" in line:
                first_taken.set()

    def half_written():
        if not first_taken.is_set():
            return None
        for name in os.listdir(models):
            if re.fullmatch(CHECKPOINT_TEMP, name):
                with contextlib.suppress(FileNotFoundError):
                    # weights being written (the pickled structure, written first, is a few kB), 15 MB still to go
                    if 2e6 < (models / name).stat().st_size < (BIG_CHECKPOINT_MB - 15) * 1e6:
                        return name
        return None

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        signal_when(process, models, CHECKPOINT_TEMP, signal.SIGTERM)
        landed = signal_frozen(process, half_written, signal.SIGTERM, poll=0.0005, timeout=120)
        out = process.stdout.read()
        process.wait(timeout=120)
        reader.join(30)
    finally:
        if process.poll() is None:
            process.kill()
    err = "".join(lines)
    assert landed, f"the second SIGTERM found no half-written checkpoint (the save outran the test):\n{err}"
    assert process.returncode == 143, (out, err)
    assert "stopped by SIGTERM" in err, err
    assert "Traceback" not in err and "enforce fail" not in err, err
    result = json.loads(log.read_text())
    assert result["command"] == "train" and result["signal"] == "SIGTERM" and result["error"].startswith("stopped by SIGTERM")
    assert not temp_files(models)  # the half-written checkpoint was removed
    assert load(models / "train_state.pt")["trainer"]["epoch"] >= 1  # the state written before it is whole


def test_a_stop_inside_a_writer_goes_on_up_as_the_stop(tmp_path):
    """The unit under item 10: torch.save reports a Stopped raised in its write callback as a RuntimeError
    (`enforce fail at inline_container.cc`); the atomic write re-raises the stop and keeps the target."""
    import torch

    from mmar.io import atomic_write
    from mmar.stop import Stopped

    class StoppedMidway:  # a file whose third write is where the signal handler runs
        def __init__(self, handle):
            self.handle, self.calls = handle, 0

        def write(self, data):
            self.calls += 1
            if self.calls == 3:
                raise Stopped(signal.SIGTERM)
            return self.handle.write(data)

        def flush(self):
            self.handle.flush()

    target = tmp_path / "model.ckpt"
    target.write_bytes(b"the previous checkpoint")
    with pytest.raises(Stopped):
        with atomic_write(target, "wb") as handle:
            torch.save({"model": {"w": torch.zeros(100_000)}}, StoppedMidway(handle))
    assert target.read_bytes() == b"the previous checkpoint" and not temp_files(tmp_path)


# ---- `mmar run` never leaves an orphaned step (item 5) --------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_step_dies_with_a_killed_runner(tmp_path):
    """`run_command`'s child gets SIGTERM from the kernel when its runner is SIGKILLed (PR_SET_PDEATHSIG)."""
    pid_file = tmp_path / "child.pid"
    runner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from mmar import local_run
        child = [sys.executable, "-c", "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"]
        local_run.run_command(child, {{}}, local_run.Interrupt())
    """)])
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), timeout=60, what="the child")
        child = int(pid_file.read_text())
        assert _alive(child)
        runner.kill()
        runner.wait()
        wait_for(lambda: not _alive(child), timeout=30, what="the child to die with its runner")
    finally:
        if runner.poll() is None:
            runner.kill()


def _long_training_job(tmp_path, seg_data, name: str):
    from conftest import make_seg_mmar

    workspace = tmp_path / "ws"
    mmar = make_seg_mmar(workspace / "mmar", seg_data, epochs=1000)
    body = {"apiVersion": contract.API_VERSION, "kind": contract.KIND, "metadata": {"name": name},
            "spec": {"mmar": {"claimName": "ws", "path": "mmar"}, "data": {"claimName": "data"}, "gpusPerNode": 0,
                     "steps": [{"type": "train", "set": {"train#num_workers": 1}}]}}
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(body))
    status_path = tmp_path / "status.json"
    process = subprocess.Popen([sys.executable, "-m", "mmar", "run", str(manifest), "-v", f"ws={workspace}",
                                "-v", f"data={seg_data.parent}", "--status", str(status_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: state_epoch(mmar / "models") >= 1 or process.poll() is not None, what="the first epoch")
    assert process.poll() is None, process.communicate()
    step = local_run._descendants(process.pid)
    assert step, "the step runs below `mmar run`"
    return process, mmar, status_path, step


@pytest.mark.slow
def test_sighup_to_mmar_run_stops_the_step_and_records_it(tmp_path, seg_data):
    process, mmar, status_path, step = _long_training_job(tmp_path, seg_data, "hangup")
    try:
        process.send_signal(signal.SIGHUP)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 129, (out, err)
    assert not any(_alive(pid) for pid in step)
    status = json.loads(status_path.read_text())
    assert status["phase"] == "Interrupted" and status["signal"] == "SIGHUP"
    entry = status["steps"][0]
    assert entry["phase"] == "Interrupted" and entry["signal"] == "SIGHUP"
    assert entry["exitCode"] == 143  # the step stopped cleanly on the SIGTERM it was sent
    assert "stopped by SIGTERM: training ended" in err and "Traceback" not in err, err
    assert load(mmar / "models" / "train_state.pt")["trainer"]["epoch"] >= 1


@pytest.mark.slow
def test_sigkill_to_mmar_run_takes_the_step_with_it_and_frees_the_mmar(tmp_path, seg_data):
    from mmar.lock import hold

    process, mmar, status_path, step = _long_training_job(tmp_path, seg_data, "killed")
    try:
        process.kill()
        process.wait(timeout=60)
        # the step was sent SIGTERM by the kernel: it stops at its next safe point, its loader workers after it
        wait_for(lambda: not any(_alive(pid) for pid in step), timeout=120, what="the step to end with `mmar run`")
    finally:
        for pid in step:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    with hold(mmar, "validate") as lock:  # the MMAR is free again
        assert lock == mmar / "models" / ".mmar.lock"
    state = load(mmar / "models" / "train_state.pt")  # whole: the step ended at a safe point
    assert 1 <= state["trainer"]["epoch"] < 1000 and not temp_files(mmar / "models")
    # nothing was left to record the end: the file still says Running, but names a runner that is gone
    left = json.loads(status_path.read_text())
    assert left["phase"] == "Running" and left["runner"]["pid"] == process.pid
    status = local_run.read_status(status_path)
    assert status["phase"] == "Interrupted" and status["reason"] == "RunnerLost"
    assert status["message"].startswith(f"interrupted: `mmar run` (PID {process.pid}) is gone during step train")
    assert status["steps"][0]["phase"] == "Interrupted" and status["steps"][0]["reason"] == "RunnerLost"


def test_sighup_is_passed_to_the_step_as_sigterm_and_recorded(tmp_path, monkeypatch):
    """The fast version of the SIGHUP test: a step that records the signal it got."""
    script = tmp_path / "step.py"
    got = tmp_path / "got"
    script.write_text(textwrap.dedent(f"""
        import signal, sys, time
        def stop(signum, frame):
            open({str(got)!r}, "w").write(signal.Signals(signum).name)
            sys.exit(128 + signum)
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGHUP, stop)
        open({str(got)!r} + ".ready", "w").close()
        time.sleep(600)
    """))
    interrupt = local_run.Interrupt()

    def hang_up():
        wait_for(lambda: Path(f"{got}.ready").exists(), timeout=60, what="the step")
        os.kill(os.getpid(), signal.SIGHUP)

    with interrupt.catching():
        threading.Thread(target=hang_up, daemon=True).start()
        finished = local_run.run_command([sys.executable, str(script)], dict(os.environ), interrupt, grace_seconds=30)
    assert interrupt.name == "SIGHUP" and got.read_text() == "SIGTERM" and finished.code == 143


# ---- TensorBoard: no orphan run (smaller items) ---------------------------------------------------------


@pytest.mark.slow
def test_a_run_killed_before_its_first_state_leaves_no_tensorboard_run(seg_mmar):
    models = seg_mmar / "models"
    runs = models / "runs"
    process = subprocess.Popen([sys.executable, "-m", "mmar", "train", str(seg_mmar), "--set", "epochs=40"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def started_without_state():
        return runs.is_dir() and any(runs.iterdir()) and not (models / "train_state.pt").exists()

    try:
        assert kill_when(process, started_without_state), process.communicate()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    (orphan,) = [p.name for p in runs.iterdir()]
    again = run_mmar("train", str(seg_mmar), "--set", "epochs=1")
    assert f"removed TensorBoard run(s) {orphan}" in again.stdout, again.stdout
    (kept,) = list(runs.iterdir())
    assert kept.name != orphan and not (kept / ".no-state-yet").exists()
    assert load(models / "train_state.pt")["tensorboard_run"] == kept.name


# ---- `--gate` cut short by a shell redirect (issue 36, item 2) --------------------------------------------


def test_an_unquoted_gate_says_to_quote_it(seg_mmar, tmp_path):
    # what `mmar --gate val_mean_dice>=0.85 infer M` leaves of argv: the shell wrote stdout to a file `=0.85`
    run = run_mmar("--gate", "val_mean_dice", "infer", str(seg_mmar), check=False)
    assert run.returncode == 1
    assert "quote it: the shell reads `>`" in run.stderr and "mmar --gate 'val_mean_dice>=0.85' infer" in run.stderr
    assert "Traceback" not in run.stderr
    help_text = run_mmar("--help").stdout
    assert "--gate 'METRIC>=X'" in help_text and "Quote it" in help_text
