"""infer -> DICOM SEG -> STOW-RS -> WADO-RS back from a real Orthanc: the SEG's frames, placed by their own
plane positions, give back the NIfTI mask voxel for voxel."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: orthanc, runs_support
import orthanc  # noqa: E402
from conftest import run_mmar  # noqa: E402

pytestmark = pytest.mark.pacs
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def env(work: Path, name: str = "result.json") -> dict:
    return {**orthanc.environ_with_credentials(), "MMAR_TERMINATION_LOG": str(work / name)}


def pull(server, work: Path, *query: str) -> list[dict]:
    run_mmar("pull", "--url", server.dicomweb, "--dicom-dir", str(work / "dicom"), "--output", str(work / "nifti"),
             "--datalist", str(work / "datalist.json"), *query, env=env(work))
    return json.loads((work / "datalist.json").read_text())["test"]


def push(server, work: Path, folder: Path) -> dict:
    run_mmar("push", str(work), "--url", server.dicomweb, "--input", str(folder), env=env(work, "push.json"))
    return json.loads((work / "push.json").read_text())


def fetch(server, seg_file: Path) -> pydicom.Dataset:
    """The SEG as the server gives it back (WADO-RS), not the file written locally."""
    from dicomweb_client.api import DICOMwebClient

    local = pydicom.dcmread(seg_file, stop_before_pixels=True)
    client = DICOMwebClient(server.dicomweb, session=server.session())
    return client.retrieve_instance(local.StudyInstanceUID, local.SeriesInstanceUID, local.SOPInstanceUID)


def seg_on_grid(seg: pydicom.Dataset, shape, affine) -> np.ndarray:
    """The SEG's frames back on a NIfTI grid, by each frame's own plane position and the shared orientation
    and spacing (patient LPS -> RAS -> voxel), each segment's pixels set to the segment's number."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    row_spacing, column_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    inverse = np.linalg.inv(affine)
    volume = np.zeros(shape, dtype=np.int32)
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, float)
        rows, columns = np.nonzero(frame)
        lps = (position + columns[:, None] * column_spacing * orientation[:3]
               + rows[:, None] * row_spacing * orientation[3:])
        ijk = (lps * [-1, -1, 1]) @ inverse[:3, :3].T + inverse[:3, 3]
        index = np.rint(ijk).astype(int)
        assert np.allclose(ijk, index, atol=1e-3), "a SEG pixel off the NIfTI's voxel centres"
        assert np.all((index >= 0) & (index < np.asarray(shape))), "a SEG pixel outside the NIfTI"
        index = tuple(index.T)
        assert not volume[index].any(), "two segments on one voxel"
        volume[index] = number
    return volume


def check_seg(seg: pydicom.Dataset, source_dir: Path, mask_file: Path, names: list[str]) -> np.ndarray:
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(source_dir.iterdir())]
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in sources}
    assert [s.SegmentLabel for s in seg.SegmentSequence] == names
    mask = nib.load(mask_file)
    volume = seg_on_grid(seg, mask.shape, mask.affine)
    np.testing.assert_array_equal(volume, np.asarray(mask.dataobj))
    return volume


@pytest.mark.parametrize("which", ["chest", "brain"])  # axial; oblique sagittal
def test_a_known_mask_round_trips_through_orthanc(server, loaded, tmp_path, which):
    from mmar.pacs.seg import build_segmentation, read_source_series, write_segmentation

    study = {"chest": loaded.chest_study, "brain": loaded.brain_study}[which]
    (entry,) = pull(server, tmp_path, "--study-uid", study)
    image = nib.load(tmp_path / entry["image"])
    i, j, k = np.indices(image.shape)
    mask = np.where((i < image.shape[0] // 2) & (j >= 2), 1, 0) + np.where((k == image.shape[2] - 1) & (i >= image.shape[0] // 2), 2, 0)
    mask[0, 0, 0] = 2  # a corner, so a flipped axis cannot pass
    mask_file = tmp_path / "out" / "mask.nii.gz"
    mask_file.parent.mkdir()
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), image.affine), mask_file)
    seg = build_segmentation(mask_file, read_source_series(tmp_path / entry["dicom"]), {"0": "background", "1": "organ", "2": "lesion"},
                             3, algorithm="test", version="1")
    write_segmentation(seg, tmp_path / "out" / "mask_seg.dcm")
    assert push(server, tmp_path, tmp_path / "out") == {"command": "push", "found": 1, "stored": 1, "skipped": 0,
                                                          "failed": 0, "url": server.dicomweb}
    check_seg(fetch(server, tmp_path / "out" / "mask_seg.dcm"), tmp_path / entry["dicom"], mask_file, ["organ", "lesion"])


