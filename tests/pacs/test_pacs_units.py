"""The PACS code without a server: URL and credential checks, the retry budget, redaction, and the SEG
geometry (the voxel order of the NIfTI must not matter, only its affine)."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: orthanc, runs_support
import orthanc  # noqa: E402
from mmar.pacs import client as pc  # noqa: E402


def test_clean_url():
    assert pc.clean_url("https://pacs.example:8443/dicom-web/") == "https://pacs.example:8443/dicom-web"
    with pytest.raises(pc.PacsError, match="credentials in the URL") as caught:
        pc.clean_url("https://alice:Secret-Pw@pacs.example/dicom-web")
    assert "Secret-Pw" not in str(caught.value) and "alice" not in str(caught.value)
    for bad in ("ftp://pacs/dicom-web", "pacs.example/dicom-web", "https:///x"):
        with pytest.raises(pc.PacsError, match="not an http"):
            pc.clean_url(bad)


@pytest.mark.parametrize("env, kind", [({}, "none"), ({"MMAR_DICOMWEB_TOKEN": "t"}, "bearer token"),
                                       ({"MMAR_DICOMWEB_USERNAME": "u", "MMAR_DICOMWEB_PASSWORD": "p"}, "basic")])
def test_credentials_from_env(env, kind):
    assert pc.credentials_from_env(env).kind == kind


@pytest.mark.parametrize("env, message", [
    ({"MMAR_DICOMWEB_TOKEN": "t", "MMAR_DICOMWEB_USERNAME": "u", "MMAR_DICOMWEB_PASSWORD": "p"}, "not both"),
    ({"MMAR_DICOMWEB_PASSWORD": "Hidden-Pw"}, "MMAR_DICOMWEB_USERNAME is not set"),
])
def test_bad_credential_settings(env, message):
    with pytest.raises(pc.PacsError, match=message) as caught:
        pc.credentials_from_env(env)
    assert "Hidden-Pw" not in str(caught.value)


def http_error(status: int, reason: str = "") -> requests.HTTPError:
    response = requests.Response()
    response.status_code, response.reason = status, reason
    return requests.HTTPError(f"{status} for url: http://x/?token=Tok-Secret-123", response=response)


def connection(retries=3, backoff=0.5, **credentials):
    waits = []
    conn = pc.Connection("http://pacs/dicom-web", client=None, credentials=pc.Credentials(**credentials),
                         retry=pc.Retry(retries, backoff), sleep=waits.append)
    return conn, waits


def test_a_5xx_is_retried_with_exponential_back_off_then_fails():
    conn, waits = connection()
    calls = []

    def unavailable():
        calls.append(1)
        raise http_error(503, "Service Unavailable")

    with pytest.raises(pc.PacsError, match=r"http://pacs/dicom-web: search failed after 4 attempts .*HTTP 503 Service Unavailable"):
        conn.call("search", unavailable)
    assert len(calls) == 4 and waits == [0.5, 1.0, 2.0]


def test_a_retry_that_succeeds_returns_the_answer():
    conn, waits = connection()
    answers = iter([requests.ConnectionError("[Errno 111] Connection refused"), "ok"])

    def flaky():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert conn.call("search", flaky) == "ok" and waits == [0.5]


@pytest.mark.parametrize("status, error", [(401, "authentication failed"), (403, "authentication failed"),
                                           (404, "not found"), (400, "HTTP 400")])
def test_client_errors_are_not_retried(status, error):
    conn, waits = connection(token="Tok-Secret-123")

    def refused():
        raise http_error(status)

    with pytest.raises(pc.PacsError, match=error) as caught:
        conn.call("search", refused)
    assert waits == [] and "Tok-Secret-123" not in str(caught.value)


def test_redact_removes_every_credential_value():
    conn, _ = connection(username="alice", password="Pw-Value-9")
    assert conn.redact("user alice sent Pw-Value-9 twice: Pw-Value-9") == "user *** sent *** twice: ***"


def test_retry_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("MMAR_DICOMWEB_RETRIES", "2")
    monkeypatch.setenv("MMAR_DICOMWEB_BACKOFF", "0.25")
    assert pc.Retry.from_env().waits() == [0.25, 0.5]
    monkeypatch.setenv("MMAR_DICOMWEB_RETRIES", "many")
    with pytest.raises(pc.PacsError, match="MMAR_DICOMWEB_RETRIES='many': expected a whole number"):
        pc.Retry.from_env()


@pytest.fixture
def series_and_volume(tmp_path):
    """An oblique generated series and its NIfTI made by the project's converter."""
    from mmar.convert.cli import main as convert

    from pydicom.uid import generate_uid

    folder = tmp_path / "series"
    orthanc.write_ct_series(folder, study_uid=generate_uid(), series_uid=generate_uid(), slices=5, rows=7, cols=9,
                            orientation=(0.9950042, 0.0998334, 0.0, -0.0998334, 0.9950042, 0.0))
    assert convert(["-d", str(folder), "-o", str(tmp_path / "nifti"), "-q"]) == 0
    (volume,) = (tmp_path / "nifti").glob("*.nii.gz")
    return folder, volume


