"""The operator's CLI (`mmar-operator --render`) and docs/operator.md's rendered listing stay true."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from mmar_operator.__main__ import render_manifest
from mmar_operator.config import Config
from operator_helpers import ROOT

DOC = ROOT / "docs" / "operator.md"


def test_doc_listing_is_what_the_operator_renders():
    text = DOC.read_text()
    blocks = re.findall(r"<!-- render: (\S+) --step (\S+) -->\n```yaml\n(.*?)```\n<!-- end render -->", text, re.S)
    assert blocks, "docs/operator.md lost its rendered listing"
    for manifest, step, listing in blocks:
        assert listing == render_manifest(ROOT / manifest, step, Config()), f"re-run: mmar-operator --render {manifest} --step {step}"
    kinds = [d["kind"] for d in yaml.safe_load_all(blocks[0][2])]
    assert kinds == ["Service", "Job"]


def test_render_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmar_operator", "--render", str(ROOT / "examples" / "demo-job.yaml")],
                          capture_output=True, text=True, check=True)
    jobs = list(yaml.safe_load_all(proc.stdout))
    assert [(j["metadata"]["name"][:-6], j["metadata"]["labels"]["mmar.dev/step"]) for j in jobs] == [
        (f"demo-{step}", step) for step in ("convert-images", "convert-labels", "train", "validate", "infer", "export")]
    bad = subprocess.run([sys.executable, "-m", "mmar_operator", "--render", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert bad.returncode == 1 and "missing.yaml: cannot read" in bad.stderr


def test_operator_help_does_not_need_a_cluster():
    proc = subprocess.run([sys.executable, "-m", "mmar_operator", "--help"], capture_output=True, text=True, check=True)
    assert "--namespace" in proc.stdout


def test_startup_sizes_kopf_handler_threads(monkeypatch):
    import kopf
    import pytest

    from mmar_operator import handlers

    monkeypatch.setattr(handlers.STATE, "config", Config(workers=40))
    monkeypatch.setattr(handlers.STATE, "cluster", object())
    settings = kopf.OperatorSettings()
    handlers._startup(settings=settings)
    assert settings.execution.max_workers == 40 and settings.execution.executor._max_workers == 40
    monkeypatch.setenv("MMAR_OPERATOR_WORKERS", "12")
    assert Config.from_env().workers == 12
    monkeypatch.setenv("MMAR_OPERATOR_WORKERS", "0")
    with pytest.raises(ValueError, match="MMAR_OPERATOR_WORKERS must be at least 1"):
        Config.from_env()
