"""`mmar pull` against a real Orthanc (DICOMweb plugin): by study UIDs, by query, resumed, with labels."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: orthanc, runs_support
import orthanc  # noqa: E402
from conftest import run_mmar  # noqa: E402

pytestmark = pytest.mark.pacs


def pull(server, work: Path, *query: str, check: bool = True, env: dict | None = None, datalist: Path | None = None):
    datalist = datalist or work / "datalist.json"
    result = run_mmar("pull", "--url", server.dicomweb, "--dicom-dir", str(work / "dicom"), "--output", str(work / "nifti"),
                      "--datalist", str(datalist), *query, check=check,
                      env={**orthanc.environ_with_credentials(), "MMAR_TERMINATION_LOG": str(work / "result.json"),
                           **(env or {})})
    report = json.loads((work / "result.json").read_text()) if (work / "result.json").is_file() else None
    return result, report


def test_pull_by_study_uid_retrieves_converts_and_lists(server, loaded, tmp_path):
    result, report = pull(server, tmp_path, "--study-uid", loaded.chest_study)
    assert "not an image series" in result.stdout and loaded.chest_sr_series in result.stdout  # the SR is skipped
    series_dir = tmp_path / "dicom" / loaded.chest_study / loaded.chest_series
    sources = [pydicom.dcmread(p) for p in loaded.files[loaded.chest_series]]
    assert sorted(p.name for p in series_dir.iterdir()) == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in sources)
    assert not (tmp_path / "dicom" / loaded.chest_study / loaded.chest_sr_series).exists()
    data = json.loads((tmp_path / "datalist.json").read_text())
    assert data["test"] == [{"image": f"nifti/{loaded.chest_study}/{loaded.chest_series}.nii.gz",
                             "dicom": f"dicom/{loaded.chest_study}/{loaded.chest_series}",
                             "StudyInstanceUID": loaded.chest_study, "SeriesInstanceUID": loaded.chest_series}]
    image = nib.load(tmp_path / data["test"][0]["image"])
    assert sorted(image.shape) == sorted((6, 12, 10))
    # the voxel values are the retrieved pixels (HU = stored - 1024), whatever the converter's voxel order
    stored = np.stack([ds.pixel_array for ds in sources]).astype(float) - 1024
    assert np.isclose(np.sort(np.asarray(image.dataobj, float).ravel()), np.sort(stored.ravel())).all()
    assert report == {"command": "pull", "series": 1, "skipped_series": 1, "retrieved": 6, "present": 0, "cases": 1,
                      "datalist": str(tmp_path / "datalist.json"), "key": "test"}


@pytest.mark.parametrize("query, expected", [
    (["--modality", "MR"], "brain"),
    (["--study-date", "20240101-20240131"], "chest"),
    (["--study-date", "20240301"], "brain"),
    (["--accession", "ACC2"], "brain"),
    (["--series-description", "CHEST*"], "chest"),
    (["--modality", "CT", "--series-description", "*axial"], "chest"),
])
def test_pull_by_query(server, loaded, tmp_path, query, expected):
    _, report = pull(server, tmp_path, *query)
    series = {"chest": loaded.chest_series, "brain": loaded.brain_series}[expected]
    entries = json.loads((tmp_path / "datalist.json").read_text())["test"]
    assert [e["SeriesInstanceUID"] for e in entries] == [series]
    assert report["cases"] == 1


def test_pull_keeps_the_other_lists_and_writes_the_key_asked(server, loaded, tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"labels": {"0": "background", "1": "organ"}, "training": [{"image": "a", "label": "b"}],
                                    "test": [{"image": "old.nii.gz"}]}))
    pull(server, tmp_path, "--modality", "MR", "--key", "holdout")
    data = json.loads(datalist.read_text())
    assert data["labels"] == {"0": "background", "1": "organ"} and data["training"] == [{"image": "a", "label": "b"}]
    assert data["test"] == [{"image": "old.nii.gz"}]
    assert [e["SeriesInstanceUID"] for e in data["holdout"]] == [loaded.brain_series]


def test_an_interrupted_pull_resumes_by_sop_instance_uid(server, loaded, tmp_path):
    _, first = pull(server, tmp_path, "--study-uid", loaded.brain_study)
    series_dir = tmp_path / "dicom" / loaded.brain_study / loaded.brain_series
    nifti = tmp_path / "nifti" / loaded.brain_study / f"{loaded.brain_series}.nii.gz"
    reference = np.asarray(nib.load(nifti).dataobj)
    # an unchanged series: nothing retrieved, nothing converted again
    mtime = nifti.stat().st_mtime_ns
    _, again = pull(server, tmp_path, "--study-uid", loaded.brain_study)
    assert (again["retrieved"], again["present"]) == (0, 5) and nifti.stat().st_mtime_ns == mtime
    # as a pull killed half-way leaves it: some instances, a temp file of the dead writer, no volume, no datalist
    files = sorted(series_dir.iterdir())
    for path in files[:3]:
        path.unlink()
    stale = series_dir / f".{files[0].name}.999999999.abc.tmp.dcm"
    stale.write_bytes(b"half an instance")
    nifti.unlink()
    (tmp_path / "datalist.json").unlink()
    result, resumed = pull(server, tmp_path, "--study-uid", loaded.brain_study)
    assert (first["retrieved"], resumed["retrieved"], resumed["present"]) == (5, 3, 2)
    assert not stale.exists() and "temp file of a pull" in result.stdout
    assert sorted(series_dir.iterdir()) == files
    np.testing.assert_array_equal(np.asarray(nib.load(nifti).dataobj), reference)
    assert json.loads((tmp_path / "datalist.json").read_text())["test"][0]["SeriesInstanceUID"] == loaded.brain_series


def test_a_pull_killed_while_converting_leaves_no_stale_volume(server, tmp_path):
    """Issue 31, 4: 100 slices pulled; 100 more uploaded; the pull that retrieves them is SIGKILLed while it
    converts; the next pull retrieves nothing, but must not keep (and list) the volume of 100 slices."""
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    files = orthanc.write_ct_series(tmp_path / "generated", study_uid=study, series_uid=series, slices=200, rows=8,
                                    cols=8, thickness=1.0)
    by_position = sorted(files, key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))
    server.upload(by_position[:100])  # the first half of the stack
    _, first = pull(server, tmp_path, "--study-uid", study)
    nifti = tmp_path / "nifti" / study / f"{series}.nii.gz"
    assert first["retrieved"] == 100 and np.prod(nib.load(nifti).shape) == 100 * 8 * 8
    server.upload(by_position[100:])
    env = {**orthanc.environ_with_credentials(), "MMAR_TERMINATION_LOG": str(tmp_path / "killed.json")}
    killed = subprocess.Popen([sys.executable, "-m", "mmar", "pull", "--url", server.dicomweb, "--dicom-dir",
                               str(tmp_path / "dicom"), "--output", str(tmp_path / "nifti"), "--datalist",
                               str(tmp_path / "datalist.json"), "--study-uid", study], env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while killed.poll() is None and time.monotonic() < deadline:
        if list((tmp_path / "nifti" / study).glob(f".{series}.pull-*")):  # converting: the staging folder
            os.kill(killed.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    output = killed.communicate(timeout=60)[0]
    assert killed.returncode == -signal.SIGKILL, f"the pull was not killed while converting:\n{output}"
    assert len(list((tmp_path / "dicom" / study / series).glob("*.dcm"))) == 200  # all retrieved before
    assert np.prod(nib.load(nifti).shape) == 100 * 8 * 8  # the old volume, as the kill left it
    result, third = pull(server, tmp_path, "--study-uid", study)
    assert (third["retrieved"], third["present"]) == (0, 200)
    # the killed pull removed the record before it began to replace the volume: no record, no trust
    assert f"converting series {series} again: no record of the instances it was made from" in result.stdout
    assert np.prod(nib.load(nifti).shape) == 200 * 8 * 8
    assert json.loads((tmp_path / "datalist.json").read_text())["test"][0]["image"] == f"nifti/{study}/{series}.nii.gz"
    manifest = json.loads((tmp_path / "nifti" / study / f".{series}.pull.json").read_text())
    assert len(manifest["instances"]) == 200 and manifest["volumes"] == [nifti.name]
    # and then it is trusted again: a fourth pull converts nothing
    mtime = nifti.stat().st_mtime_ns
    result, _ = pull(server, tmp_path, "--study-uid", study)
    assert nifti.stat().st_mtime_ns == mtime and "again" not in result.stdout


def test_pull_with_labels_matches_them_by_series_uid(server, loaded, tmp_path):
    labels = tmp_path / "labels"
    (labels / loaded.chest_study).mkdir(parents=True)
    (labels / loaded.chest_study / f"{loaded.chest_series}.nii.gz").write_bytes(b"")  # matched by name only
    result, _ = pull(server, tmp_path, "--study-uid", loaded.chest_study, "--study-uid", loaded.brain_study,
                     "--labels", str(labels), "--key", "training")
    entries = {e["SeriesInstanceUID"]: e for e in json.loads((tmp_path / "datalist.json").read_text())["training"]}
    assert entries[loaded.chest_series]["label"] == f"labels/{loaded.chest_study}/{loaded.chest_series}.nii.gz"
    assert "label" not in entries[loaded.brain_series]
    assert f"no label in {labels} for {loaded.brain_series}.nii.gz" in result.stdout


@pytest.mark.skipif(not orthanc.SHARED_DICOM.is_dir(), reason="../shared/data/dicom is not here")
def test_pull_real_scanner_series(server, tmp_path):
    """Real MR series (Siemens, GE, generic) from ../shared/data, stored and pulled back by study UID."""
    files = [p for vendor in ("siemens", "ge", "generic") for p in sorted((orthanc.SHARED_DICOM / vendor / "anatomical").rglob("*"))
             if p.is_file() and not p.name.endswith((".nii.gz", ".nii", ".json"))]
    headers = {}
    for path in files:
        try:
            headers[path] = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM
            continue
    server.upload(headers)
    studies = sorted({ds.StudyInstanceUID for ds in headers.values()})
    _, report = pull(server, tmp_path, *[arg for uid in studies for arg in ("--study-uid", uid)])
    entries = json.loads((tmp_path / "datalist.json").read_text())["test"]
    assert report["cases"] == len(entries) >= len(studies)
    for entry in entries:
        slices = {ds.SOPInstanceUID: ds for ds in headers.values() if ds.SeriesInstanceUID == entry["SeriesInstanceUID"]}
        retrieved = sorted((tmp_path / entry["dicom"]).iterdir())
        assert sorted(p.name for p in retrieved) == sorted(f"{uid}.dcm" for uid in slices)
        image = nib.load(tmp_path / entry["image"])
        assert np.prod(image.shape[:3]) == sum(int(ds.Rows) * int(ds.Columns) for ds in slices.values())


def test_pull_needs_a_query(tmp_path):
    result = run_mmar("pull", "--url", "http://127.0.0.1:9/dicom-web", "--dicom-dir", str(tmp_path / "d"),
                      "--output", str(tmp_path / "o"), "--datalist", str(tmp_path / "dl.json"), check=False)
    assert result.returncode == 1 and "no query" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("arg, message", [(["--study-uid", "1.2.x"], "is not a DICOM UID"),
                                          (["--study-date", "2024-01-01"], "expected YYYYMMDD")])
def test_pull_rejects_bad_query_values(tmp_path, arg, message):
    result = run_mmar("pull", "--url", "http://127.0.0.1:9/dicom-web", "--dicom-dir", str(tmp_path / "d"),
                      "--output", str(tmp_path / "o"), "--datalist", str(tmp_path / "dl.json"), *arg, check=False)
    assert result.returncode == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
