"""`mmar run`: the manifest's steps run here, in order, with the operator's argv and claims mapped to folders.

A tiny fake `mmar` (a Python script run in a real subprocess, through `mmar run`'s own process runner)
records its argv and writes a termination message, so these tests need no training code. The last test
interrupts the real `mmar run` of a real training step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from mmar import job as contract
from mmar import local_run, results
from mmar.commands import run as run_command
from mmar.errors import MMARError

ROOT = Path(__file__).resolve().parents[2]

FAKE_MMAR = r'''
import json, os, signal, subprocess, sys, time
from pathlib import Path
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"argv": argv, "job": os.environ.get("MMAR_JOB_NAME"), "step": os.environ.get("MMAR_STEP"),
                          "pid": os.getpid()}) + "\n")
command = argv[0]
if command == os.environ.get("FAKE_FAIL"):
    print("epoch 1 ...", flush=True)
    print("error: datalist.json: validation[0].label: file not found: x.nii.gz", file=sys.stderr)
    print("  (a warning printed after the error)", file=sys.stderr)
    sys.exit(3)
if command == os.environ.get("FAKE_FAIL_RESULT"):  # a command that reports its own failure
    Path(os.environ["MMAR_TERMINATION_LOG"]).write_text(json.dumps({"command": command, "error": "CUDA out of memory"}))
    print("RuntimeError: something else", file=sys.stderr)
    sys.exit(1)
if command == os.environ.get("FAKE_HANG"):  # a long step that has a child of its own, as a loader worker
    if os.environ.get("FAKE_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    helper = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    Path(os.environ["FAKE_PIDS"]).write_text(json.dumps([os.getpid(), helper.pid]))
    time.sleep(600)
if command == "init":
    Path(argv[1]).mkdir(parents=True, exist_ok=True)
    result = {"command": "init"}
elif command == "train":
    Path(argv[1], "models").mkdir(parents=True, exist_ok=True)
    result = {"command": "train", "epochs": 2, "key_metric": "val_mean_dice", "best_metric": 0.5, "best_epoch": 2}
elif command == "export":
    result = {"command": "export", "files": ["models/model.ts"], "formats": ["torchscript"], "skipped": [],
              "precision": "fp32", "input_shape": [1, 1, 16, 16, 16], "max_abs_diff": {"torchscript": 0.0}}
else:
    result = {"command": command}
Path(os.environ["MMAR_TERMINATION_LOG"]).write_text(json.dumps(result))
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_mmar.py"
    script.write_text(FAKE_MMAR)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(calls))
    for name in ("FAKE_FAIL", "FAKE_FAIL_RESULT", "FAKE_HANG", "FAKE_IGNORE_TERM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FAKE_PIDS", str(tmp_path / "pids.json"))

    def runner(argv, env, interrupt, grace_seconds=local_run.GRACE_SECONDS):
        assert list(argv[:3]) == [sys.executable, "-m", "mmar"], argv  # `mmar` runs with this interpreter
        return local_run.run_command([sys.executable, str(script), *argv[3:]], env, interrupt, grace_seconds=grace_seconds)

    def read_calls():
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    runner.calls = read_calls
    return runner


# The demo manifest's claims and MMAR, with a fixed small step list (the shipped example's steps may change)
STEPS = [{"type": "train", "set": {"epochs": 2, "train#batch_size": 2}}, {"type": "validate"},
         {"type": "export", "formats": ["torchscript", "onnx"]}]


def demo_body():
    body = yaml.safe_load((ROOT / "examples" / "demo-job.yaml").read_text())
    body["spec"]["steps"] = [dict(step) for step in STEPS]
    return body


def demo_job():
    return contract.parse(demo_body())


def volumes(tmp_path):
    return {"demo-data": tmp_path / "data", "demo-workspace": tmp_path / "ws"}


def test_steps_run_in_order_with_local_paths(tmp_path, fake):
    lines = []
    code = local_run.run(demo_job(), volumes(tmp_path), runner=fake, out=lines.append)
    assert code == 0
    calls = fake.calls()
    assert [c["argv"][0] for c in calls] == ["init", "train", "validate", "export"]
    mmar = str(tmp_path / "ws" / "seg-demo")
    assert calls[0]["argv"] == ["init", mmar, "--task", "segmentation", "--datalist", str(tmp_path / "data" / "datalist.json"), "--exist-ok"]
    assert calls[1]["argv"][:5] == ["train", mmar, "--set", f"DATASET_JSON={tmp_path / 'data' / 'datalist.json'}", "epochs=2"]
    assert calls[1]["argv"][-2:] == ["--file_root", str(tmp_path / "data")]
    assert {(c["job"], c["step"]) for c in calls[1:2]} == {("demo", "train")}
    assert any("train: succeeded" in line and "val_mean_dice best 0.5" in line for line in lines)

    status = json.loads((tmp_path / "ws" / "demo.status.json").read_text())
    assert status["phase"] == "Succeeded"
    assert [s["phase"] for s in status["steps"]] == ["Succeeded"] * 3
    assert status["results"] == {"epochs": 2, "keyMetric": "val_mean_dice", "bestMetric": 0.5, "bestEpoch": 2, "exported": ["models/model.ts"]}


def test_first_failure_stops_the_job(tmp_path, fake, monkeypatch, capfd):
    monkeypatch.setenv("FAKE_FAIL", "validate")
    lines = []
    status_path = tmp_path / "out" / "status.json"
    code = local_run.run(demo_job(), volumes(tmp_path), runner=fake, out=lines.append, status_path=status_path)
    assert code == 3
    assert [c["argv"][0] for c in fake.calls()] == ["init", "train", "validate"]  # export never ran
    status = json.loads(status_path.read_text())
    reason = "datalist.json: validation[0].label: file not found: x.nii.gz"  # the step's own error line
    assert status["phase"] == "Failed" and status["message"] == f"step validate failed (exit code 3): {reason}"
    assert [s["phase"] for s in status["steps"]] == ["Succeeded", "Failed", "NotRun"]
    assert status["steps"][2]["reason"] == "PreviousStepFailed" and status["steps"][2]["message"] == f"not run: step {status['steps'][1]['name']} failed"
    assert status["steps"][1]["message"] == reason and status["steps"][1]["exitCode"] == 3
    assert status["results"]["epochs"] == 2  # what succeeded before the failure is kept
    assert any("validate: FAILED" in line and reason in line for line in lines)
    assert reason in capfd.readouterr().err  # the step's stderr still reaches the user


def test_a_failure_the_step_reports_itself_wins_over_its_stderr(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_RESULT", "train")
    status_path = tmp_path / "status.json"
    assert local_run.run(demo_job(), volumes(tmp_path), runner=fake, out=lambda _: None, status_path=status_path) == 1
    status = json.loads(status_path.read_text())
    assert status["steps"][0]["message"] == "CUDA out of memory"
    assert status["steps"][0]["result"] == {"command": "train", "error": "CUDA out of memory"}
    assert status["results"] == {}  # a failed step's result is recorded, never folded into the summary


# ---- a status whose runner is gone (`mmar run` SIGKILLed: nothing was left to record the end) ----------------


def _ended_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _left_running(status_path: Path, runner: dict) -> dict:
    """The status file as a `mmar run` killed during the demo's validate step leaves it."""
    status = {"name": "demo", "phase": "Running", "startTime": "2026-12-06T10:00:00Z", "runner": runner,
              "steps": [{"name": "train", "type": "train", "phase": "Succeeded"},
                        {"name": "validate", "type": "validate", "phase": "Running", "startTime": "2026-12-06T10:05:00Z"},
                        {"name": "export", "type": "export", "phase": "Waiting"}],
              "results": {"epochs": 2}}
    status_path.parent.mkdir(parents=True, exist_ok=True)
    status_path.write_text(json.dumps(status))
    return status