def test_seg_geometry_does_not_depend_on_the_voxel_order(series_and_volume, tmp_path):
    """The same mask stored in two voxel orders (the converter's, and reoriented to another axis code with
    its affine to match) gives the same labels on every source pixel."""
    from mmar.pacs.seg import place_on_source, read_source_series

    folder, volume = series_and_volume
    image = nib.load(volume)
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 3, size=image.shape).astype(np.uint8)
    original = nib.Nifti1Image(mask, image.affine)
    target = "".join(reversed(nib.aff2axcodes(image.affine)))  # every axis moved, reversed in direction too
    flipped = original.as_reoriented(nib.orientations.ornt_transform(
        nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(target)))
    assert not np.array_equal(np.asarray(flipped.dataobj).shape, mask.shape) or not np.array_equal(np.asarray(flipped.dataobj), mask)
    sources = read_source_series(folder)
    a = place_on_source(mask, original.affine, sources)
    b = place_on_source(np.asarray(flipped.dataobj), flipped.affine, sources)
    assert a.exact and b.exact
    np.testing.assert_array_equal(a.labels, b.labels)
    # and every voxel of the mask is on exactly one source pixel
    assert sorted(a.labels.ravel().tolist()) == sorted(mask.ravel().tolist())


def test_seg_of_a_mask_on_another_grid_is_resampled_with_a_warning(series_and_volume):
    from mmar.pacs.seg import build_segmentation, read_source_series

    folder, volume = series_and_volume
    image = nib.load(volume)
    shifted = image.affine.copy()
    shifted[:3, 3] += 0.3 * image.affine[:3, 0]  # a third of a voxel off
    mask_file = volume.with_name("shifted_seg.nii.gz")
    nib.save(nib.Nifti1Image(np.ones(image.shape, np.uint8), shifted), mask_file)
    lines = []
    seg = build_segmentation(mask_file, read_source_series(folder), {"1": "organ"}, 2, algorithm="t", version="1",
                             log=lines.append)
    assert any("nearest-neighbour resampled" in line for line in lines)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["organ"]


def test_seg_refuses_a_non_label_volume(series_and_volume):
    from mmar.errors import MMARError
    from mmar.pacs.seg import build_segmentation, read_source_series

    folder, volume = series_and_volume
    with pytest.raises(MMARError, match="not a label volume"):
        build_segmentation(volume, read_source_series(folder), None, 2, algorithm="t", version="1")  # the CT itself


