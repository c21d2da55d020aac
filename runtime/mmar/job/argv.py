"""One step of a parsed MMARJob -> the runtime's argv, with paths as the pod sees them.

The operator puts that argv into a pod; `mmar run JOB.yaml` runs it in a subprocess: one function, two
callers, so a step means the same thing on a cluster and on a laptop. Inside a pod the MMAR claim is mounted
at WORKSPACE_ROOT and the data claim at DATA_ROOT; every path in a step's argv is under one of the two, so
`mmar run` maps each claim to a local folder by swapping prefixes. Credentials never enter an argv: a step's
`dicomweb.credentialsSecret` becomes environment variables (CREDENTIAL_ENV) in the pod.
"""

from __future__ import annotations

import copy
from pathlib import PurePosixPath
from typing import Any, Mapping

from mmar.job.gate import gate_text
from mmar.job.spec import CPU_TYPES, MMAR_TYPES, TRAINING_TYPES, steps_of, value_text

WORKSPACE_ROOT = "/workspace"  # the MMAR claim, mounted whole
DATA_ROOT = "/data"  # the data claim, mounted whole
MASTER_PORT = 29500  # torchrun's static rendezvous port (the PyTorch default)
DEFAULT_DICOM_OUTPUT = "dicom"  # where a pull step keeps the retrieved DICOM files (under the data path)
# The Secret a dicomweb.credentialsSecret names: its keys -> the environment variables the runtime reads
# (HTTP basic with username + password, or a bearer token). Never in argv, spec, status, events or logs.
CREDENTIAL_ENV = {"username": "MMAR_DICOMWEB_USERNAME", "password": "MMAR_DICOMWEB_PASSWORD",
                  "token": "MMAR_DICOMWEB_TOKEN"}


def mmar_dir(job: Mapping[str, Any]) -> str:
    """The MMAR folder as the pod sees it."""
    return _join(WORKSPACE_ROOT, job["spec"]["mmar"]["path"])


def data_dir(job: Mapping[str, Any]) -> str:
    """The data root (datalist paths and convert folders are relative to it) as the pod sees it."""
    return _join(DATA_ROOT, job["spec"]["data"]["path"])


def datalist_path(job: Mapping[str, Any]) -> str:
    return _join(data_dir(job), job["spec"]["data"]["datalist"])


def gpus_of(job: Mapping[str, Any], index: int) -> int:
    """GPUs per node for a step: its own value, else the job's; pull, convert and push never ask for a GPU by
    default (they move and convert files)."""
    step = steps_of(job)[index]
    if "gpusPerNode" in step:
        return step["gpusPerNode"]
    return 0 if step["type"] in CPU_TYPES else job["spec"]["gpusPerNode"]


def resources_of(job: Mapping[str, Any], index: int) -> dict[str, Any]:
    step = steps_of(job)[index]
    return copy.deepcopy(step.get("resources", job["spec"].get("resources", {})))


def uses_mmar(step: Mapping[str, Any]) -> bool:
    return step["type"] in MMAR_TYPES


def _join(root: str, relative: str) -> str:
    return str(PurePosixPath(root) / relative) if relative else root


# ------------------------------------------------------------------------------------------------ argv


def init_argv(job: Mapping[str, Any], index: int) -> list[str] | None:
    """`mmar init ... --exist-ok` to run before step `index`, or None.

    Only when `spec.task` asks for scaffolding, and only before the first step that uses the MMAR: an
    existing MMAR is left untouched, so re-running a job never overwrites a tuned config.
    """
    task = job["spec"].get("task")
    steps = steps_of(job)
    first = next((i for i, s in enumerate(steps) if uses_mmar(s)), None)
    if task is None or first != index:
        return None
    return ["mmar", "init", mmar_dir(job), "--task", task, "--datalist", datalist_path(job), "--exist-ok"]


