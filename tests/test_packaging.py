"""The project's build metadata: the license as an SPDX expression (PEP 639), which setuptools reads from
version 77 on; its older TOML-table form is deprecated and refused by setuptools' builds after 2027-02-18."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_license_is_an_spdx_expression_and_the_build_asks_for_a_setuptools_that_reads_it():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert "License :: " not in " ".join(PYPROJECT["project"].get("classifiers", []))  # PEP 639: one or the other
    (setuptools,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if Requirement(r).name == "setuptools"]
    assert not setuptools.specifier.contains("76.1") and setuptools.specifier.contains("77.0.0")
    for pattern in PYPROJECT["project"].get("license-files", []):  # each one names a file that is there
        assert list(ROOT.glob(pattern)), f"license-files: {pattern} matches nothing"


@pytest.mark.skipif(Version(importlib.metadata.version("setuptools")) < Version("77"),
                    reason="the environment's setuptools is older than the build asks for")
def test_the_wheel_builds_without_a_license_deprecation_and_says_its_license(tmp_path):
    """Built as `pip wheel --no-build-isolation` builds it, from a copy (the build writes build/ beside the source)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("runtime", "operator"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-v", "-w", str(tmp_path / "wheels"), str(source)], capture_output=True, text=True)
    output = built.stdout + built.stderr
    assert built.returncode == 0, output[-4000:]
    assert "deprecated" not in output.lower(), [line for line in output.splitlines() if "deprecat" in line.lower()]
    (wheel,) = (tmp_path / "wheels").glob("mmar-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        headers = archive.read(metadata).decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: Apache-2.0" in headers
