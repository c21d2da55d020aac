"""Shared fixtures: tiny generated data and MMARs (CPU, seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A command whose result does not match mmar/results.py fails under test (a warning in users' runs);
# set here so that every CLI subprocess the tests start inherits it.
os.environ.setdefault("MMAR_STRICT_RESULTS", "1")

# A small network and few epochs: the workflow is under test, not the model.
SMALL_SEGMENTATION = [
    "network#channels=[8,16,32]",
    "network#strides=[2,2]",
    "network#num_res_units=1",
    "spatial_size=[16,16,16]",
    "train#batch_size=2",
    "train#samples_per_volume=1",
    "validate#inferer#sw_batch_size=2",
]

# The classification workflow is under test, not DenseNet121: the default's DenseNet, narrow, one layer a block.
SMALL_CLASSIFICATION = [
    "network#init_features=8",
    "network#growth_rate=8",
    "network#block_config=[1,1,1,1]",
    "train#batch_size=8",
]


def run_mmar(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (exit codes and messages are part of the contract)."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run([sys.executable, "-m", "mmar", *args], capture_output=True, text=True, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"mmar {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def seg_data(tmp_path_factory) -> Path:
    from mmar.synthetic import write_segmentation_dataset

    out = tmp_path_factory.mktemp("segdata")
    return write_segmentation_dataset(out, cases=6, size=16, seed=1)


def make_seg_mmar(root: Path, datalist: Path, epochs: int = 2) -> Path:
    from mmar.scaffold import init

    init(root, task="segmentation", datalist=datalist, epochs=epochs, log=lambda *_: None)
    # bake the small network into the config, as a user would edit it
    from mmar.archive import load_archive

    archive = load_archive(root, SMALL_SEGMENTATION)
    path = root / "config" / "config_train.json"
    path.write_text(json.dumps(archive.config, indent=2))
    validation = json.loads((root / "config" / "config_validation.json").read_text())
    validation["validate"]["inferer"]["sw_batch_size"] = 2
    (root / "config" / "config_validation.json").write_text(json.dumps(validation, indent=2))
    return root


@pytest.fixture
def seg_mmar(tmp_path, seg_data) -> Path:
    return make_seg_mmar(tmp_path / "mmar", seg_data)


@pytest.fixture(scope="session")
def trained_seg_mmar(tmp_path_factory, seg_data) -> Path:
    """An MMAR trained once for the session (validate / infer / export tests read it, never change it)."""
    root = make_seg_mmar(tmp_path_factory.mktemp("trained") / "mmar", seg_data, epochs=2)
    run_mmar("train", str(root))
    return root


@pytest.fixture
def trained_seg_copy(trained_seg_mmar, tmp_path) -> Path:
    """A copy of the session's trained MMAR without eval/, for a test that validates or infers into it."""
    import shutil

    root = tmp_path / "mmar"
    shutil.copytree(trained_seg_mmar, root)
    shutil.rmtree(root / "eval", ignore_errors=True)
    return root


# ---- a real PACS (Orthanc + DICOMweb), for the `pacs` tests: one for the session (tests/orthanc.py) ----


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """Orthanc started on 127.0.0.1 (skips without it, fails with MMAR_PACS_REQUIRED=1)."""
    import orthanc

    return orthanc.shared(lambda: tmp_path_factory.mktemp("orthanc"))


@pytest.fixture(scope="session")
def loaded(server, tmp_path_factory):
    """The series the pacs tests generate, stored on `server`."""
    import orthanc

    return orthanc.load_standard(server, tmp_path_factory.mktemp("generated"))
