"""The container images: Dockerfile lint and structure, and docker/install.sh (what the images install).

These are static checks (fast suite): the install script the Dockerfile calls is exercised in a venv,
the Dockerfile is checked to do nothing but call it, and its label values and build arguments are
resolved the way the builder resolves them. Building and running the images is `make images`
(docker/images.sh; CI: .ci/images.sh).
"""

from __future__ import annotations

import os
import re
import shlex
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


def global_args() -> dict[str, str]:
    """ARGs declared before the first FROM, with their defaults."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    head = re.split(r"^FROM ", text, maxsplit=1, flags=re.M)[0]
    return dict(arg.partition("=")[::2] for arg in re.findall(r"^ARG (\S+)$", head, re.M))


def label_values(stage: list[tuple[str, str]], build_args: dict[str, str] | None = None) -> dict[str, str]:
    """The stage's labels as the builder sets them: ${NAME} is the value of an ARG declared in this stage
    before the LABEL (a --build-arg, else its default, else for a bare `ARG NAME` the global default);
    a name not declared in the stage is empty (what left base.name empty before)."""
    build_args = build_args or {}
    scope: dict[str, str] = {}
    labels: dict[str, str] = {}
    for instruction, args in stage:
        if instruction == "ARG":
            name, has_default, default = args.partition("=")
            scope[name] = build_args.get(name, default if has_default else global_args().get(name, ""))
        elif instruction == "LABEL":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                labels[key] = re.sub(r"\$\{(\w+)\}", lambda m: scope.get(m.group(1), ""), value)
    return labels


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
    empty = sorted(k for k, v in label_values(stage).items() if not v)
    assert not empty, f"stage {target}: labels {empty} are empty (an ARG not declared in the stage?)"


@pytest.mark.parametrize("target", ["runtime", "operator"])
def test_label_values(target):
    """The values, not only the keys: base.name is the base the image was built FROM (the default or
    the --build-arg), version defaults to pyproject's, the rest come from their build arguments."""
    project_version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    default = label_values(stages()[target])
    assert default["org.opencontainers.image.base.name"] == global_args()["PYTHON_IMAGE"]
    assert default["org.opencontainers.image.version"] == project_version
    given = {"PYTHON_IMAGE": "localhost/python:stand-in", "VERSION": "9.8.7", "REVISION": "abc123",
             "CREATED": "2026-11-30T00:00:00Z"}
    labels = label_values(stages()[target], given)
    assert {k: labels[f"org.opencontainers.image.{k}"] for k in ("base.name", "version", "revision", "created")} == {
        "base.name": "localhost/python:stand-in", "version": "9.8.7", "revision": "abc123",
        "created": "2026-11-30T00:00:00Z"}
    if target == "runtime":
        assert default["dev.mmar.torch-variant"] == "cuda"
        assert label_values(stages()[target], {"TORCH_VARIANT": "cpu"})["dev.mmar.torch-variant"] == "cpu"


def test_labels_come_after_the_large_layers():
    """CREATED changes on every build: a LABEL before `COPY --from` would re-copy the venv each time."""
    for target in ("runtime", "operator"):
        instructions = [ins for ins, _ in stages()[target]]
        assert instructions.index("LABEL") > max(i for i, ins in enumerate(instructions) if ins in {"COPY", "RUN"})


@pytest.mark.parametrize("target", ["runtime", "operator"])
def test_workdir_is_owned_by_the_image_user(target):
    """WORKDIR creates a missing folder owned by root (Docker): the user must own the one it works in."""
    text = DOCKERFILE.read_text()
    stage = stages()[target]
    (workdir,) = [args for ins, args in stage if ins == "WORKDIR"][-1:]
    uid = int(re.search(r"useradd --uid (\d+)", text).group(1))
    home = re.search(r"useradd .*--home-dir (\S+) --create-home", text).group(1)
    made = any(ins == "RUN" and re.search(rf"install -d -o {uid} -g {uid} .*{re.escape(workdir)}(\s|$)", args)
               for ins, args in stage[:stage.index(("WORKDIR", workdir))])
    assert workdir == home or made, f"stage {target}: WORKDIR {workdir} is not created owned by uid {uid}"


# install.sh's settings and the Dockerfile's build arguments of the same names (docker/install.sh header)
BUILD_ARGS = {"runtime-build": {"TORCH_VARIANT", "TORCH_INDEX_URL", "TENSORRT", "EXTRA_INDEX_URL", "PIP_EXTRA_ARGS"},
              "operator-build": {"EXTRA_INDEX_URL", "PIP_EXTRA_ARGS"}}


@pytest.mark.parametrize("stage_name", sorted(BUILD_ARGS))
def test_install_settings_are_build_arguments(stage_name):
    """A setting install.sh reads reaches it only as an ARG declared in the stage that runs it."""
    script = INSTALL.read_text()
    stage = stages()[stage_name]
    first_run = next(i for i, (ins, _) in enumerate(stage) if ins == "RUN")
    declared = {args.partition("=")[0] for ins, args in stage[:first_run] if ins == "ARG"}
    for name in BUILD_ARGS[stage_name]:
        assert re.search(rf"\$\{{{name}[:}}-]", script), f"install.sh does not read {name}"
        assert name in declared, f"Dockerfile stage {stage_name} does not declare ARG {name} before its installs"


def test_installs_go_through_install_script():
    for name, stage in stages().items():
        for instruction, args in stage:
            if instruction == "RUN":
                assert "pip" not in args, f"stage {name}: install with docker/install.sh, not pip directly: {args}"
                # `install -d` (coreutils) makes a folder; every package install is the script
                if "install" in args and not re.match(r"install -d ", args):
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


def requirements(target: str, **settings: str) -> list[Requirement]:
    env = {k: v for k, v in os.environ.items() if k not in {"TORCH_VARIANT", "TENSORRT"}}
    out = subprocess.run(["bash", str(INSTALL), "--print", target], capture_output=True, text=True, check=True,
                         env={**env, "PYTHON": sys.executable, **settings}).stdout
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


def test_runtime_variants():
    cpu = {canonicalize_name(r.name) for r in requirements("runtime", TORCH_VARIANT="cpu")}
    assert {"torch", "monai", "onnxruntime"} <= cpu
    assert not cpu & {"onnxruntime-gpu", "tensorrt-cu13"}
    gpu_without_trt = {canonicalize_name(r.name) for r in requirements("runtime", TORCH_VARIANT="cuda", TENSORRT="0")}
    assert "onnxruntime-gpu" in gpu_without_trt and "tensorrt-cu13" not in gpu_without_trt


@pytest.mark.parametrize("settings, message", [
    ({"TORCH_VARIANT": "cpu", "TENSORRT": "1"}, "TENSORRT=1 needs TORCH_VARIANT=cuda"),
    ({"TORCH_VARIANT": "rocm"}, "TORCH_VARIANT must be cuda or cpu, not 'rocm'"),
    ({"TENSORRT": "yes"}, "TENSORRT must be 0 or 1, not 'yes'"),
])
def test_bad_settings_are_refused(settings, message):
    result = subprocess.run(["bash", str(INSTALL), "--print", "runtime"], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable, **settings})
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.strip() == f"install.sh: {message}" or message in result.stderr, result.stderr


@pytest.mark.parametrize("target, variant", [("operator", "cuda"), ("runtime", "cuda"), ("runtime", "cpu")])
def test_every_requirement_is_pinned_within_pyproject_range(target, variant):
    pinned = pins()
    for req in requirements(target, TORCH_VARIANT=variant):
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
