"""mmar.job is the contract the operator image installs without the runtime: no module of the package may
import torch, monai or numpy, at import or while it parses, defaults, validates and renders a manifest."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import mmar.job

HEAVY = ("torch", "monai", "numpy")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "demo-job.yaml"


def test_the_job_package_imports_nothing_heavy():
    # the contract, and the results it reads (the operator imports both)
    modules = ["mmar.job", *(f"mmar.job.{m.name}" for m in pkgutil.iter_modules(mmar.job.__path__)), "mmar.results"]
    code = f"""
import importlib, json, sys
for name in {modules!r}:
    importlib.import_module(name)
light = [m for m in {HEAVY!r} + ("kubernetes", "kopf", "yaml", "jsonschema") if m in sys.modules]
from mmar import job
parsed = job.parse({str(EXAMPLE)!r})
argvs = [job.step_argv(parsed, i) for i in range(len(parsed["spec"]["steps"]))]
job.gate_decision({{"metric": "m", "atLeast": 0.5}}, {{"m": 0.7}})
job.job_outcome([{{"name": "a", "phase": "Succeeded"}}])
print(json.dumps({{"at_import": light, "after_use": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {"at_import": [], "after_use": []}
    assert len(modules) >= 6  # __init__, argv, gate, outcome, spec; results
