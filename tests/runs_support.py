"""Support of the tests of runs (tests/runs/, and the export and lock tests that stop a run; no tests here): a run of the real CLI stopped at a chosen instant,
and what it left."""

from __future__ import annotations

import hashlib
import os
import re
import resource
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


def signal_frozen(process: subprocess.Popen, ready, signum: int = signal.SIGKILL, *, poll: float = 0.05,
                  timeout: float = 240):
    """Send `signum` to `process` once `ready()` returns something true, asked again while the process is
    frozen (SIGSTOP, then waitpid until it has stopped): the signal then lands on what `ready()` saw, not
    on what the run holds a moment later (a tiny epoch takes 0.1 s, a temp file lives for milliseconds).
    If the second answer is false the run is let go on (SIGCONT) and the wait goes on. Returns that answer,
    or None if the run ended or the time ran out first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            process.send_signal(signal.SIGSTOP)
            _, status = os.waitpid(process.pid, os.WUNTRACED)  # returns once it is stopped, not merely signalled
            if not os.WIFSTOPPED(status):  # it ended just before the signal: reaped here, so tell Popen
                process.returncode = os.waitstatus_to_exitcode(status)
                return None
            value = ready()
            if value:
                process.send_signal(signum)
                if signum != signal.SIGKILL:
                    process.send_signal(signal.SIGCONT)
                return value
            process.send_signal(signal.SIGCONT)
        time.sleep(poll)
    return None


def signal_when(process: subprocess.Popen, folder: Path, pattern: str, signum: int = signal.SIGKILL, *,
                when=lambda: True, timeout: float = 300) -> str:
    """Send `signum` to `process` while a file whose name matches `pattern` is in `folder` and `when()`
    holds (polled every half millisecond: an atomic write's temp file lives for milliseconds). Returns the
    name seen; fails if the run ended first.

    `when()` is asked before the folder is listed, so a temp file seen is no older than what `when()` saw;
    and both are asked again with the run frozen (`signal_frozen`), so the signal lands while the temp file
    still exists, not after its rename (both races were seen on a loaded 2-core CI machine)."""
    regex = re.compile(pattern)

    def hits() -> list[str]:
        try:
            return [name for name in os.listdir(folder) if regex.fullmatch(name)]
        except FileNotFoundError:
            return []

    seen = signal_frozen(process, lambda: when() and hits(), signum, poll=0.0005, timeout=timeout)
    if seen:
        return seen[0]
    out, err = process.communicate(timeout=60) if process.poll() is not None else ("", "")
    process.kill()
    raise AssertionError(f"no {pattern} appeared in {folder} before the run ended:\n{out}\n{err}")


def kill_when(process: subprocess.Popen, ready, timeout: float = 240):
    """SIGKILL `process` once `ready()` holds, as `signal_frozen`; returns what `ready()` said at the kill."""
    return signal_frozen(process, ready, signal.SIGKILL, timeout=timeout)


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


def file_size_limit(max_bytes: int):
    """In the child: files may not grow past `max_bytes` (writes then fail with EFBIG, as on a full disk)."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


def mount_tmpfs(folder, size: int) -> bool:
    """Mount a tmpfs of `size` bytes on `folder` (a full disk, really); False where that needs root we lack."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0
