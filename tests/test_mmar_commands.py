"""The MMAR's commands/*.sh, run with bash as a user runs them: from another working directory, on a copy of
the MMAR in another folder, with `mmar` found where it is installed there (not where `mmar init` ran)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, make_seg_mmar
from mmar.archive import load_archive
from mmar.scaffold import COMMANDS

# script -> the `mmar` arguments after the MMAR root
EXPECTED = {
    "train.sh": ["train"],
    "train_finetune.sh": ["train", "--finetune"],
    "train_2gpu.sh": ["train", "--gpus", "2"],
    "train_2gpu_finetune.sh": ["train", "--finetune", "--gpus", "2"],
    "validate.sh": ["validate"],
    "infer.sh": ["infer"],
    "export.sh": ["export"],
}


def _folder_of(tmp_path: Path, name: str, programs: dict[str, str]) -> Path:
    """A folder holding the given programs (name -> shell script body): what a PATH entry offers."""
    folder = tmp_path / name
    folder.mkdir()
    for program, body in programs.items():
        path = folder / program
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return folder


@pytest.fixture
def tools(tmp_path) -> Path:
    """bash and dirname only: a PATH with this folder alone has no `mmar` and no `python3`."""
    folder = tmp_path / "tools"
    folder.mkdir()
    for program in ("bash", "dirname"):
        (folder / program).symlink_to(shutil.which(program))
    return folder


@pytest.fixture
def moved_mmar(tmp_path, seg_data) -> Path:
    """An MMAR made by `init` here, then moved to another folder (as to another machine or volume)."""
    made = make_seg_mmar(tmp_path / "made", seg_data, epochs=1)
    moved = tmp_path / "elsewhere" / "my_mmar"
    moved.parent.mkdir()
    shutil.move(str(made), moved)
    return moved


def run_script(script: Path, *args: str, path: list[Path], cwd: Path, env: dict | None = None):
    environment = {key: value for key, value in os.environ.items() if key not in {"MMAR_BIN", "VIRTUAL_ENV"}}
    environment.update({"PATH": os.pathsep.join(map(str, path)), **(env or {})})
    # executed directly (shebang: /usr/bin/env bash), as `commands/train.sh` is typed
    return subprocess.run([str(script), *args], cwd=cwd, env=environment, capture_output=True, text=True)


def test_init_writes_the_clara_command_scripts(moved_mmar):
    scripts = sorted(path.name for path in (moved_mmar / "commands").iterdir())
    assert scripts == sorted(EXPECTED) == sorted(COMMANDS)
    for name in scripts:
        path = moved_mmar / "commands" / name
        text = path.read_text()
        assert os.access(path, os.X_OK), name
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, name
        # nothing of the machine that ran init: the MMAR is shipped elsewhere
        assert str(ROOT) not in text and sys.prefix not in text, name
    for name in ("train_2gpu.sh", "train_2gpu_finetune.sh"):
        assert "do not multiply it yourself" in (moved_mmar / "commands" / name).read_text()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_script_runs_the_mmar_on_path_with_its_arguments(name, moved_mmar, tools, tmp_path):
    record = tmp_path / "argv.txt"
    on_path = _folder_of(tmp_path, "bin", {"mmar": f'printf "%s\\n" "$@" > "{record}"'})
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    result = run_script(moved_mmar / "commands" / name, "--set", "epochs=1", path=[on_path, tools], cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    argv = record.read_text().splitlines()
    command, *options = EXPECTED[name]
    assert argv == [command, str(moved_mmar), *options, "--set", "epochs=1"]


def test_mmar_bin_comes_first(moved_mmar, tools, tmp_path):
    chosen = _folder_of(tmp_path, "chosen", {"my-mmar": f'echo chosen > "{tmp_path}/which"'})
    on_path = _folder_of(tmp_path, "bin", {"mmar": f'echo on-path > "{tmp_path}/which"'})
    result = run_script(moved_mmar / "commands" / "validate.sh", path=[on_path, tools], cwd=tmp_path,
                        env={"MMAR_BIN": str(chosen / "my-mmar")})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "which").read_text().strip() == "chosen"


def test_a_wrong_mmar_bin_is_one_clear_error(moved_mmar, tools, tmp_path):
    on_path = _folder_of(tmp_path, "bin", {"mmar": "exit 0"})
    result = run_script(moved_mmar / "commands" / "train.sh", path=[on_path, tools], cwd=tmp_path,
                        env={"MMAR_BIN": "/gone/venv/bin/mmar"})
    assert result.returncode == 127
    assert result.stderr.splitlines() == [
        f"error: {moved_mmar / 'commands' / 'train.sh'}: MMAR_BIN=/gone/venv/bin/mmar is not an executable "
        "(unset it to use `mmar` on PATH)"]


def test_without_mmar_on_path_python3_runs_the_module(moved_mmar, tools, tmp_path):
    """The real CLI through `python3 -m mmar` (a python3 that has mmar installed, as in the runtime image)."""
    python = _folder_of(tmp_path, "python", {"python3": f'exec "{sys.executable}" "$@"'})
    result = run_script(moved_mmar / "commands" / "train_2gpu_finetune.sh", "--help", path=[python, tools],
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: mmar train")


def test_without_any_mmar_the_error_says_what_to_do(moved_mmar, tools, tmp_path):
    result = run_script(moved_mmar / "commands" / "infer.sh", path=[tools], cwd=tmp_path)
    assert result.returncode == 127
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {moved_mmar / 'commands' / 'infer.sh'}: the mmar CLI is not installed here")
    assert "MMAR_BIN=/path/to/mmar" in line


@pytest.mark.slow
def test_every_script_works_for_real_on_a_moved_mmar(moved_mmar, tools, tmp_path):
    """train -> validate -> infer -> export -> fine-tune, and on a second copy train and fine-tune on 2
    processes (gloo on CPU), all through commands/*.sh with the real CLI as the `mmar` on PATH (2-3 min on
    2 busy cores)."""
    on_path = _folder_of(tmp_path, "bin", {"mmar": f'exec "{sys.executable}" -m mmar "$@"'})
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    cpu = {"CUDA_VISIBLE_DEVICES": "", "MMAR_CPU_AMP": "0"}
    # the 2-process scripts get an untrained copy: a finished training run is not started again
    parallel = tmp_path / "elsewhere" / "parallel_mmar"
    shutil.copytree(moved_mmar, parallel)

    def run(mmar: Path, name: str, *args: str) -> str:
        result = run_script(mmar / "commands" / name, *args, path=[on_path, tools], cwd=elsewhere, env=cpu)
        assert result.returncode == 0, f"{name}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    models, evaluation = moved_mmar / "models", moved_mmar / "eval"
    assert "done: 1 epochs" in run(moved_mmar, "train.sh")
    assert (models / "model.ckpt").is_file() and (models / "model_final.ckpt").is_file()
    assert "val_mean_dice" in run(moved_mmar, "validate.sh") and (evaluation / "metrics.json").is_file()
    run(moved_mmar, "infer.sh")
    datalist = json.loads(Path(load_archive(moved_mmar).env["DATASET_JSON"]).read_text())
    assert len(list(evaluation.rglob("*_seg.nii.gz"))) == len(datalist["validation"])  # one per case
    run(moved_mmar, "export.sh", "--formats", "torchscript")
    assert (models / "model.ts").is_file()
    assert f"fine-tuning from {models / 'model.ckpt'}" in run(moved_mmar, "train_finetune.sh")

    out = run(parallel, "train_2gpu.sh")
    assert "data-parallel: 2 processes (gloo)" in out and "done: 1 epochs" in out
    out = run(parallel, "train_2gpu_finetune.sh")
    assert f"fine-tuning from {parallel / 'models' / 'model.ckpt'}" in out
    assert "data-parallel: 2 processes (gloo)" in out and "done: 1 epochs" in out