def test_infer_dicom_seg_push_and_read_back(server, loaded, trained_seg_mmar, seg_data, tmp_path):
    datalist = tmp_path / "datalist.json"
    labels = json.loads(seg_data.read_text())["labels"]  # {"0": "background", "1": "dim", "2": "bright"}
    datalist.write_text(json.dumps({"labels": labels}))
    (entry,) = pull(server, tmp_path, "--study-uid", loaded.chest_study)
    # a copy of the trained MMAR pointed at the pulled datalist, as a job's steps see it: infer writes into its
    # eval/, and push finds the SEGs there by itself
    mmar = tmp_path / "mmar"
    shutil.copytree(trained_seg_mmar / "config", mmar / "config")
    shutil.copytree(trained_seg_mmar / "models", mmar / "models", ignore=shutil.ignore_patterns("runs", "*.png"))
    environment = json.loads((mmar / "config" / "environment.json").read_text())
    (mmar / "config" / "environment.json").write_text(json.dumps({**environment, "DATASET_JSON": str(datalist)}))
    result = run_mmar("infer", str(mmar), "--key", "test", "--dicom-seg", env=env(tmp_path, "infer.json"))
    from mmar.eval_output import PREDICTIONS_DIR

    case = mmar / "eval" / PREDICTIONS_DIR / entry["image"].replace(".nii.gz", "")
    prediction, seg_file = Path(f"{case}_seg.nii.gz"), Path(f"{case}_seg.dcm")
    assert prediction.is_file() and seg_file.is_file(), result.stdout
    report = json.loads((tmp_path / "infer.json").read_text())
    assert report["dicom_segs"] == 1 and report["num_cases"] == 1 and report["outputs"] == 1  # the NIfTI as before
    pushed = []
    for _ in range(2):  # the second time the server holds it: not stored twice
        run_mmar("push", str(mmar), "--url", server.dicomweb, env=env(tmp_path, "push.json"))
        pushed.append(json.loads((tmp_path / "push.json").read_text()))
    assert [(p["found"], p["stored"], p["skipped"], p["failed"]) for p in pushed] == [(1, 1, 0, 0), (1, 0, 1, 0)]
    seg = fetch(server, seg_file)
    check_seg(seg, tmp_path / entry["dicom"], prediction, ["dim", "bright"])
    assert seg.SeriesDescription.startswith("mmar segmentation")


def test_infer_dicom_seg_checks_the_sources_before_the_model_runs(trained_seg_mmar, seg_data, tmp_path):
    data = json.loads(seg_data.read_text())
    image = seg_data.parent / data["validation"][0]["image"]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [{"image": str(image), "dicom": "missing/series"}]}))
    out = tmp_path / "predictions"
    result = run_mmar("infer", str(trained_seg_mmar), "--key", "test", "--dicom-seg",
                      "--set", f"DATASET_JSON={datalist}", f"MMAR_EVAL_OUTPUT_PATH={out}", check=False)
    assert result.returncode == 1 and "test[0].dicom: source series folder not found" in result.stderr
    assert not out.exists()


