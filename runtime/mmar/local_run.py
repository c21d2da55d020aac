"""Run an MMARJob's steps on this machine, with the argv the operator would put in each pod.

The argv comes from `mmar.job.step_argv()` untouched except for paths: each claim the manifest names is
mapped to a local folder (`--volume CLAIM=/local/path`), and every pod path under /workspace or /data is
rewritten to the mapped folder. Steps run in order in subprocesses; the first failure stops the job.
Each step's result (the JSON a pod writes as its termination message) is collected through
MMAR_TERMINATION_LOG, read and folded as the operator does (`mmar.results`) and summarized in a status
file shaped like the operator's MMARJob status.

Like the kubelet stopping a pod, SIGTERM or SIGINT to `mmar run` is passed on to the running step, which
gets a grace period to stop before it and every process it started are killed; the status file then says
the job was interrupted, by which signal, during which step, with the step's last error line. SIGHUP (the
terminal `mmar run` was started from closed) stops the step the same way (it is sent SIGTERM, the signal it
stops on) and is recorded as SIGHUP. A step never outlives `mmar run`, however that ends: on Linux each step
is started with PR_SET_PDEATHSIG, so the kernel sends it SIGTERM when `mmar run` dies (even by SIGKILL,
where nothing can record the job as interrupted), and it stops at its next safe point, releasing the MMAR.
The status file names its runner (host, PID and the process's start as the kernel counts it), so a status
left `Running` by a runner that is gone is read (`read_status`) as Interrupted, reason RunnerLost, and a
PID reused by a later process does not pass for it; the next `mmar run` of the job says so and writes its
own, and refuses to start while the runner the status names is still at work.
"""

from __future__ import annotations

import contextlib
import functools
import os
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping, Sequence

from mmar import job as contract
from mmar import results
from mmar.job import outcome
from mmar.job.outcome import now_iso
from mmar.errors import MMARError
from mmar.io import process_alive, write_json

GRACE_SECONDS = 30.0  # the kubelet's default terminationGracePeriodSeconds
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# what the step is sent for each: a hangup is not the step's to see (it runs in its own session, without the
# terminal), it is `mmar run` being stopped, so the step gets the signal it stops cleanly on
SENT_FOR = {signal.SIGHUP: signal.SIGTERM}
PARENT_DEATH_SIGNAL = signal.SIGTERM  # what the kernel sends a step when `mmar run` dies (Linux)
STDERR_TAIL_BYTES = 16 * 1024  # enough for the last lines of a traceback
POLL_SECONDS = 0.1
INTERRUPTED = "Interrupted"  # the phase of a step and a job stopped by a signal


def parse_volumes(items: Sequence[str], base: Path | None = None) -> dict[str, Path]:
    """`CLAIM=/local/path` pairs -> {claim: absolute path} (relative paths are taken from `base`/cwd)."""
    volumes: dict[str, Path] = {}
    for item in items:
        claim, sep, local = item.partition("=")
        if not sep or not claim or not local:
            raise MMARError(f"--volume {item!r}: expected CLAIM=/local/path")
        if claim in volumes:
            raise MMARError(f"--volume {claim}: given twice")
        volumes[claim] = ((base or Path.cwd()) / Path(local).expanduser()).resolve()
    return volumes


def mount_map(job: Mapping[str, Any], volumes: Mapping[str, Path]) -> dict[str, Path]:
    """{pod mount root: local folder} for the job's two mounts; a claim without a mapping is an error."""
    spec = job["spec"]
    mounts = {}
    for root, field in ((contract.WORKSPACE_ROOT, "mmar"), (contract.DATA_ROOT, "data")):
        claim = spec[field]["claimName"]
        if claim not in volumes:
            raise MMARError(f"spec.{field}.claimName: claim {claim!r} has no local folder; pass --volume {claim}=/local/path")
        mounts[root] = volumes[claim]
    return mounts


def to_local(value: str, mounts: Mapping[str, Path]) -> str:
    """A pod path (or KEY=pod-path) -> the same path under the mapped local folder; other text unchanged."""
    key, sep, rest = value.partition("=")
    if sep and not value.startswith("/"):
        return f"{key}={to_local(rest, mounts)}"
    for root, local in mounts.items():
        if value == root or value.startswith(root + "/"):
            relative = PurePosixPath(value).relative_to(root)
            return str(local / relative) if str(relative) != "." else str(local)
    return value


