"""bench/slim_python.py: a Python that sees only the runtime image's packages (start-up timing on GPU machines)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("slim_python", ROOT / "bench" / "slim_python.py")
slim_python = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(slim_python)


def test_the_runtime_requirement_closure_keeps_the_image_and_hides_test_tools():
    kept, missing = slim_python.requirement_closure(slim_python.runtime_requirements())
    for name in ("torch", "monai", "pytorch-ignite", "nibabel", "tensorboard", "numpy", "pyyaml"):
        assert name in kept, name
    assert "mmar" in kept  # the project itself (installed editable here)
    assert "onnxruntime" in kept  # the stand-in for the image's onnxruntime-gpu
    hidden = slim_python.hidden_modules(kept)
    assert "pytest" in hidden and "kopf" in hidden  # test and operator dependencies, not in the runtime image
    assert not {"torch", "monai", "nibabel", "numpy", "yaml", "mmar", "os", "json"} & set(hidden)
    assert "tensorrt-cu13" in missing and "mmar" not in missing


def test_a_hidden_module_is_not_installed_for_the_import_system_and_monai_still_loads(tmp_path):
    slim_python.write_sitecustomize(tmp_path, ["nibabel"])
    probe = (
        "import importlib.util, pkgutil, sys\n"
        "assert importlib.util.find_spec('nibabel') is None\n"
        "try:\n    import nibabel\nexcept ModuleNotFoundError: pass\nelse: raise SystemExit('nibabel imported')\n"
        "assert 'nibabel' not in {m.name for m in pkgutil.iter_modules()}\n"
        "import monai\n"
        "assert 'monai.transforms' in sys.modules and 'nibabel' not in sys.modules\n"
        "print('slim ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT / "runtime")]))
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "slim ok" in result.stdout
