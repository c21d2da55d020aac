"""The container images: Dockerfile lint and structure, and docker/install.sh (what the images install).

The Docker engine can't run here, so the install script the Dockerfile calls is exercised in a
venv instead, and the Dockerfile is checked to do nothing but call it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from _tools import ROOT, require_tool, run_tool

DOCKERFILE = ROOT / "Dockerfile"
INSTALL = ROOT / "docker" / "install.sh"
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
OCI_LABELS = {
    "org.opencontainers.image.title", "org.opencontainers.image.description", "org.opencontainers.image.version",
    "org.opencontainers.image.revision", "org.opencontainers.image.created", "org.opencontainers.image.licenses",
    "org.opencontainers.image.vendor", "org.opencontainers.image.base.name",
}
# Installed only in the GPU image; the CPU development venv has onnxruntime (and no TensorRT).
GPU_ONLY = {"onnxruntime-gpu", "tensorrt-cu13"}


def stages() -> dict[str, list[tuple[str, str]]]:
    """Dockerfile stages: name -> [(INSTRUCTION, arguments)], continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            name = args.split(" AS ")[-1].strip() if " AS " in args else args
            current = result.setdefault(name, [])
        if current is not None:
            current.append((instruction, args.strip()))
    return result


def labels_of(stage: list[tuple[str, str]]) -> set[str]:
    return {m.group(1) for _, args in stage if _ == "LABEL" for m in re.finditer(r"([\w.\-]+)=", args)}


def test_hadolint():
    result = run_tool([require_tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("target, entrypoint", [("runtime", '["mmar"]'), ("operator", '["mmar-operator"]')])
def test_final_stage_runs_non_root_with_labels(target, entrypoint):
    stage = stages()[target]
    users = [args for ins, args in stage if ins == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", users[-1]), users
    assert ("ENTRYPOINT", entrypoint) in stage
    missing = OCI_LABELS - labels_of(stage)
    assert not missing, f"stage {target} lacks OCI labels {sorted(missing)}"


def test_installs_go_through_install_script():
    for name, stage in stages().items():
        for instruction, args in stage:
            if instruction == "RUN":
                assert "pip" not in args, f"stage {name}: install with docker/install.sh, not pip directly: {args}"
                if "install" in args:
                    assert args.startswith("docker/install.sh "), args


def test_base_image_is_pinned():
    args = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert args and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", args.group(1)), args


def test_uid_and_ports_agree_with_chart_and_operator():
    text = DOCKERFILE.read_text()
    uid = int(re.search(r"useradd --uid (\d+)", text).group(1))
    values = yaml.safe_load((ROOT / "charts" / "mmar-operator" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == uid
    assert values["runtime"]["runAsUser"] == uid
    operator_ports = {int(p) for ins, args in stages()["operator"] if ins == "EXPOSE" for p in args.split()}
    assert operator_ports == {values["metrics"]["port"], values["operator"]["livenessPort"]}
    runtime_ports = {int(p) for ins, args in stages()["runtime"] if ins == "EXPOSE" for p in args.split()}
    assert runtime_ports == {values["runtime"]["metricsPort"]}
    config = pytest.importorskip("mmar_operator.config").Config()
    assert config.run_as_user == uid
    assert (config.metrics_port, config.liveness_port, config.runtime_metrics_port) == (
        values["metrics"]["port"], values["operator"]["livenessPort"], values["runtime"]["metricsPort"])


def requirements(target: str) -> list[Requirement]:
    out = subprocess.run(["bash", str(INSTALL), "--print", target], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHON": sys.executable}).stdout
    return [Requirement(line) for line in out.splitlines() if line.strip()]


def pins() -> dict[str, str]:
    result = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt: {line} is not an exact pin"
            result[canonicalize_name(req.name)] = spec.version
    return result


def test_operator_target_never_installs_torch():
    names = {canonicalize_name(r.name) for r in requirements("operator")}
    assert {"kopf", "kubernetes", "prometheus-client"} <= names
    assert not names & {"torch", "monai", "onnxruntime", "onnxruntime-gpu"}


def test_runtime_target_is_the_gpu_build():
    names = {canonicalize_name(r.name) for r in requirements("runtime")}
    assert {"torch", "monai", "simpleitk", "pydicom", "nibabel", "onnxruntime-gpu", "tensorrt-cu13"} <= names
    assert "onnxruntime" not in names  # it and onnxruntime-gpu install the same module


@pytest.mark.parametrize("target", ["operator", "runtime"])
def test_every_requirement_is_pinned_within_pyproject_range(target):
    pinned = pins()
    for req in requirements(target):
        name = canonicalize_name(req.name)
        assert name in pinned, f"docker/constraints.txt has no pin for {req.name} ({target})"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} is outside {req}"


def test_pins_equal_the_tested_environment():
    """The images ship the versions the test suite ran against (CPU-only packages aside)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    tested = {canonicalize_name(Requirement(r).name) for extra in ("runtime", "operator")
              for r in project["optional-dependencies"][extra]}
    for name, version in pins().items():
        if name in GPU_ONLY or name not in tested | {"pyyaml", "jsonschema", "pytorch-ignite", "tensorboard"}:
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        assert installed.split("+")[0] == version, f"constraints.txt pins {name}=={version}, the venv has {installed}"


@pytest.mark.slow
def test_operator_install_in_a_fresh_venv(tmp_path):
    """docker/install.sh operator, as the image runs it: mmar_operator imports, torch does not."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {**os.environ, "PYTHON": str(python), "PIP_QUIET": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(["bash", str(INSTALL), "operator"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    check = subprocess.run(
        [str(python), "-c", "import importlib.util, mmar_operator, mmar_operator.metrics, kopf; "
                            "print(importlib.util.find_spec('torch') is None)"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "True", "torch is importable in the operator environment"
    assert (venv / "bin" / "mmar-operator").exists()