def test_a_run_records_its_runner(tmp_path, fake):
    status_path = tmp_path / "status.json"
    assert local_run.run(demo_job(), volumes(tmp_path), runner=fake, out=lambda _: None, status_path=status_path) == 0
    runner = json.loads(status_path.read_text())["runner"]
    assert runner["pid"] == os.getpid() and runner["host"] == socket.gethostname()
    assert runner["processStart"] == local_run.process_start(os.getpid()) is not None
    assert local_run.runner_gone(runner) is False


@pytest.mark.parametrize("how", ["pid-ended", "pid-reused", "rebooted"])
def test_a_running_status_whose_runner_is_gone_reads_as_interrupted(tmp_path, how):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        start = local_run.process_start(sleeper.pid)
        boot, ticks = start.split("/")
        pid, recorded = {"pid-ended": (_ended_pid(), start),
                         "pid-reused": (sleeper.pid, f"{boot}/{int(ticks) - 100}"),  # the PID now names a later process
                         "rebooted": (sleeper.pid, f"another-boot/{ticks}")}[how]
        status_path = tmp_path / "status.json"
        written = _left_running(status_path, {"host": socket.gethostname(), "pid": pid, "processStart": recorded})
        status = local_run.read_status(status_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert status["phase"] == "Interrupted" and status["reason"] == "RunnerLost"
    assert status["message"].startswith(f"interrupted: `mmar run` (PID {pid}) is gone during step validate")
    assert [(s["phase"], s.get("reason")) for s in status["steps"]] == [
        ("Succeeded", None), ("Interrupted", "RunnerLost"), ("Waiting", None)]
    assert status["results"] == {"epochs": 2}
    assert json.loads(status_path.read_text()) == written  # reading changes nothing on disk


def test_a_running_status_whose_runner_runs_reads_as_running(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        status_path = tmp_path / "status.json"
        written = _left_running(status_path, {"host": socket.gethostname(), "pid": sleeper.pid,
                                              "processStart": local_run.process_start(sleeper.pid)})
        assert local_run.read_status(status_path) == written
        # a PID alone (no start recorded, as where there is no /proc) is checked for life
        written = _left_running(status_path, {"host": socket.gethostname(), "pid": sleeper.pid})
        assert local_run.read_status(status_path) == written
    finally:
        sleeper.kill()
        sleeper.wait()
    assert local_run.read_status(status_path)["reason"] == "RunnerLost"


def test_a_zombie_runner_is_gone(tmp_path):
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert local_run.process_start(zombie.pid) is None
        assert local_run.runner_gone({"host": socket.gethostname(), "pid": zombie.pid, "processStart": "x/1"}) is True
    finally:
        zombie.wait()


def test_another_hosts_runner_cannot_be_judged_here(tmp_path):
    status_path = tmp_path / "status.json"
    written = _left_running(status_path, {"host": "not-" + socket.gethostname(), "pid": _ended_pid(), "processStart": "x/1"})
    assert local_run.read_status(status_path) == written  # still Running: only its host can tell
    assert local_run.read_status(tmp_path / "none.json") is None


def test_the_next_run_says_the_last_was_lost_and_writes_its_own(tmp_path, fake):
    status_path = tmp_path / "ws" / "demo.status.json"
    _left_running(status_path, {"host": socket.gethostname(), "pid": _ended_pid(), "processStart": "x/1"})
    lines = []
    assert local_run.run(demo_job(), volumes(tmp_path), runner=fake, out=lines.append) == 0
    assert any(line.startswith("demo: the last run was lost: interrupted: `mmar run` (PID ") for line in lines), lines
    status = json.loads(status_path.read_text())
    assert status["phase"] == "Succeeded" and status["reason"] == "AllStepsSucceeded"
    assert status["runner"]["pid"] == os.getpid()
    assert [s["phase"] for s in status["steps"]] == ["Succeeded"] * 3


def test_the_next_run_is_refused_while_the_runner_still_runs(tmp_path, fake):
    status_path = tmp_path / "ws" / "demo.status.json"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        written = _left_running(status_path, {"host": socket.gethostname(), "pid": sleeper.pid,
                                              "processStart": local_run.process_start(sleeper.pid)})
        with pytest.raises(MMARError, match=rf"demo is being run by `mmar run` \(PID {sleeper.pid} on host .*: "
                                            rf"{status_path} is its status"):
            local_run.run(demo_job(), volumes(tmp_path), runner=fake, out=lambda _: None)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert fake.calls() == [] and json.loads(status_path.read_text()) == written  # nothing ran, nothing written


def test_a_running_status_of_this_very_process_is_an_earlier_run_that_ended(tmp_path, fake):
    status_path = tmp_path / "ws" / "demo.status.json"
    _left_running(status_path, local_run.runner_record())  # as a run that raised in this process leaves it
    lines = []
    assert local_run.run(demo_job(), volumes(tmp_path), runner=fake, out=lines.append) == 0
    assert "demo: the last run, in this process, ended without recording its end; running the job again" in lines
    assert json.loads(status_path.read_text())["phase"] == "Succeeded"


def test_a_running_status_of_another_host_is_replaced_with_a_word(tmp_path, fake):
    status_path = tmp_path / "ws" / "demo.status.json"
    _left_running(status_path, {"host": "elsewhere", "pid": 1, "processStart": "x/1"})
    lines = []
    assert local_run.run(demo_job(), volumes(tmp_path), runner=fake, out=lines.append) == 0
    assert any("says the job is Running, by `mmar run` (PID 1 on host elsewhere" in line
               and "cannot be checked from this machine" in line for line in lines), lines
    assert json.loads(status_path.read_text())["phase"] == "Succeeded"


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an orphan's zombie may wait for a PID 1 that never reaps)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(path: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_is_passed_to_the_step_and_recorded(tmp_path, fake, monkeypatch, signum):
    monkeypatch.setenv("FAKE_HANG", "validate")
    status_path = tmp_path / "status.json"
    pids = tmp_path / "pids.json"
    handler = signal.getsignal(signum)
    threading.Thread(target=lambda: (_wait_for(pids), os.kill(os.getpid(), signum)), daemon=True).start()
    started = time.monotonic()
    code = local_run.run(demo_job(), volumes(tmp_path), runner=fake, out=lambda _: None, status_path=status_path,
                         grace_seconds=30)
    assert code == 128 + signum
    assert time.monotonic() - started < 20  # the step stopped on the signal; the grace period was not needed
    assert not any(_alive(pid) for pid in json.loads(pids.read_text()))  # the step and its helper are gone
    status = json.loads(status_path.read_text())
    name = signal.Signals(signum).name
    assert status["phase"] == "Interrupted" and status["signal"] == name
    assert status["message"].startswith(f"interrupted by {name} during step validate")
    assert [s["phase"] for s in status["steps"]] == ["Succeeded", "Interrupted", "Waiting"]
    assert status["steps"][1]["signal"] == name
    assert status["steps"][1]["exitCode"] == -signum  # the step died of the signal passed on, not of SIGKILL
    assert signal.getsignal(signum) == handler  # `mmar run`'s handler is gone with the run


@pytest.mark.parametrize("grace, signals", [(1.0, 1), (600.0, 3)], ids=["grace-period-over", "third-signal"])
def test_a_step_that_ignores_sigterm_is_killed(tmp_path, fake, monkeypatch, grace, signals):
    monkeypatch.setenv("FAKE_HANG", "train")
    monkeypatch.setenv("FAKE_IGNORE_TERM", "1")
    pids = tmp_path / "pids.json"

    def send():
        _wait_for(pids)
        for _ in range(signals):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # each one seen on its own

    threading.Thread(target=send, daemon=True).start()
    started = time.monotonic()
    code = local_run.run(demo_job(), volumes(tmp_path), out=lambda _: None, status_path=tmp_path / "status.json",
                         runner=lambda argv, env, interrupt: fake(argv, env, interrupt, grace_seconds=grace))
    assert code == 143 and time.monotonic() - started < 20
    assert not any(_alive(pid) for pid in json.loads(pids.read_text()))
    entry = json.loads((tmp_path / "status.json").read_text())["steps"][0]
    assert entry["phase"] == "Interrupted" and entry["exitCode"] == -signal.SIGKILL


def test_a_claim_without_a_folder_is_a_clear_error(tmp_path, fake):
    with pytest.raises(MMARError, match=r"spec.data.claimName: claim 'demo-data' has no local folder; pass --volume demo-data="):
        local_run.run(demo_job(), {"demo-workspace": tmp_path}, runner=fake)
    assert fake.calls() == []


@pytest.mark.parametrize("item", ["nodata", "=x", "claim="])
def test_bad_volume_flags(item):
    with pytest.raises(MMARError, match="expected CLAIM=/local/path"):
        local_run.parse_volumes([item])


def test_relative_volume_paths_resolve_from_base(tmp_path):
    assert local_run.parse_volumes(["a=rel/dir"], base=tmp_path) == {"a": (tmp_path / "rel" / "dir").resolve()}


def test_one_claim_for_both_mounts(tmp_path):
    body = yaml.safe_load((ROOT / "examples" / "demo-job.yaml").read_text())
    body["spec"]["data"] = {"claimName": "demo-workspace", "path": "data"}
    job = contract.parse(body)
    mounts = local_run.mount_map(job, {"demo-workspace": tmp_path})
    assert local_run.to_local("/data/data/datalist.json", mounts) == str(tmp_path / "data" / "datalist.json")
    assert local_run.to_local("/workspace/seg-demo", mounts) == str(tmp_path / "seg-demo")


def test_path_translation_leaves_other_text_alone(tmp_path):
    mounts = {"/workspace": tmp_path / "w", "/data": tmp_path / "d"}
    assert local_run.to_local("/data", mounts) == str(tmp_path / "d")
    assert local_run.to_local("DATASET_JSON=/data/x.json", mounts) == f"DATASET_JSON={tmp_path / 'd' / 'x.json'}"
    assert local_run.to_local("/database/x", mounts) == "/database/x"
    assert local_run.to_local("epochs=5", mounts) == "epochs=5"
    assert local_run.to_local("train#batch_size=2", mounts) == "train#batch_size=2"


def test_multi_node_steps_are_refused_locally(tmp_path):
    job = contract.parse(ROOT / "examples" / "segmentation-job.yaml")
    with pytest.raises(MMARError, match=r"spec.steps\[2\].nodes: 2 nodes cannot run on one machine"):
        local_run.run(job, {"mmar-workspace": tmp_path, "datasets": tmp_path}, runner=lambda a, e, i: local_run.Finished(0))


def test_multi_gpu_runs_torchrun_module(tmp_path):
    body = demo_body()
    body["spec"]["gpusPerNode"] = 2
    mounts = local_run.mount_map(contract.parse(body), volumes(tmp_path))
    argvs = local_run.plan(contract.parse(body), mounts)
    assert argvs[0][1][:3] == [sys.executable, "-m", "torch.distributed.run"]


def test_cli_dry_run_prints_the_commands(tmp_path, capsys):
    manifest = tmp_path / "demo-job.yaml"
    manifest.write_text(yaml.safe_dump(demo_body()))
    code = run_command.main([str(manifest), "--dry-run", "-v", f"demo-data={tmp_path}/d", "-v", f"demo-workspace={tmp_path}/w"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"[1/3] train: {sys.executable} -m mmar init {tmp_path}/w/seg-demo" in out
    assert "[3/3] export:" in out and "--formats torchscript,onnx" in out
    assert not (tmp_path / "w").exists()  # a dry run writes nothing


def test_cli_refuses_a_negative_grace_period(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_command.main([str(tmp_path / "job.yaml"), "--grace-period", "-1"])
    assert exit_.value.code == 2 and "--grace-period must be >= 0, got -1" in capsys.readouterr().err


def test_cli_reports_a_bad_manifest(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text("apiVersion: mmar.dev/v1alpha1\nkind: MMARJob\nmetadata: {name: x}\nspec: {steps: []}\n")
    proc = subprocess.run([sys.executable, "-m", "mmar", "run", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"error: {bad}: spec.mmar: is required" in proc.stderr  # the file, then each field at fault


def test_a_bad_set_of_a_later_step_fails_before_the_first_step_runs(tmp_path):
    """Issue 31: `epochs: abc` in the train step was found only when train started, after the convert steps."""
    body = yaml.safe_load((ROOT / "examples" / "demo-job.yaml").read_text())
    train = next(step for step in body["spec"]["steps"] if step["type"] == "train")
    train["set"] = {**train.get("set", {}), "epochs": "abc"}
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(body))
    data, workspace = tmp_path / "data", tmp_path / "workspace"
    data.mkdir(), workspace.mkdir()
    proc = subprocess.run([sys.executable, "-m", "mmar", "run", str(manifest), "--volume", f"demo-data={data}",
                           "--volume", f"demo-workspace={workspace}"], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    index = body["spec"]["steps"].index(train)
    assert f"error: {manifest}: spec.steps[{index}].set.epochs: epochs must be a whole number" in proc.stderr
    assert list(workspace.iterdir()) == [] and list(data.iterdir()) == []  # nothing ran


@pytest.mark.skipif(any(importlib.util.find_spec(f"mmar.commands.{c}") is None for c in ("init", "demo_data")),
                    reason="mmar init / demo-data not built yet")
def test_real_init_scaffolds_once(tmp_path):
    """The demo's first step with the real `mmar init` on real demo data; the training step itself is faked."""
    subprocess.run([sys.executable, "-m", "mmar", "demo-data", str(tmp_path / "data"), "--task", "segmentation", "--cases", "4", "--size", "16"],
                   check=True, capture_output=True)
    ran = []

    def runner(argv, env, interrupt):
        if argv[3] == "init":
            return local_run.run_command(argv, env, interrupt)
        ran.append(argv[3])
        return local_run.Finished(0)

    body = yaml.safe_load((ROOT / "examples" / "demo-job.yaml").read_text())
    body["spec"]["steps"] = [{"type": "train"}]
    job = contract.parse(body)
    assert local_run.run(job, volumes(tmp_path), runner=runner, out=lambda _: None) == 0
    mmar = tmp_path / "ws" / "seg-demo"
    assert mmar.is_dir() and any(mmar.iterdir())
    before = {p: p.stat().st_mtime_ns for p in mmar.rglob("*") if p.is_file()}
    assert local_run.run(job, volumes(tmp_path), runner=runner, out=lambda _: None) == 0
    assert {p: p.stat().st_mtime_ns for p in mmar.rglob("*") if p.is_file()} == before  # --exist-ok left it alone
    assert ran == ["train", "train"]


@pytest.mark.slow
def test_sigterm_to_the_real_mmar_run_stops_a_real_training_step(tmp_path, seg_data):
    """`mmar run` (the CLI, in its own process) of a long real training: SIGTERM once training is under way."""
    from conftest import make_seg_mmar

    workspace = tmp_path / "ws"
    mmar = make_seg_mmar(workspace / "mmar", seg_data, epochs=1000)
    body = {"apiVersion": contract.API_VERSION, "kind": contract.KIND, "metadata": {"name": "long"},
            "spec": {"mmar": {"claimName": "ws", "path": "mmar"}, "data": {"claimName": "data"}, "gpusPerNode": 0,
                     "steps": [{"type": "train", "set": {"train#num_workers": 1}}]}}
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(body))
    status_path = tmp_path / "status.json"
    proc = subprocess.Popen([sys.executable, "-m", "mmar", "run", str(manifest), "-v", f"ws={workspace}",
                             "-v", f"data={seg_data.parent}", "--status", str(status_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (mmar / "models" / "model.ckpt").exists():  # written at the first validated epoch
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training never reached its first epoch"
            time.sleep(0.2)
        step = local_run._descendants(proc.pid)
        assert step, "the step runs below `mmar run`"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, (out, err)
    assert not any(_alive(pid) for pid in step)  # the training process and its loader workers are gone
    status = json.loads(status_path.read_text())
    assert status["phase"] == "Interrupted" and status["signal"] == "SIGTERM"
    entry = status["steps"][0]
    assert entry["phase"] == "Interrupted" and entry["signal"] == "SIGTERM" and entry["exitCode"] != 0
    assert entry["message"] == f"interrupted by SIGTERM: {results.error_line(err)}"  # the step's own last line
    assert "interrupted by SIGTERM during step train" in out
