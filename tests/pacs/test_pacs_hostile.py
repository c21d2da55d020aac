"""`mmar pull` / `mmar push` against DICOMweb servers that misbehave in ways Orthanc never does: a local
server (http.server on 127.0.0.1) that echoes the Authorization header back in its reason phrase, a
`Warning` header and a series description; that ignores `offset` or never ends its pages; that sends
instances whose UIDs inside are not those it listed (or not UIDs at all)."""

from __future__ import annotations

import base64
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: orthanc, runs_support
import orthanc  # noqa: E402

pytestmark = pytest.mark.pacs
STUDY, SERIES = "1.2.826.0.1.3680043.8.498.77", "1.2.826.0.1.3680043.8.498.77.1"
HOSTILE_UID = "1.2.3/../../../tmp/mmar-hostile"
USER, PASSWORD, TOKEN = "hrel", "Fake-Pacs-Passw0rd!", "eyJhbGciOi.Bearer-Token-Value_42"


class Hostile(http.server.BaseHTTPRequestHandler):
    """A DICOMweb server whose behaviour the test sets (`Hostile.mode`), counting its requests."""

    mode = "echo500"
    requests: list[str] = []
    instances: list[bytes] = []  # the DICOM files it serves for SERIES (mode "bad-content")
    delay = 0.0

    def log_message(self, *_):
        pass

    def _auth(self) -> str:
        return self.headers.get("Authorization", "(none)")

    def _json(self, rows, headers=()):
        body = json.dumps(rows).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _multipart(self, parts: list[bytes]):
        boundary = "mmarHostileBoundary"
        body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), part)
                        for part in parts) + b"--%s--\r\n" % boundary.encode()
        self.send_response(200)
        self.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 - the http.server API
        self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        self.do_GET()

    def do_GET(self):  # noqa: N802
        Hostile.requests.append(self.path)
        if self.delay:
            time.sleep(self.delay)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        offset = int(query.get("offset", ["0"])[0])
        if self.mode in ("echo500", "echo400"):
            status = 500 if self.mode == "echo500" else 400
            self.send_response(status, f"Internal error; you sent {self._auth()}")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.mode == "echo-content":  # 200, with the header in a Warning header and in the descriptions
            rows = [] if offset else [series_row(STUDY, SERIES, "SR", f"you sent {self._auth()}")]
            self._json(rows, [("Warning", f'299 hostile "you sent {self._auth()}"')])
        elif self.mode == "ignore-offset":  # the same page, whatever the offset
            self._json([series_row(STUDY, SERIES), series_row(STUDY, SERIES + ".2")])
        elif self.mode == "endless":  # honours offset, but there is always another page
            self._json([series_row(STUDY, f"{SERIES}.{offset + k + 1}") for k in range(2)])
        elif self.mode == "bad-content":
            parts = url.path.rstrip("/").split("/")
            if url.path.endswith("/series") or url.path.endswith("/instances"):
                if offset:
                    self._json([])
                elif url.path.endswith("/series"):
                    self._json([series_row(STUDY, SERIES)])
                else:
                    self._json([{"00080016": {"vr": "UI", "Value": [pydicom.dcmread(_bytes(f)).SOPClassUID]},
                                 "00080018": {"vr": "UI", "Value": [sop_of(f)]}} for f in self.instances])
            elif "instances" in parts:  # one instance
                self._multipart([f for f in self.instances if sop_of(f) == parts[-1]])
            else:  # the series
                self._multipart(self.instances)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


def _bytes(data: bytes):
    import io

    return io.BytesIO(data)


def sop_of(data: bytes) -> str:
    """The SOPInstanceUID the file was listed under (its file meta), whatever its dataset says."""
    return str(pydicom.dcmread(_bytes(data)).file_meta.MediaStorageSOPInstanceUID)


def series_row(study: str, series: str, modality: str = "CT", description: str = "chest") -> dict:
    return {"0020000D": {"vr": "UI", "Value": [study]}, "0020000E": {"vr": "UI", "Value": [series]},
            "00080060": {"vr": "CS", "Value": [modality]}, "0008103E": {"vr": "LO", "Value": [description]}}


@pytest.fixture
def hostile():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Hostile.requests, Hostile.delay, Hostile.instances = [], 0.0, []
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web"
    finally:
        httpd.shutdown()
        httpd.server_close()


def mmar(*args: str, work: Path, env: dict, timeout: float = 60):
    """The real CLI, with a timeout: before the fixes some of these never ended."""
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("MMAR_DICOMWEB_")},
            "MMAR_TERMINATION_LOG": str(work / "result.json"), "MMAR_DICOMWEB_RETRIES": "1",
            "MMAR_DICOMWEB_BACKOFF": "0.05", **env}
    started = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-m", "mmar", *args], capture_output=True, text=True, env=full,
                                timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"mmar {args[0]} still running after {timeout} s ({len(Hostile.requests)} requests): "
                    f"{(expired.stderr or b'')[-500:]!r}")
    result.seconds = time.monotonic() - started
    result.report = (work / "result.json").read_text() if (work / "result.json").is_file() else ""
    return result