def local_argv(argv: Sequence[str], mounts: Mapping[str, Path]) -> list[str]:
    """Pod argv -> local argv: paths mapped; `mmar` run with this interpreter (no need for it on PATH)."""
    out = [to_local(a, mounts) for a in argv]
    if out and out[0] == "mmar":
        out = [sys.executable, "-m", "mmar", *out[1:]]
    elif out and out[0] == "torchrun":
        out = [sys.executable, "-m", "torch.distributed.run", *out[1:]]
    return out


# ---------------------------------------------------------------------------------------- one command


class Interrupt:
    """The first SIGTERM/SIGINT/SIGHUP `mmar run` received (and how many), recorded while `catching()`.

    The handler only records: the loop waiting on the step passes the signal on, so a signal that lands
    between starting a process and watching it is not lost.
    """

    def __init__(self) -> None:
        self.signal: int | None = None  # the first
        self.last: int | None = None
        self.count = 0

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signal).name if self.signal is not None else None

    def record(self, signum: int, _frame: Any = None) -> None:
        self.signal = self.signal or signum
        self.last = signum
        self.count += 1

    @contextlib.contextmanager
    def catching(self) -> Iterator[Interrupt]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield self
            return
        previous = {signum: signal.signal(signum, self.record) for signum in FORWARDED_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


@dataclass(frozen=True)
class Finished:
    """How one command ended: its exit status (negative: killed by that signal, as Popen reports it) and
    the tail of what it printed on stderr."""

    code: int
    stderr: str = ""


# (argv, env, interrupt) -> Finished; tests inject their own
Runner = Callable[[Sequence[str], Mapping[str, str], Interrupt], Finished]


def run_command(argv: Sequence[str], env: Mapping[str, str], interrupt: Interrupt, *,
                grace_seconds: float = GRACE_SECONDS, echo: Callable[[bytes], None] | None = None) -> Finished:
    """Run one command in its own process group, its stderr echoed and its tail kept.

    On an interrupt the signal goes to the command, as the kubelet signals a container's main process: an
    `mmar` command stops at its next safe point, torchrun passes the signal on to its workers (which it
    starts in sessions of their own). Not to the whole group: data loader workers signalled as well would
    die mid-batch and turn that clean stop into a crash. A second signal is passed on too (an `mmar`
    command then stops at once, its temp files still cleaned up). After `grace_seconds`, or at a third
    signal, the command and every process below it are killed; once it has exited, what is left of its
    group too. Nothing it started outlives an interrupted run.
    """
    process = subprocess.Popen(list(argv), env=dict(env), stderr=subprocess.PIPE, start_new_session=True,
                               preexec_fn=die_with_parent())
    tee = _Tee(process.stderr, echo or _echo_stderr)
    forwarded, deadline, killed = 0, None, False
    while True:
        try:
            code = process.wait(timeout=POLL_SECONDS)
            break
        except subprocess.TimeoutExpired:
            pass
        if interrupt.count > forwarded and forwarded < 2 and interrupt.last is not None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(SENT_FOR.get(interrupt.last, interrupt.last))
            forwarded += 1
            deadline = deadline or time.monotonic() + grace_seconds
        if not killed and deadline is not None and (interrupt.count > 2 or time.monotonic() > deadline):
            _kill_tree(process.pid)
            killed = True  # only the exit is left to wait for
    if interrupt.signal is not None:
        _signal_group(process.pid, signal.SIGKILL)  # helpers left in its group (data loader workers) go too
    return Finished(code, tee.finish())


def die_with_parent(signum: int = PARENT_DEATH_SIGNAL) -> Callable[[], None] | None:
    """A Popen `preexec_fn` that makes the child receive `signum` when this process dies, however it dies
    (Linux's PR_SET_PDEATHSIG); None where there is no such call. The child of a parent that died between
    the fork and the call sends it to itself. Prepared here, in the parent: the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signum), 0, 0, 0)
        if os.getppid() != parent:  # the parent is already gone: nothing will send it any more
            os.kill(os.getpid(), signum)

    return preexec


class _Tee:
    """Copies a pipe to `echo` as it comes (progress lines without a newline included) and keeps the tail."""

    def __init__(self, pipe, echo: Callable[[bytes], None]) -> None:
        self._pipe = pipe
        self._echo = echo
        self._tail = bytearray()
        self._thread = threading.Thread(target=self._pump, name="mmar-run-stderr", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        fd = self._pipe.fileno()
        echo = self._echo
        while chunk := os.read(fd, 65536):
            if echo is not None:
                try:
                    echo(chunk)
                except OSError:  # the terminal hung up (EIO): go on draining, or the step blocks on a full pipe
                    echo = None
            self._tail += chunk
            del self._tail[:-STDERR_TAIL_BYTES]

    def finish(self, timeout: float = 5.0) -> str:
        # a process the command left behind may hold the pipe open: its output is not waited for
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._pipe.close()
        return bytes(self._tail).decode("utf-8", errors="replace")


def _echo_stderr(chunk: bytes) -> None:
    stream = getattr(sys.stderr, "buffer", None)
    if stream is not None:
        stream.write(chunk)
        stream.flush()
    else:
        sys.stderr.write(chunk.decode("utf-8", errors="replace"))
        sys.stderr.flush()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _kill_tree(pid: int) -> None:
    """SIGKILL the command's process group and every descendant (torchrun's workers have their own)."""
    for child in _descendants(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)
    _signal_group(pid, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (Linux; elsewhere none are found and only the group is killed)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid, ...
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def read_result(path: Path) -> dict[str, Any] | None:
    """The result a step wrote to MMAR_TERMINATION_LOG, decoded as the operator decodes a pod's message."""
    try:
        message = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    return results.decode(message)