def step_argv(job: Mapping[str, Any], index: int) -> list[str]:
    """The runtime argv of step `index` (paths as the pod sees them).

    Training on several GPUs or nodes is wrapped in torchrun; on several nodes the node rank and master
    address are Kubernetes `$(VAR)` references to the PET_* variables the operator sets in each pod (the
    convention of Kubeflow's PyTorchJob/TrainJob), expanded by the kubelet.
    """
    argv = _step_argv(job, index)
    gate = steps_of(job)[index].get("gate")
    if gate:  # a global option of the runtime CLI, before the command: `mmar --gate METRIC>=X infer ...`
        argv = [argv[0], "--gate", gate_text(gate), *argv[1:]]
    return argv


def _step_argv(job: Mapping[str, Any], index: int) -> list[str]:
    step = steps_of(job)[index]
    kind = step["type"]
    root = mmar_dir(job)
    if kind == "pull":
        data = data_dir(job)
        argv = ["mmar", "pull", "--url", step["dicomweb"]["url"],
                "--dicom-dir", _join(data, step.get("dicomOutput", DEFAULT_DICOM_OUTPUT)),
                "--output", _join(data, step["output"]), "--datalist", datalist_path(job)]
        if "key" in step:
            argv += ["--key", step["key"]]
        if "labelsFrom" in step:
            argv += ["--labels", _join(data, step["labelsFrom"])]
        query = step["query"]
        for uid in query.get("studyInstanceUIDs", []):
            argv += ["--study-uid", uid]
        for key, flag in (("modality", "--modality"), ("studyDate", "--study-date"), ("accessionNumber", "--accession"),
                          ("seriesDescription", "--series-description")):
            if key in query:
                argv += [flag, query[key]]
        return argv
    if kind == "push":
        return ["mmar", "push", root, "--url", step["dicomweb"]["url"]]
    if kind == "convert":
        argv = ["mmar", "convert", "-d", _join(data_dir(job), step["input"]), "-o", _join(data_dir(job), step["output"])]
        if "resolution" in step:
            argv += ["-r", *(value_text(r) for r in step["resolution"])]
        if "inputExt" in step:
            argv += ["-s", step["inputExt"]]
        if "outputExt" in step:
            argv += ["-e", step["outputExt"]]
        if step.get("force"):
            argv.append("-f")
        if step.get("labels"):
            argv.append("-l")
        return argv
    if kind == "export":
        argv = ["mmar", "export", root]
        if "ckpt" in step:
            argv += ["--ckpt", _join(root, step["ckpt"])]
        if "formats" in step:
            argv += ["--formats", ",".join(step["formats"])]
        if "precision" in step:
            argv += ["--precision", step["precision"]]
        if "inputShape" in step:
            argv += ["--input-shape", ",".join(str(s) for s in step["inputShape"])]
        return argv

    command = "train" if kind in TRAINING_TYPES else kind
    argv = [command, root]
    if kind == "finetune":
        argv.append("--finetune")
    if "ckpt" in step:
        argv += ["--ckpt", _join(root, step["ckpt"])]
    if "model" in step:
        argv += ["--model", step["model"]]
    if "key" in step:
        argv += ["--key", step["key"]]
    if step.get("dicomSeg"):
        argv.append("--dicom-seg")
    # The manifest says where the data is, whatever the MMAR's environment.json was scaffolded with;
    # the step's own overrides come after so they win.
    overrides = {"DATASET_JSON": datalist_path(job), **step.get("set", {})}
    argv += ["--set", *(f"{k}={value_text(v)}" for k, v in overrides.items())]
    argv += ["--file_root", data_dir(job)]

    nodes, gpus = step["nodes"], gpus_of(job, index)
    if kind in TRAINING_TYPES and nodes > 1:
        return ["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={max(gpus, 1)}",
                "--node_rank=$(PET_NODE_RANK)", "--master_addr=$(PET_MASTER_ADDR)",
                "--master_port=$(PET_MASTER_PORT)", "-m", "mmar", *argv]
    if kind in TRAINING_TYPES and gpus > 1:
        return ["torchrun", "--standalone", "--nnodes=1", f"--nproc_per_node={gpus}", "-m", "mmar", *argv]
    return ["mmar", *argv]


def credentials_secret(job: Mapping[str, Any], index: int) -> str | None:
    """The Secret whose keys (CREDENTIAL_ENV) become the step's DICOMweb credentials, or None."""
    return (steps_of(job)[index].get("dicomweb") or {}).get("credentialsSecret")
