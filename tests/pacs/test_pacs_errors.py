"""What goes wrong talking to a PACS: server down, 5xx, wrong credentials, unknown study, a series that
is not an image. Each is one clear error line, a non-zero exit, no credential anywhere, nothing half-written."""

from __future__ import annotations

import http.server
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: orthanc, runs_support
import orthanc  # noqa: E402
from conftest import run_mmar  # noqa: E402

pytestmark = pytest.mark.pacs
FAST_RETRIES = {"MMAR_DICOMWEB_RETRIES": "2", "MMAR_DICOMWEB_BACKOFF": "0.1"}


def pull(url: str, work: Path, *query: str, env: dict):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MMAR_DICOMWEB_")},
           "MMAR_TERMINATION_LOG": str(work / "result.json"), **env}
    started = time.monotonic()
    result = run_mmar("pull", "--url", url, "--dicom-dir", str(work / "dicom"), "--output", str(work / "nifti"),
                      "--datalist", str(work / "datalist.json"), *query, env=env, check=False)
    result.seconds = time.monotonic() - started
    return result


def assert_failed_cleanly(result, work: Path, *needles: str) -> str:
    """Exit 1, one `error:` line with every needle, the same line as the step's result, nothing written."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    report = json.loads((work / "result.json").read_text())
    assert report == {"command": "pull", "error": lines[0][len("error: "):]}
    assert not (work / "datalist.json").exists() and not (work / "nifti").exists()
    assert not (work / "dicom").exists() or not any(p.is_file() for p in (work / "dicom").rglob("*"))
    return lines[0]


def test_server_down_is_retried_with_back_off_then_one_line(tmp_path):
    url = f"http://127.0.0.1:{orthanc.free_port()}/dicom-web"  # nothing listens there
    result = pull(url, tmp_path, "--modality", "CT", env=FAST_RETRIES)
    assert_failed_cleanly(result, tmp_path, url, "connection refused", "after 3 attempts")
    assert 0.3 <= result.seconds < 15  # 0.1 + 0.2 s of back-off, then it gives up


class Unavailable(http.server.BaseHTTPRequestHandler):
    """A DICOMweb server that is always overloaded: 503, counting the requests."""

    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - the http.server API
        Unavailable.requests.append(self.path)
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_):
        pass


def test_a_5xx_is_retried_a_bounded_number_of_times(tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Unavailable.requests.clear()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web"
        result = pull(url, tmp_path, "--modality", "CT", env={**FAST_RETRIES, "MMAR_DICOMWEB_RETRIES": "3"})
    finally:
        httpd.shutdown()
    assert_failed_cleanly(result, tmp_path, url, "HTTP 503", "after 4 attempts")
    assert len(Unavailable.requests) == 4 and all("Modality=CT" in path for path in Unavailable.requests)


@pytest.mark.parametrize("credentials", [
    {"MMAR_DICOMWEB_USERNAME": orthanc.USER, "MMAR_DICOMWEB_PASSWORD": "Wr0ng-but-Secret-Value"},
    {"MMAR_DICOMWEB_TOKEN": "eyJ-a-Bearer-Token-Nobody-May-See"},
    {},
], ids=["basic", "bearer", "none"])
def test_wrong_credentials_fail_at_once_without_printing_them(server, loaded, tmp_path, credentials):
    result = pull(server.dicomweb, tmp_path, "--study-uid", loaded.chest_study, env={**FAST_RETRIES, **credentials})
    line = assert_failed_cleanly(result, tmp_path, server.dicomweb, "authentication failed", "HTTP 401")
    assert result.seconds < 10  # no retry of a 401
    for secret in (credentials.get("MMAR_DICOMWEB_PASSWORD"), credentials.get("MMAR_DICOMWEB_TOKEN"), orthanc.PASSWORD):
        if secret:
            assert secret not in result.stdout + result.stderr + (tmp_path / "result.json").read_text(), line


def test_credentials_in_the_url_are_refused_and_not_echoed(server, tmp_path):
    url = server.dicomweb.replace("http://", f"http://{orthanc.USER}:{orthanc.PASSWORD}@")
    result = pull(url, tmp_path, "--modality", "CT", env={})
    assert_failed_cleanly(result, tmp_path, "credentials in the URL are not accepted", server.dicomweb)
    assert orthanc.PASSWORD not in result.stdout + result.stderr + (tmp_path / "result.json").read_text()


def test_half_given_basic_credentials_are_an_error_naming_the_missing_variable(server, tmp_path):
    result = pull(server.dicomweb, tmp_path, "--modality", "CT", env={"MMAR_DICOMWEB_USERNAME": orthanc.USER})
    assert_failed_cleanly(result, tmp_path, "MMAR_DICOMWEB_PASSWORD is not set")


def test_unknown_study_is_an_error_before_anything_is_retrieved(server, loaded, tmp_path):
    unknown = "1.2.826.0.1.3680043.8.498.1"
    result = pull(server.dicomweb, tmp_path, "--study-uid", loaded.chest_study, "--study-uid", unknown,
                  env=orthanc.environ_with_credentials())
    assert_failed_cleanly(result, tmp_path, f"study {unknown} not found", server.dicomweb)
    assert orthanc.PASSWORD not in result.stdout + result.stderr


def test_a_query_without_match_is_an_error(server, loaded, tmp_path):
    result = pull(server.dicomweb, tmp_path, "--modality", "PT", env=orthanc.environ_with_credentials())
    assert_failed_cleanly(result, tmp_path, "no series matches Modality=PT")


def test_a_study_of_non_image_series_only_is_an_error(server, loaded, tmp_path):
    result = pull(server.dicomweb, tmp_path, "--study-uid", loaded.report_study, env=orthanc.environ_with_credentials())
    assert "not an image series" in result.stdout
    assert_failed_cleanly(result, tmp_path, "hold no images (SR)")


def test_an_unreadable_datalist_fails_before_any_download(server, loaded, tmp_path):
    (tmp_path / "datalist.json").write_text("{not json")
    result = pull(server.dicomweb, tmp_path, "--study-uid", loaded.chest_study, env=orthanc.environ_with_credentials())
    assert result.returncode == 1 and "cannot read it as JSON" in result.stderr
    assert (tmp_path / "datalist.json").read_text() == "{not json" and not (tmp_path / "dicom").exists()