@pytest.mark.parametrize("datalist, config, expected", [
    ({"labels": {"0": "background", "1": "liver"}}, {"label_names": ["bg", "x"]}, {"0": "background", "1": "liver"}),
    ({"test": []}, {"label_names": ["background", "spleen"]}, {"0": "background", "1": "spleen"}),
    ({"test": []}, {}, None),
])
def test_segment_names_come_from_the_datalist_then_the_config(tmp_path, datalist, config, expected):
    import json
    from types import SimpleNamespace

    from mmar.pacs.predictions import label_names
    from mmar.pacs.seg import class_names

    (tmp_path / "dl.json").write_text(json.dumps(datalist))
    names = label_names(SimpleNamespace(env={"DATASET_JSON": str(tmp_path / "dl.json")}, config=config))
    assert names == expected
    assert class_names(names, 3, np.array([0, 1])) == {1: (expected or {}).get("1", "class 1"), 2: "class 2"}


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom, reading the file made bad here
def test_seg_sources_with_a_bad_uid_inside_are_refused(tmp_path):
    """The UIDs a SEG is built from are checked in the files themselves (not only in the query's answer)."""
    import warnings

    import pydicom
    from mmar.errors import MMARError
    from mmar.pacs.seg import check_source_uids, read_source_series
    from pydicom.uid import generate_uid

    files = orthanc.write_ct_series(tmp_path / "s", study_uid=generate_uid(), series_uid=generate_uid(), slices=3)
    ds = pydicom.dcmread(files[2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.FrameOfReferenceUID = "1.2.3\n../../x"
        ds.save_as(files[2])
    for check in (check_source_uids, read_source_series):
        with pytest.raises(MMARError, match=r"s/slice_002.dcm: FrameOfReferenceUID '1.2.3\\n../../x' is not a DICOM UID"):
            check(tmp_path / "s")


def test_a_volume_is_converted_again_when_its_instances_differ_from_its_record(tmp_path):
    """Issue 31, 4: what each NIfTI was made of is recorded beside it; a folder that holds other instances now
    (added by a pull killed before its conversion ended) is converted again."""
    from mmar.pacs.volumes import convert_series, manifest_path, stale_reason
    from pydicom.uid import generate_uid

    series_uid = generate_uid()
    series_dir, study_dir, held = tmp_path / "dicom", tmp_path / "nifti", tmp_path / "held"
    files = orthanc.write_ct_series(series_dir, study_uid=generate_uid(), series_uid=series_uid, slices=6, rows=5, cols=4)
    held.mkdir()
    by_name = sorted(files)
    for path in by_name[4:]:
        path.rename(held / path.name)  # keep whole slices only: any 4 of them still form a stack
    lines = []
    (volume,) = convert_series(series_dir, study_dir, series_uid, log=lines.append)
    assert lines == [] and 4 in nib.load(volume).shape
    assert stale_reason(study_dir, series_uid, sorted(p.stem for p in series_dir.glob("*.dcm")), [volume]) is None
    assert convert_series(series_dir, study_dir, series_uid, log=lines.append) == [volume] and lines == []
    for path in held.iterdir():
        path.rename(series_dir / path.name)
    (again,) = convert_series(series_dir, study_dir, series_uid, log=lines.append)
    assert lines == [f"converting series {series_uid} again: made of 4 instance(s), the series folder now holds 6 "
                     "(2 added)"]
    assert again == volume and 6 in nib.load(volume).shape
    manifest_path(study_dir, series_uid).unlink()  # a volume of an older pull, with no record
    convert_series(series_dir, study_dir, series_uid, log=lines.append)
    assert lines[-1] == f"converting series {series_uid} again: no record of the instances it was made from"


def test_search_pages_with_offset_and_stops_at_a_repeat_or_the_page_bound(monkeypatch):
    """Issue 31, 8: QIDO-RS paged by mmar (dicomweb-client's loop has no bound)."""
    conn, _ = connection()
    asked = []

    def honest(offset, get_remaining, **_):
        asked.append(offset)
        assert get_remaining is False
        return [{"n": i} for i in range(offset, min(offset + 2, 5))]

    assert [row["n"] for row in conn.search("search", honest)] == [0, 1, 2, 3, 4] and asked == [0, 2, 4, 5]
    with pytest.raises(pc.PacsError, match=r"search: the server returned the same page at offset 2 as at offset 0 "
                                           r"\(it ignores `offset`\?\); stopped after 2 requests"):
        conn.search("search", lambda offset, get_remaining, **_: [{"n": 0}, {"n": 1}])
    monkeypatch.setenv("MMAR_DICOMWEB_MAX_PAGES", "3")
    with pytest.raises(pc.PacsError, match=r"more than 3 pages \(3 results so far\)"):
        conn.search("search", lambda offset, get_remaining, **_: [{"n": offset}])


def test_errors_redacted_is_the_last_net():
    basic = pc.Credentials("alice", "Pw-Value-9")
    with pytest.raises(pc.PacsError) as caught:
        with pc.errors_redacted(basic):
            try:
                raise ValueError("header Basic YWxpY2U6UHctVmFsdWUtOQ== rejected")
            except ValueError:
                raise RuntimeError("wrapped")  # noqa: B904 - the secret only in the context a traceback shows
    assert str(caught.value) == "wrapped" and caught.value.__cause__ is None and caught.value.__suppress_context__
    with pytest.raises(KeyError):  # nothing secret in it: passed on unchanged
        with pc.errors_redacted(basic):
            raise KeyError("plain")


def test_an_http_error_is_reported_by_its_standard_phrase_not_the_servers():
    conn, _ = connection(retries=0, username="alice", password="Pw-Value-9")

    def echo():
        raise http_error(500, "you sent Basic YWxpY2U6UHctVmFsdWUtOQ==")

    with pytest.raises(pc.PacsError) as caught:
        conn.call("search", echo)
    assert "HTTP 500 Internal Server Error" in str(caught.value) and "you sent" not in str(caught.value)