# ---------------------------------------------------------------------------------------------- the job


def default_status_path(job: Mapping[str, Any], mounts: Mapping[str, Path]) -> Path:
    # beside the MMAR folder, not inside it: a file in a not-yet-scaffolded MMAR would make
    # `mmar init --exist-ok` think the MMAR already exists
    return mounts[contract.WORKSPACE_ROOT] / f"{contract.name_of(job)}.status.json"


def process_start(pid: int) -> str | None:
    """When process `pid` started, as the kernel counts it: this boot's id and the clock ticks from boot to
    the process's start (/proc/PID/stat's 22nd field). A later process given the same PID, or the same PID
    after a reboot, has another. None when there is no such live process (a zombie is dead) or no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ...
    except (OSError, IndexError):
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    return f"{boot}/{fields[19]}"


def runner_record() -> dict[str, Any]:
    """Who runs the job, as the status file records it (`runner`): host, PID, and the process's start."""
    record: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    start = process_start(os.getpid())
    if start is not None:
        record["processStart"] = start
    return record


def runner_gone(runner: Any) -> bool | None:
    """Whether the `mmar run` a status's `runner` names has ended: True (gone, or its PID is now another
    process's), False (still at work), None where this machine cannot tell (another host's, or no runner)."""
    if not isinstance(runner, Mapping) or not isinstance(runner.get("pid"), int) or runner["pid"] <= 0:
        return None
    if runner.get("host") != socket.gethostname():
        return None
    recorded = runner.get("processStart")
    if isinstance(recorded, str) and process_start(os.getpid()) is not None:  # /proc answers: compare starts
        return process_start(runner["pid"]) != recorded
    return not process_alive(runner["pid"])


def read_status(path: Path) -> dict[str, Any] | None:
    """A status file as it stands: None if there is none; a job it records as Running whose runner is gone
    (`runner_gone`) is returned as the runner would have recorded it had it lived to: Interrupted, reason
    RunnerLost, its running step too. The file itself is left as it is."""
    try:
        status = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    if not isinstance(status, dict) or status.get("phase") != outcome.RUNNING:
        return status
    runner = status.get("runner")
    if runner_gone(runner) is not True:
        return status
    running = next((s for s in status.get("steps", []) if isinstance(s, dict) and s.get("phase") == outcome.RUNNING),
                   None)
    when = f"during step {running.get('name')}" if running is not None else "between steps"
    message = (f"interrupted: `mmar run` (PID {runner['pid']}) is gone {when}, without recording the job's end "
               f"(killed by SIGKILL or the OOM killer, or the machine restarted)")
    status.update(phase=INTERRUPTED, reason=outcome.RUNNER_LOST, message=message)
    if running is not None:
        running.update(phase=INTERRUPTED, reason=outcome.RUNNER_LOST,
                       message=f"interrupted: `mmar run` (PID {runner['pid']}) is gone")
    return status


def _check_previous(status_path: Path, name: str, out: Callable[[str], None]) -> None:
    """Before a run writes its status: refuse while the runner the status names still runs the job; say so
    when that runner was lost (the file still said Running) or cannot be checked from here."""
    try:
        previous = read_status(status_path)
    except (OSError, ValueError):
        return  # unreadable: this run's status replaces it
    if not isinstance(previous, dict):
        return
    runner = previous.get("runner") if isinstance(previous.get("runner"), Mapping) else {}
    who = f"`mmar run` (PID {runner.get('pid', '?')} on host {runner.get('host', '?')}, started {previous.get('startTime', '?')})"
    if previous.get("phase") == outcome.RUNNING:
        gone = runner_gone(runner)
        if gone is False and runner.get("pid") != os.getpid():
            raise MMARError(f"{name} is being run by {who}: {status_path} is its status. Wait for it to end "
                            f"(or stop it), then run the job again")
        if gone is False:  # this very process: an earlier run in it ended without recording its end
            out(f"{name}: the last run, in this process, ended without recording its end; running the job again")
        elif gone is None and runner:
            out(f"{name}: {status_path} says the job is Running, by {who}, which cannot be checked from "
                f"this machine; running the job here, with a status of its own")
    elif previous.get("reason") == outcome.RUNNER_LOST:
        out(f"{name}: the last run was lost: {previous.get('message')}; running the job again")


