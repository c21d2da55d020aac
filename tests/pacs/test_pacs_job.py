"""The PACS loop as a user runs it: one MMARJob manifest (pull -> infer with DICOM SEG -> gated push) through
`mmar run` against a real Orthanc, with the MMAR's own earlier validation deciding the gate."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: orthanc, runs_support
import orthanc  # noqa: E402
from conftest import run_mmar  # noqa: E402

pytestmark = pytest.mark.pacs


@pytest.fixture(scope="module")
def validated_mmar(trained_seg_mmar, tmp_path_factory) -> tuple[Path, float]:
    """The session's trained MMAR, copied, with its own validation (eval/metrics.json): (root, val_mean_dice)."""
    root = tmp_path_factory.mktemp("pacs-job") / "mmar"
    shutil.copytree(trained_seg_mmar, root)
    run_mmar("validate", str(root))
    return root, json.loads((root / "eval" / "metrics.json").read_text())["val_mean_dice"]


def segs_on_server(server, study: str) -> int:
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(server.dicomweb, session=server.session())
    return len(client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "SEG"}))


def run_job(server, study: str, mmar: Path, data: Path, tmp_path: Path, at_least: float) -> dict:
    job = {
        "apiVersion": "mmar.dev/v1alpha1", "kind": "MMARJob", "metadata": {"name": "pacs-loop"},
        "spec": {
            "mmar": {"claimName": "ws", "path": mmar.name}, "data": {"claimName": "pacs"}, "gpusPerNode": 0,
            "steps": [
                {"type": "pull", "dicomweb": {"url": server.dicomweb, "credentialsSecret": "pacs"},
                 "query": {"studyInstanceUIDs": [str(study)]}, "output": "images"},
                {"type": "infer", "key": "test", "dicomSeg": True},
                {"type": "push", "dicomweb": {"url": server.dicomweb, "credentialsSecret": "pacs"},
                 "gate": {"metric": "val_mean_dice", "atLeast": at_least}},
            ],
        },
    }
    manifest = tmp_path / "pacs-job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    # locally the Secret's keys come from the environment, as the operator's secretKeyRef puts them in the pod
    run = run_mmar("run", str(manifest), "--volume", f"ws={mmar.parent}", "--volume", f"pacs={data}",
                   env=orthanc.environ_with_credentials())
    assert orthanc.PASSWORD not in run.stdout + run.stderr
    return json.loads((mmar.parent / "pacs-loop.status.json").read_text())


def test_pull_infer_and_a_gated_push_round_trip(server, loaded, validated_mmar, seg_data, tmp_path):
    mmar, dice = validated_mmar
    data = tmp_path / "data"
    data.mkdir()
    # the label names the SEG's segments get: the datalist's, as the MMAR was trained with
    (data / "datalist.json").write_text(json.dumps({"labels": json.loads(seg_data.read_text())["labels"]}))
    before = segs_on_server(server, loaded.brain_study)

    # below the bar: pulled and inferred, nothing sent
    blocked = run_job(server, loaded.brain_study, mmar, data, tmp_path, at_least=min(dice + 0.01, 1.0) if dice < 1 else 1.01)
    assert [s["phase"] for s in blocked["steps"]] == ["Succeeded", "Succeeded", "Skipped"], blocked
    assert blocked["phase"] == "Succeeded" and blocked["reason"] == "GateNotMet"
    assert blocked["results"]["gate"]["passed"] is False and "val_mean_dice" in blocked["steps"][2]["message"]
    assert blocked["steps"][1]["result"]["dicom_segs"] == 1
    assert segs_on_server(server, loaded.brain_study) == before

    # at the bar: the same job stores the SEG; the pull resumes (every instance already on the claim)
    passed = run_job(server, loaded.brain_study, mmar, data, tmp_path, at_least=dice)
    assert [s["phase"] for s in passed["steps"]] == ["Succeeded"] * 3, passed
    assert passed["steps"][0]["result"]["retrieved"] == 0 and passed["steps"][0]["result"]["present"] > 0
    assert (passed["steps"][2]["result"]["found"], passed["steps"][2]["result"]["stored"]) == (1, 1)
    assert passed["results"]["gate"]["passed"] is True
    assert segs_on_server(server, loaded.brain_study) == before + 1