def pull(url: str, work: Path, env: dict, *query: str, timeout: float = 60):
    return mmar("pull", "--url", url, "--dicom-dir", str(work / "dicom"), "--output", str(work / "nifti"),
                "--datalist", str(work / "datalist.json"), *(query or ("--modality", "CT")), work=work, env=env,
                timeout=timeout)


def one_error_line(result) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    report = json.loads(result.report)
    # a push that went on past a SEG the server refused reports its counts, the line as `first_error`
    words = report["first_error"] if report.get("command") == "push" and "failed" in report else report["error"]
    assert words == lines[0][len("error: "):], report
    return lines[0]


# ------------------------------------------------------------------ 3: no form of a credential is echoed

BASIC = {"MMAR_DICOMWEB_USERNAME": USER, "MMAR_DICOMWEB_PASSWORD": PASSWORD}
BEARER = {"MMAR_DICOMWEB_TOKEN": TOKEN}
PAIR_B64 = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def leaked(result) -> list[str]:
    """Every form of the test's credentials found in what the command printed or reported."""
    shown = result.stdout + result.stderr + result.report
    forms = [PASSWORD, TOKEN, PAIR_B64, PAIR_B64.rstrip("="), PAIR_B64[:12], f"Basic {PAIR_B64[:8]}",
             f"Bearer {TOKEN[:8]}", TOKEN[:12]]
    return [form for form in forms if form in shown]


@pytest.fixture
def seg_folder(tmp_path):
    """A folder with one DICOM Segmentation file (what `mmar push` sends), made without a server."""
    import nibabel as nib
    import numpy as np
    from mmar.convert.cli import main as convert
    from mmar.pacs.seg import build_segmentation, read_source_series, write_segmentation

    source = tmp_path / "source"
    orthanc.write_ct_series(source, study_uid=STUDY, series_uid=SERIES, slices=3, rows=6, cols=5)
    assert convert(["-d", str(source), "-o", str(tmp_path / "nifti"), "-q"]) == 0
    (volume,) = (tmp_path / "nifti").glob("*.nii.gz")
    image = nib.load(volume)
    mask = tmp_path / "segs" / "case_seg.nii.gz"
    mask.parent.mkdir()
    nib.save(nib.Nifti1Image(np.ones(image.shape, np.uint8), image.affine), mask)
    write_segmentation(build_segmentation(mask, read_source_series(source), None, 2, algorithm="t", version="1"),
                       tmp_path / "segs" / "case_seg.dcm")
    mask.unlink()
    return tmp_path / "segs"


@pytest.mark.parametrize("credentials", [BASIC, BEARER], ids=["basic", "bearer"])
@pytest.mark.parametrize("mode, status", [("echo500", "HTTP 500 Internal Server Error"), ("echo400", "HTTP 400 Bad Request")])
@pytest.mark.parametrize("command", ["pull", "push"])
def test_a_server_echoing_the_authorization_header_leaks_no_form_of_it(hostile, tmp_path, request, command, mode,
                                                                       status, credentials):
    import requests

    Hostile.mode = mode
    echoed = requests.get(f"{hostile}/series", auth=(USER, PASSWORD), timeout=5).reason
    assert echoed == f"Internal error; you sent Basic {PAIR_B64}"  # the server does echo it
    if command == "pull":
        result = pull(hostile, tmp_path, credentials)
    else:
        segs = request.getfixturevalue("seg_folder")
        result = mmar("push", str(tmp_path), "--url", hostile, "--input", str(segs), work=tmp_path, env=credentials)
    line = one_error_line(result)
    assert len(Hostile.requests) >= 2  # it asked (and got the echo)
    assert status in line and "you sent" not in line, line  # the standard phrase, never the server's
    assert leaked(result) == [], line


@pytest.mark.parametrize("credentials", [BASIC, BEARER], ids=["basic", "bearer"])
def test_what_a_server_sends_back_is_printed_redacted(hostile, tmp_path, credentials):
    """The header echoed in a `Warning` header (dicomweb-client logs it) and in a series description (pull
    prints it when it skips the series)."""
    Hostile.mode = "echo-content"
    result = pull(hostile, tmp_path, credentials)
    one_error_line(result)
    assert "not an image series" in result.stdout and "you sent" in result.stdout
    assert "warning: dicomweb-client:" in result.stderr and "you sent" in result.stderr
    assert leaked(result) == [], result.stdout + result.stderr


