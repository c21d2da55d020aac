"""`mmar run`: the manifest's steps run here, in order, with the operator's argv and claims mapped to folders.

A tiny fake `mmar` (a Python script run in a real subprocess) records its argv and writes a termination
message, so these tests need no training code.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmar import job as contract
from mmar import local_run
from mmar.commands import run as run_command
from mmar.errors import MMARError

ROOT = Path(__file__).resolve().parents[1]

FAKE_MMAR = r'''
import json, os, sys
from pathlib import Path
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"argv": argv, "job": os.environ.get("MMAR_JOB_NAME"), "step": os.environ.get("MMAR_STEP")}) + "\n")
command = argv[0]
if command == os.environ.get("FAKE_FAIL"):
    print("Traceback: boom", file=sys.stderr)
    sys.exit(3)
if command == "init":
    Path(argv[1]).mkdir(parents=True, exist_ok=True)
    result = {"command": "init"}
elif command == "train":
    Path(argv[1], "models").mkdir(parents=True, exist_ok=True)
    result = {"command": "train", "epochs": 2, "key_metric": "val_mean_dice", "best_metric": 0.5, "best_epoch": 2}
elif command == "export":
    result = {"command": "export", "exported": ["models/model.ts"]}
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
    monkeypatch.delenv("FAKE_FAIL", raising=False)

    def runner(argv, env):
        assert list(argv[:3]) == [sys.executable, "-m", "mmar"], argv  # `mmar` runs with this interpreter
        return subprocess.run([sys.executable, str(script), *argv[3:]], env=dict(env), check=False).returncode

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


def test_first_failure_stops_the_job(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "validate")
    lines = []
    status_path = tmp_path / "out" / "status.json"
    code = local_run.run(demo_job(), volumes(tmp_path), runner=fake, out=lines.append, status_path=status_path)
    assert code == 3
    assert [c["argv"][0] for c in fake.calls()] == ["init", "train", "validate"]  # export never ran
    status = json.loads(status_path.read_text())
    assert status["phase"] == "Failed" and "validate failed (exit code 3)" in status["message"]
    assert [s["phase"] for s in status["steps"]] == ["Succeeded", "Failed", "Waiting"]
    assert status["results"]["epochs"] == 2  # what succeeded before the failure is kept
    assert any("validate: FAILED" in line for line in lines)


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
        local_run.run(job, {"mmar-workspace": tmp_path, "datasets": tmp_path}, runner=lambda a, e: 0)


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


def test_cli_reports_a_bad_manifest(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text("apiVersion: mmar.dev/v1alpha1\nkind: MMARJob\nmetadata: {name: x}\nspec: {steps: []}\n")
    proc = subprocess.run([sys.executable, "-m", "mmar", "run", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "error: spec.mmar: is required" in proc.stderr


@pytest.mark.skipif(any(importlib.util.find_spec(f"mmar.commands.{c}") is None for c in ("init", "demo_data")),
                    reason="mmar init / demo-data not built yet")
def test_real_init_scaffolds_once(tmp_path):
    """The demo's first step with the real `mmar init` on real demo data; the training step itself is faked."""
    subprocess.run([sys.executable, "-m", "mmar", "demo-data", str(tmp_path / "data"), "--task", "segmentation", "--cases", "4", "--size", "16"],
                   check=True, capture_output=True)
    ran = []

    def runner(argv, env):
        if argv[3] == "init":
            return subprocess.run(list(argv), env=dict(env), check=False).returncode
        ran.append(argv[3])
        return 0

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