def test_push_without_segs_is_an_error(server, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_mmar("push", str(tmp_path), "--url", server.dicomweb, "--input", str(tmp_path / "empty"),
                      env=env(tmp_path), check=False)
    assert result.returncode == 1 and "no DICOM Segmentation" in result.stderr


def test_push_with_wrong_credentials_fails_without_printing_them(server, loaded, tmp_path):
    from mmar.pacs.seg import build_segmentation, read_source_series, write_segmentation

    (entry,) = pull(server, tmp_path, "--study-uid", loaded.brain_study)
    image = nib.load(tmp_path / entry["image"])
    mask_file = tmp_path / "out" / "m.nii.gz"
    mask_file.parent.mkdir()
    nib.save(nib.Nifti1Image(np.ones(image.shape, np.uint8), image.affine), mask_file)
    write_segmentation(build_segmentation(mask_file, read_source_series(tmp_path / entry["dicom"]), None, 2,
                                          algorithm="t", version="1"), tmp_path / "out" / "m_seg.dcm")
    secret = "Not-The-Password-42"
    result = run_mmar("push", str(tmp_path), "--url", server.dicomweb, "--input", str(tmp_path / "out"), check=False,
                      env={**env(tmp_path, "push.json"), "MMAR_DICOMWEB_PASSWORD": secret})
    assert result.returncode == 1 and "authentication failed" in result.stderr
    assert secret not in result.stdout + result.stderr + (tmp_path / "push.json").read_text()
    shutil.rmtree(tmp_path / "out")


@pytest.mark.skipif(not orthanc.SHARED_DICOM.is_dir(), reason="../shared/data/dicom is not here")
def test_real_scanner_series_round_trip(server, tmp_path):
    """Real Siemens and GE MR series (../shared/data): their anonymizer removed the FrameOfReferenceUID, which
    a SEG must share, so building one is a clear error; with one added (geometry untouched) they are pulled,
    given a mask on their NIfTI, SEG, STOW, WADO-RS."""
    from mmar.errors import MMARError
    from mmar.pacs.seg import build_segmentation, read_source_series, write_segmentation
    from pydicom.uid import generate_uid

    originals = [p for vendor in ("siemens", "ge") for p in sorted((orthanc.SHARED_DICOM / vendor / "anatomical").rglob("*"))
                 if p.is_file() and not p.name.endswith((".nii.gz", ".nii", ".json"))]
    with pytest.raises(MMARError, match="has no FrameOfReferenceUID"):
        read_source_series(originals[0].parent)
    frames, files = {}, []
    for n, path in enumerate(originals):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = frames.setdefault(("study", ds.StudyInstanceUID), generate_uid())
        ds.SeriesInstanceUID = frames.setdefault(("series", ds.SeriesInstanceUID), generate_uid())
        ds.FrameOfReferenceUID = frames.setdefault(("frame", ds.SeriesInstanceUID), generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = frames.setdefault(("sop", ds.SOPInstanceUID), generate_uid())
        files.append(tmp_path / "upload" / f"{n}.dcm")
        files[-1].parent.mkdir(exist_ok=True)
        ds.save_as(files[-1])
    server.upload(files)
    studies = sorted(uid for (kind, _), uid in frames.items() if kind == "study")
    entries = pull(server, tmp_path, *[arg for uid in studies for arg in ("--study-uid", uid)])
    assert len(entries) >= 2
    out = tmp_path / "out"
    for n, entry in enumerate(entries):
        image = nib.load(tmp_path / entry["image"])
        i, j, k = np.indices(image.shape[:3])
        mask = ((i - image.shape[0] / 3) ** 2 + (j - image.shape[1] / 2) ** 2 < (image.shape[0] / 4) ** 2).astype(np.uint8)
        mask[k == 0] *= 2  # the first slice's disc is the other class: a flipped slice axis shows
        mask_file = out / f"case{n}.nii.gz"
        out.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(mask, image.affine), mask_file)
        write_segmentation(build_segmentation(mask_file, read_source_series(tmp_path / entry["dicom"]),
                                              {"1": "disc", "2": "first"}, 3, algorithm="t", version="1"),
                           out / f"case{n}_seg.dcm")
    assert push(server, tmp_path, out)["stored"] == len(entries)
    for n, entry in enumerate(entries):
        check_seg(fetch(server, out / f"case{n}_seg.dcm"), tmp_path / entry["dicom"], out / f"case{n}.nii.gz",
                  ["disc", "first"])


HOSTILE_UID = "1.2.3/../../../tmp/evil"  # no "mmar" in it: the test server's user name, redacted


def make_bad(path: Path, target: Path, **values) -> Path:
    """A copy of a DICOM file with some attributes replaced (e.g. a StudyInstanceUID that is no UID)."""
    import warnings

    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UID it is asked to write
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)
    return target