def test_redaction_covers_every_form_of_the_secret():
    from mmar.pacs.client import Credentials, redact_text, server_text

    basic = Credentials(USER, PASSWORD)
    for form in (PASSWORD, PAIR_B64, PAIR_B64.rstrip("="), f"Basic {PAIR_B64}", "Fake-Pacs-Passw0rd%21"):
        assert redact_text(f"you sent {form}.", basic).count("***") == 1, form
        assert PAIR_B64[:8] not in redact_text(f"you sent {form}", basic)
    cut = f"you sent Basic {PAIR_B64[:10]}"  # a server that cuts the header short: a prefix of the base64
    assert PAIR_B64[:10] not in server_text(cut, basic) and server_text(cut, basic) == "you sent Basic ***"
    assert server_text(f"a\nBearer {TOKEN}", Credentials(token=TOKEN)) == "a Bearer ***"
    assert server_text(f"x authorization: Bearer {TOKEN[:6]}", Credentials()) == "x authorization: Bearer ***"
    assert len(server_text("y" * 5000, basic)) < 300


# ---------------------------------------------------------------- 8: bounded paging of QIDO-RS searches


def test_a_server_that_ignores_offset_stops_at_the_repeated_page(hostile, tmp_path):
    Hostile.mode = "ignore-offset"
    result = pull(hostile, tmp_path, {}, timeout=30)
    line = one_error_line(result)
    assert "QIDO-RS search for series" in line and "same page" in line and "offset" in line and hostile in line
    assert len(Hostile.requests) == 2, Hostile.requests  # the first page, and the repeat
    assert result.seconds < 20


def test_endless_pages_are_bounded_in_number(hostile, tmp_path):
    Hostile.mode = "endless"
    result = pull(hostile, tmp_path, {"MMAR_DICOMWEB_MAX_PAGES": "7"}, timeout=30)
    line = one_error_line(result)
    assert "more than 7 pages (14 results so far)" in line and "MMAR_DICOMWEB_MAX_PAGES" in line, line
    assert len(Hostile.requests) == 7
    assert [parse_qs(urlsplit(p).query).get("offset") for p in Hostile.requests[:3]] == [["0"], ["2"], ["4"]]


def test_endless_pages_are_bounded_in_time(hostile, tmp_path):
    Hostile.mode, Hostile.delay = "endless", 0.2
    result = pull(hostile, tmp_path, {"MMAR_DICOMWEB_SEARCH_TIMEOUT": "1"}, timeout=30)
    line = one_error_line(result)
    assert "over the 1 s a search may take (MMAR_DICOMWEB_SEARCH_TIMEOUT)" in line, line
    assert 4 <= len(Hostile.requests) <= 8 and result.seconds < 15


# --------------------------------------------------------- 7: the UIDs inside the retrieved files checked


def hostile_instances(folder: Path, slices: int, bad_index: int, keyword: str, value: str) -> list[bytes]:
    """A series of `slices` instances, listed with good UIDs; instance `bad_index` holds `value` as `keyword`."""
    files = orthanc.write_ct_series(folder, study_uid=STUDY, series_uid=SERIES, slices=slices, rows=6, cols=5)
    out = []
    for index, path in enumerate(sorted(files)):
        ds = pydicom.dcmread(path)
        if index == bad_index:
            setattr(ds, keyword, value)
            ds.save_as(path)
        out.append(path.read_bytes())
    return out


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom, on the files this test makes bad
@pytest.mark.parametrize("slices", [1, 5], ids=["instance-by-instance", "streamed"])
@pytest.mark.parametrize("keyword, value, message", [
    ("StudyInstanceUID", HOSTILE_UID, f"StudyInstanceUID '{HOSTILE_UID}' is not a DICOM UID"),
    ("SeriesInstanceUID", "1.2.826.0.1.3680043.8.498.99", f"SeriesInstanceUID 1.2.826.0.1.3680043.8.498.99 is not {SERIES}"),
    ("FrameOfReferenceUID", "../../etc", "FrameOfReferenceUID '../../etc' is not a DICOM UID"),
])
def test_pull_checks_the_uids_inside_each_retrieved_instance(hostile, tmp_path, slices, keyword, value, message):
    Hostile.mode = "bad-content"
    Hostile.instances = hostile_instances(tmp_path / "served", slices, slices - 1, keyword, value)
    result = pull(hostile, tmp_path, {}, "--study-uid", STUDY)
    line = one_error_line(result)
    bad_sop = sop_of(Hostile.instances[-1])
    assert message in line and f"the retrieved instance {bad_sop}" in line and hostile in line, line
    written = [p.name for p in (tmp_path / "dicom").rglob("*") if p.is_file()] if (tmp_path / "dicom").exists() else []
    assert f"{bad_sop}.dcm" not in written and not (tmp_path / "datalist.json").exists()
    assert not (tmp_path / "nifti").exists() or not any((tmp_path / "nifti").rglob("*.nii.gz"))