def plan(job: Mapping[str, Any], mounts: Mapping[str, Path]) -> list[list[list[str]]]:
    """For each step, the local argvs to run in order (the scaffolding `mmar init`, if any, then the step)."""
    steps = []
    for index, step in enumerate(contract.steps_of(job)):
        if step["nodes"] > 1:
            raise MMARError(f"spec.steps[{index}].nodes: {step['nodes']} nodes cannot run on one machine; "
                            f"use nodes: 1 (and gpusPerNode) for a local run")
        argvs = [a for a in (contract.init_argv(job, index), contract.step_argv(job, index)) if a]
        steps.append([local_argv(a, mounts) for a in argvs])
    return steps


def run(job: Mapping[str, Any], volumes: Mapping[str, Path], *, status_path: Path | None = None,
        runner: Runner | None = None, out: Callable[[str], None] = print, dry_run: bool = False,
        grace_seconds: float = GRACE_SECONDS) -> int:
    """Run every step of a parsed job; returns 0 when all succeeded, the failed step's exit code, or
    128 + the signal's number when interrupted (130 for SIGINT, 143 for SIGTERM)."""
    mounts = mount_map(job, volumes)
    commands = plan(job, mounts)
    steps = contract.steps_of(job)
    if dry_run:
        for index, argvs in enumerate(commands):
            for argv in argvs:
                out(f"[{index + 1}/{len(steps)}] {steps[index]['name']}: {subprocess.list2cmdline(argv)}")
        return 0

    if job["spec"]["data"]["readOnly"] is False:
        mounts[contract.DATA_ROOT].mkdir(parents=True, exist_ok=True)
    mounts[contract.WORKSPACE_ROOT].mkdir(parents=True, exist_ok=True)
    status_path = status_path or default_status_path(job, mounts)
    runner = runner or functools.partial(run_command, grace_seconds=grace_seconds)
    out = _unless_hung_up(out)
    with Interrupt().catching() as interrupt:
        return _run_steps(job, commands, status_path, runner, interrupt, out)


def _run_steps(job: Mapping[str, Any], commands: list[list[list[str]]], status_path: Path, runner: Runner,
               interrupt: Interrupt, out: Callable[[str], None]) -> int:
    steps = contract.steps_of(job)
    name = contract.name_of(job)
    _check_previous(status_path, name, out)
    status: dict[str, Any] = {
        "name": name,
        "phase": outcome.RUNNING,
        "startTime": now_iso(),
        "runner": runner_record(),
        "steps": [{"name": s["name"], "type": s["type"], "phase": outcome.WAITING} for s in steps],
        "results": {},
    }
    write_json(status_path, status)
    for index, argvs in enumerate(commands):
        entry = status["steps"][index]
        tag = f"[{index + 1}/{len(steps)}] {entry['name']}"
        if interrupt.signal is not None:  # arrived between steps
            return _interrupted(status, status_path, interrupt, f"before step {entry['name']}", out)
        entry.update(phase=outcome.RUNNING, startTime=now_iso())
        write_json(status_path, status)
        out(f"{tag}: running")
        started = time.monotonic()
        finished, result, ran = Finished(0), None, 0
        for argv in argvs:
            if interrupt.signal is not None:
                break
            out(f"  $ {subprocess.list2cmdline(argv)}")
            finished, result = _run_one(argv, runner, interrupt, name, entry["name"])
            ran += 1
            if finished.code != 0:
                break
        seconds = time.monotonic() - started
        entry.update(completionTime=now_iso(), seconds=round(seconds, 1))
        if result is not None:
            entry["result"] = result
        if finished.code != 0:
            entry["exitCode"] = finished.code
        line = _error_line(result, finished) if finished.code != 0 else None
        if interrupt.signal is not None and (finished.code != 0 or ran < len(argvs)):
            entry.update(phase=INTERRUPTED, signal=interrupt.name,
                         message=f"interrupted by {interrupt.name}" + (f": {line}" if line else ""))
            return _interrupted(status, status_path, interrupt, f"during step {entry['name']}", out, line)
        if finished.code != 0:
            entry.update(phase=outcome.FAILED, message=line or f"exit code {finished.code}")
            for later in status["steps"][index + 1:]:
                later.update(outcome.not_run(entry["name"]))
            return _finish(status, status_path, out, f"{tag}: FAILED after {seconds:.1f}s (exit code {finished.code})"
                           + (f": {line}" if line else ""), finished.code)
        status["results"] = results.fold(status["results"], entry["type"], result)
        gate = outcome.skipped_by_gate(result)
        if gate is not None:
            entry.update(outcome.gate_skipped(gate))
            for later in status["steps"][index + 1:]:
                later.update(outcome.skipped_after(entry["name"]))
            return _finish(status, status_path, out, f"{tag}: SKIPPED: {gate.get('message', 'its gate was not met')}", 0)
        entry["phase"] = outcome.SUCCEEDED
        write_json(status_path, status)
        out(f"{tag}: succeeded in {seconds:.1f}s{_summary(entry['type'], result)}")
    if interrupt.signal is not None:  # the last step finished anyway; the run was still cut short
        return _interrupted(status, status_path, interrupt, "after the last step", out)
    return _finish(status, status_path, out, None, 0)


