"""Run an MMARJob's steps on this machine, with the argv the operator would put in each pod.

The argv comes from `mmar.job.step_argv()` untouched except for paths: each claim the manifest names is
mapped to a local folder (`--volume CLAIM=/local/path`), and every pod path under /workspace or /data is
rewritten to the mapped folder. Steps run in order in subprocesses; the first failure stops the job.
Each step's result (the JSON a pod writes as its termination message) is collected through
MMAR_TERMINATION_LOG and summarized in a status file shaped like the operator's MMARJob status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping, Sequence

from mmar import job as contract
from mmar.errors import MMARError
from mmar.io import write_json

# (argv, env) -> exit code; tests inject their own
Runner = Callable[[Sequence[str], Mapping[str, str]], int]


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


def subprocess_runner(argv: Sequence[str], env: Mapping[str, str]) -> int:
    return subprocess.run(list(argv), env=dict(env), check=False).returncode


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def default_status_path(job: Mapping[str, Any], mounts: Mapping[str, Path]) -> Path:
    # beside the MMAR folder, not inside it: a file in a not-yet-scaffolded MMAR would make
    # `mmar init --exist-ok` think the MMAR already exists
    return mounts[contract.WORKSPACE_ROOT] / f"{contract.name_of(job)}.status.json"


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
        runner: Runner = subprocess_runner, out: Callable[[str], None] = print, dry_run: bool = False) -> int:
    """Run every step of a parsed job; returns 0 when all succeeded, else the failed step's exit code."""
    mounts = mount_map(job, volumes)
    commands = plan(job, mounts)
    steps = contract.steps_of(job)
    name = contract.name_of(job)
    if dry_run:
        for index, argvs in enumerate(commands):
            for argv in argvs:
                out(f"[{index + 1}/{len(steps)}] {steps[index]['name']}: {subprocess.list2cmdline(argv)}")
        return 0

    if job["spec"]["data"]["readOnly"] is False:
        mounts[contract.DATA_ROOT].mkdir(parents=True, exist_ok=True)
    mounts[contract.WORKSPACE_ROOT].mkdir(parents=True, exist_ok=True)
    status_path = status_path or default_status_path(job, mounts)
    status: dict[str, Any] = {
        "name": name,
        "phase": "Running",
        "startTime": _now(),
        "steps": [{"name": s["name"], "type": s["type"], "phase": "Waiting"} for s in steps],
        "results": {},
    }
    write_json(status_path, status)
    code = 0
    for index, argvs in enumerate(commands):
        entry = status["steps"][index]
        entry.update(phase="Running", startTime=_now())
        write_json(status_path, status)
        out(f"[{index + 1}/{len(steps)}] {entry['name']}: running")
        started = time.monotonic()
        result = None
        for argv in argvs:
            out(f"  $ {subprocess.list2cmdline(argv)}")
            code, result = _run_one(argv, runner, name, entry["name"])
            if code != 0:
                break
        seconds = time.monotonic() - started
        entry.update(completionTime=_now(), seconds=round(seconds, 1))
        if result is not None:
            entry["result"] = result
        if code != 0:
            entry.update(phase="Failed", exitCode=code, message=f"exit code {code}")
            status.update(phase="Failed", completionTime=_now(), message=f"step {entry['name']} failed (exit code {code})")
            write_json(status_path, status)
            out(f"[{index + 1}/{len(steps)}] {entry['name']}: FAILED after {seconds:.1f}s (exit code {code}); status in {status_path}")
            return code
        entry["phase"] = "Succeeded"
        status["results"] = contract.merge_results(status["results"], entry["type"], result)
        write_json(status_path, status)
        out(f"[{index + 1}/{len(steps)}] {entry['name']}: succeeded in {seconds:.1f}s{_summary(result)}")
    status.update(phase="Succeeded", completionTime=_now(), message=f"{len(steps)} step(s) succeeded")
    write_json(status_path, status)
    out(f"{name}: all {len(steps)} step(s) succeeded; status in {status_path}")
    return 0


def _run_one(argv: Sequence[str], runner: Runner, job_name: str, step_name: str) -> tuple[int, dict[str, Any] | None]:
    """Run one argv with the pod's environment contract; returns (exit code, its result JSON or None)."""
    with tempfile.TemporaryDirectory(prefix="mmar-run-") as tmp:
        log = Path(tmp) / "termination-log"
        env = {**os.environ, "MMAR_TERMINATION_LOG": str(log), "MMAR_JOB_NAME": job_name, "MMAR_STEP": step_name}
        try:
            code = runner(argv, env)
        except FileNotFoundError as error:
            raise MMARError(f"cannot start {argv[0]!r}: {error.strerror}") from None
        message = log.read_text(encoding="utf-8", errors="replace") if log.exists() else None
    return code, contract.parse_result(message)


def _summary(result: Mapping[str, Any] | None) -> str:
    if not result:
        return ""
    if result.get("best_metric") is not None:
        return f" ({result.get('key_metric', 'metric')} best {result['best_metric']} at epoch {result.get('best_epoch')})"
    if result.get("exported"):
        return f" (exported {', '.join(map(str, result['exported']))})"
    return ""