def test_push_reports_a_bad_seg_and_still_stores_the_others(server, tmp_path):
    """Issue 31, 7: a SEG whose StudyInstanceUID is a path (built from unchecked file content) came first and
    stopped the push with a traceback, so no later SEG was stored."""
    from mmar.pacs.seg import build_segmentation, read_source_series, write_segmentation
    from pydicom.uid import generate_uid

    out, studies = tmp_path / "out", []
    for n in range(2):  # two fresh series of our own: nothing of them is on the server yet
        study = generate_uid()
        server.upload(orthanc.write_ct_series(tmp_path / f"gen{n}", study_uid=study, series_uid=generate_uid(),
                                              slices=4, rows=6, cols=5, seed=10 + n))
        studies.append(study)
    for n, entry in enumerate(pull(server, tmp_path, *[a for s in studies for a in ("--study-uid", s)])):
        image = nib.load(tmp_path / entry["image"])
        mask_file = tmp_path / "masks" / f"case{n}.nii.gz"
        mask_file.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(np.ones(image.shape, np.uint8), image.affine), mask_file)
        write_segmentation(build_segmentation(mask_file, read_source_series(tmp_path / entry["dicom"]), None, 2,
                                              algorithm="t", version="1"), out / f"case{n}_seg.dcm")
    bad_sop = generate_uid()
    make_bad(out / "case0_seg.dcm", out / "a_bad_seg.dcm", StudyInstanceUID=HOSTILE_UID, SOPInstanceUID=bad_sop)
    result = run_mmar("push", str(tmp_path), "--url", server.dicomweb, "--input", str(out), check=False,
                      env=env(tmp_path, "push.json"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("error: ") == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: 1 of 3 DICOM SEG(s) not stored (2 stored, 0 already there)")
    assert f"{out / 'a_bad_seg.dcm'}: StudyInstanceUID '{HOSTILE_UID}' is not a DICOM UID" in line, line
    # the counts are the result's, not only the error line's (the operator shows `first_error` as the step's words)
    assert json.loads((tmp_path / "push.json").read_text()) == {
        "command": "push", "found": 3, "stored": 2, "skipped": 0, "failed": 1, "url": server.dicomweb,
        "first_error": line[len("error: "):]}
    assert "not stored: " in result.stdout and result.stdout.count("stored case") == 2
    assert f"pushed 3 DICOM SEG(s) to {server.dicomweb}: 2 stored, 0 already there, 1 not stored" in result.stdout
    for n in range(2):  # both good ones are on the server
        assert fetch(server, out / f"case{n}_seg.dcm").SOPClassUID == SEGMENTATION_STORAGE
    session = server.session()
    assert session.get(f"{server.dicomweb}/instances", params={"SOPInstanceUID": bad_sop}, timeout=10).json() in ([], None)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_infer_dicom_seg_checks_the_uids_inside_the_source_files(trained_seg_mmar, seg_data, tmp_path):
    """The SEG copies its StudyInstanceUID from the source files: those are checked, before the model runs."""
    from pydicom.uid import generate_uid

    folder = tmp_path / "dicom" / "series"
    files = orthanc.write_ct_series(folder, study_uid=generate_uid(), series_uid=generate_uid(), slices=3)
    make_bad(files[1], files[1], StudyInstanceUID=HOSTILE_UID)
    data = json.loads(seg_data.read_text())
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [{"image": str(seg_data.parent / data["validation"][0]["image"]),
                                              "dicom": str(folder)}]}))
    out = tmp_path / "predictions"
    result = run_mmar("infer", str(trained_seg_mmar), "--key", "test", "--dicom-seg",
                      "--set", f"DATASET_JSON={datalist}", f"MMAR_EVAL_OUTPUT_PATH={out}", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"test[0].dicom: {files[1]}: StudyInstanceUID '{HOSTILE_UID}' is not a DICOM UID" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