def _finish(status: dict[str, Any], status_path: Path, out: Callable[[str], None], line: str | None, code: int) -> int:
    """The job ended (a step failed, a gate held one back, or all succeeded): its phase, reason and message by
    the rule the operator records too (`mmar.job.outcome.job_outcome`), written and said."""
    end = outcome.job_outcome(status["steps"])
    status.update(end, completionTime=now_iso())
    write_json(status_path, status)
    if line:
        out(line + ("" if code == 0 else f"; status in {status_path}"))
    steps = status["steps"]
    if end["reason"] == outcome.GATE_NOT_MET:
        ran = sum(s["phase"] == outcome.SUCCEEDED for s in steps)
        out(f"{status['name']}: {ran} step(s) succeeded, {len(steps) - ran} skipped ({outcome.GATE_NOT_MET}); "
            f"status in {status_path}")
    elif end["phase"] == outcome.SUCCEEDED:
        out(f"{status['name']}: all {len(steps)} step(s) succeeded; status in {status_path}")
    return code


def _unless_hung_up(out: Callable[[str], None]) -> Callable[[str], None]:
    """`out`, quiet once its terminal is gone (SIGHUP: a write then fails with EIO): the status file still
    records the job, and the job must get there."""
    def say(line: str) -> None:
        with contextlib.suppress(OSError):
            out(line)

    return say


def _interrupted(status: dict[str, Any], status_path: Path, interrupt: Interrupt, when: str,
                 out: Callable[[str], None], line: str | None = None) -> int:
    message = f"interrupted by {interrupt.name} {when}" + (f": {line}" if line else "")
    status.update(phase=INTERRUPTED, signal=interrupt.name, completionTime=now_iso(), message=message)
    write_json(status_path, status)
    out(f"{status['name']}: {message}; status in {status_path}")
    return 128 + int(interrupt.signal or 0)


def _run_one(argv: Sequence[str], runner: Runner, interrupt: Interrupt, job_name: str,
             step_name: str) -> tuple[Finished, dict[str, Any] | None]:
    """Run one argv with the pod's environment contract; returns how it ended and its result, if any."""
    with tempfile.TemporaryDirectory(prefix="mmar-run-") as tmp:
        log = Path(tmp) / "termination-log"
        env = {**os.environ, "MMAR_TERMINATION_LOG": str(log), "MMAR_JOB_NAME": job_name, "MMAR_STEP": step_name}
        try:
            finished = runner(argv, env, interrupt)
        except FileNotFoundError as error:
            raise MMARError(f"cannot start {argv[0]!r}: {error.strerror}") from None
        return finished, read_result(log)


def _error_line(result: Mapping[str, Any] | None, finished: Finished) -> str | None:
    """The step's own reason: the error its result reports, else the last `error:` line it printed."""
    if result and isinstance(result.get("error"), str) and result["error"]:
        return result["error"]
    return results.error_line(finished.stderr)


def _summary(step_type: str, data: Mapping[str, Any] | None) -> str:
    result = results.read(step_type, data)
    if isinstance(result, results.TrainResult) and result.best_metric is not None:
        return f" ({result.key_metric or 'metric'} best {result.best_metric} at epoch {result.best_epoch})"
    if isinstance(result, results.ValidateResult) and result.metric is not None:
        return f" ({result.key_metric} {result.metric})"
    if isinstance(result, results.ExportResult) and result.files:
        return f" (exported {', '.join(result.files)})"
    return ""
