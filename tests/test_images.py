"""`make images` (docker/images.sh): the parts that need no container engine.

Building and running the images themselves takes minutes and a builder: CI does it with
`bash .ci/images.sh` (docs/deploy.md, "Images"), not the test suite.
"""

from __future__ import annotations

import os
import subprocess

from _tools import ROOT

IMAGES = ROOT / "docker" / "images.sh"


def test_unknown_engine_is_refused_before_building():
    result = subprocess.run(["bash", str(IMAGES)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "CONTAINER_ENGINE": "lxc"})
    assert result.returncode == 1
    assert result.stderr.strip() == "images: FAILED: CONTAINER_ENGINE must be docker or podman, not 'lxc'"


def test_make_images_passes_its_variables_on():
    result = subprocess.run(
        ["make", "-n", "images", "CONTAINER_ENGINE=podman", "PYTHON_IMAGE=localhost/base:1",
         "IMAGE_BUILD_ARGS=--build-arg TORCH_VARIANT=cpu --build-arg TENSORRT=0"],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    command = result.stdout.replace("\\\n", " ")
    for part in ('CONTAINER_ENGINE="podman"', 'PYTHON_IMAGE="localhost/base:1"',
                 'IMAGE_BUILD_ARGS="--build-arg TORCH_VARIANT=cpu --build-arg TENSORRT=0"', "bash docker/images.sh"):
        assert part in command, command
