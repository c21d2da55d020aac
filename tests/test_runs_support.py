"""Support of the tests/test_runs_*.py (no tests here): a run of the real CLI stopped at a chosen instant,
and what it left."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

MMAR = [sys.executable, "-m", "mmar"]


def copy_mmar(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def digests(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file under `folder` (what "nothing changed" compares)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".mmar.lock"}


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp*"))


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*MMAR, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signal_when(process: subprocess.Popen, folder: Path, pattern: str, signum: int = signal.SIGKILL, *,
                when=lambda: True, timeout: float = 300) -> str:
    """Send `signum` to `process` while a file whose name matches `pattern` is in `folder` and `when()`
    holds (polled every half millisecond: an atomic write's temp file lives for milliseconds). Returns the
    name seen; fails if the run ended first.

    Two races are closed, both seen on a loaded 2-core CI machine: `when()` is asked before the folder is
    listed, so a temp file seen is no older than what `when()` saw; and the process is frozen (SIGSTOP)
    and the folder listed again before the signal, so the signal lands while the temp file still exists,
    not after its rename (otherwise it is let go on and the wait goes on)."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout

    def hits() -> list[str]:
        try:
            return [name for name in os.listdir(folder) if regex.fullmatch(name)]
        except FileNotFoundError:
            return []

    while process.poll() is None and time.monotonic() < deadline:
        if when() and hits():
            process.send_signal(signal.SIGSTOP)
            _, status = os.waitpid(process.pid, os.WUNTRACED)  # returns once it is stopped, not merely signalled
            if not os.WIFSTOPPED(status):  # it ended just before the signal: reaped here, so tell Popen
                process.returncode = os.waitstatus_to_exitcode(status)
                break
            still = hits()
            if still:
                process.send_signal(signum)
                if signum != signal.SIGKILL:
                    process.send_signal(signal.SIGCONT)
                return still[0]
            process.send_signal(signal.SIGCONT)
        time.sleep(0.0005)
    out, err = process.communicate(timeout=60) if process.poll() is not None else ("", "")
    process.kill()
    raise AssertionError(f"no {pattern} appeared in {folder} before the run ended:\n{out}\n{err}")


def kill_when(process: subprocess.Popen, ready, timeout: float = 240):
    """SIGKILL `process` once `ready()` returns something true, asked again while the process is frozen
    (SIGSTOP, then waitpid until it has stopped), so that what it returns is what the run held at the kill,
    not what it held a moment before (a tiny epoch takes 0.1 s). Returns that value, or None if the run
    ended or the time ran out first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            process.send_signal(signal.SIGSTOP)
            _, status = os.waitpid(process.pid, os.WUNTRACED)
            if not os.WIFSTOPPED(status):
                process.returncode = os.waitstatus_to_exitcode(status)
                return None
            value = ready()
            if value:
                process.send_signal(signal.SIGKILL)
                return value
            process.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    return None


def wait_for(predicate, timeout: float = 300, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def state_epoch(models: Path) -> int:
    path = models / "train_state.pt"
    if not path.exists():
        return 0
    try:
        return int(torch.load(path, weights_only=False)["trainer"]["epoch"])
    except Exception:  # noqa: BLE001 - read while replaced: try again later
        return 0


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")


def scalar_steps(run_folder: Path, tag: str = "loss") -> list[int]:
    """The steps TensorBoard shows for `tag` in one run folder (purged points of a killed run excluded)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_folder))
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]
