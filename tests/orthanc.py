"""A real Orthanc PACS for the `pacs` tests: started on 127.0.0.1 with free ports and a generated
configuration (storage in a temp folder, the DICOMweb plugin, HTTP basic auth), stopped afterwards.

Also generates small CT-like DICOM series with real geometry (pydicom), to load it with.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PLUGINS = Path("/usr/share/orthanc/plugins")
USER, PASSWORD = "mmar", "s3cret-Pacs-Passw0rd"


def available() -> str | None:
    """Why Orthanc cannot run here (None when it can)."""
    if shutil.which("Orthanc") is None:
        return "Orthanc not installed (apt-get install orthanc orthanc-dicomweb, or bash .ci/pacs.sh)"
    if not (PLUGINS / "libOrthancDicomWeb.so").is_file():
        return f"the Orthanc DICOMweb plugin is not in {PLUGINS} (apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Orthanc:
    process: subprocess.Popen
    http_port: int
    folder: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.base}/dicom-web"

    def session(self):
        import requests

        session = requests.Session()
        session.auth = (USER, PASSWORD)
        return session

    def upload(self, files) -> None:
        """Store DICOM files through Orthanc's REST API (not DICOMweb: the tests' own loading path)."""
        session = self.session()
        for path in files:
            response = session.post(f"{self.base}/instances", data=Path(path).read_bytes(), timeout=30)
            response.raise_for_status()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _die_with_parent() -> None:
    """Linux: Orthanc gets SIGTERM when the test process dies, however it dies (no server left running)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


_SHARED: list[Orthanc] = []


def shared(folder_factory) -> Orthanc:
    """One Orthanc for the whole test session (every pacs test module asks for it; started on first use,
    stopped at exit). Skips the test where Orthanc is missing, unless MMAR_PACS_REQUIRED=1 (CI): then fails."""
    import atexit

    import pytest

    if _SHARED and _SHARED[0].process.poll() is None:
        return _SHARED[0]
    why = available()
    if why:
        if os.environ.get("MMAR_PACS_REQUIRED") == "1":
            pytest.fail(f"MMAR_PACS_REQUIRED=1 but {why}")
        pytest.skip(why)
    server = start(folder_factory())
    atexit.register(server.stop)
    _SHARED[:] = [server]
    return server


def start(folder: Path, timeout: float = 30.0) -> Orthanc:
    """Orthanc with DICOMweb on free ports; returns once `/system` answers."""
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "mmar-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,  # 127.0.0.1 only
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(PLUGINS / "libOrthancDicomWeb.so")],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "StudiesMetadata": "Full",
                     "SeriesMetadata": "Full"},
        "StableAge": 1,
        "HttpTimeout": 30,
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    log = open(folder / "orthanc.log", "wb")
    process = subprocess.Popen(["Orthanc", str(path)], stdout=log, stderr=subprocess.STDOUT, cwd=folder,
                               preexec_fn=_die_with_parent)
    server = Orthanc(process, http_port, folder)
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited ({process.returncode}): {(folder / 'orthanc.log').read_text()[-2000:]}")
        try:
            if requests.get(f"{server.base}/system", auth=(USER, PASSWORD), timeout=2).ok:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"Orthanc did not answer on {server.base} within {timeout} s")


# ------------------------------------------------------------------------------------------- data


def write_ct_series(folder: Path, *, study_uid: str, series_uid: str, slices: int = 6, rows: int = 12,
                    cols: int = 10, spacing=(0.8, 0.7), thickness: float = 1.5, modality: str = "CT",
                    description: str = "chest axial", accession: str = "ACC1", study_date: str = "20240115",
                    patient_id: str = "P1", orientation=(1, 0, 0, 0, 1, 0), origin=(-5.0, -4.0, 10.0),
                    seed: int = 0) -> list[Path]:
    """A CT-like series with real geometry: one file per slice, slices stacked along the orientation's
    normal, written in a shuffled order (a reader must sort by position, never by file name)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    row_dir, col_dir = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    frame_of_reference = generate_uid()
    volume = rng.integers(0, 400, size=(slices, rows, cols)).astype(np.int16)
    volume[:, rows // 3: 2 * rows // 3, cols // 3: 2 * cols // 3] += 600  # a bright block
    files = []
    for index in rng.permutation(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_of_reference
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Pacs", patient_id, "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = study_date, "120000", accession, "1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = modality, 1, description, int(index) + 1
        ds.Manufacturer = "mmar tests"
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + normal * thickness * index]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceThickness = thickness
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = volume[index].tobytes()
        path = folder / f"slice_{len(files):03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def write_sr(path: Path, *, study_uid: str, series_uid: str) -> Path:
    """A Basic Text SR in the study: a series that is not an image."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = BasicTextSRStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime = "Test^Pacs", "P1", "20240115", "120000"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.AccessionNumber = "SR", 99, 1, "ACC1"
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def environ_with_credentials(**extra) -> dict:
    return {**os.environ, "MMAR_DICOMWEB_USERNAME": USER, "MMAR_DICOMWEB_PASSWORD": PASSWORD, **extra}


@dataclass
class Loaded:
    """What the standard data set put on the server."""

    chest_study: str  # CT "chest axial" (ACC1, 20240115) + an SR report
    chest_series: str
    chest_sr_series: str
    brain_study: str  # MR "brain t1 sagittal" (ACC2, 20240301), oblique
    brain_series: str
    report_study: str  # a study holding only an SR
    files: dict  # series UID -> the DICOM files generated for it


_LOADED: dict[int, Loaded] = {}


def load_standard(server: Orthanc, folder: Path) -> Loaded:
    """Generate the tests' series and store them on `server` (once per server)."""
    if id(server) in _LOADED:
        return _LOADED[id(server)]
    from pydicom.uid import generate_uid

    uids = [generate_uid() for _ in range(6)]
    chest_study, chest_series, chest_sr, brain_study, brain_series, report_study = uids
    files = {
        chest_series: write_ct_series(folder / "chest", study_uid=chest_study, series_uid=chest_series, seed=1),
        brain_series: write_ct_series(folder / "brain", study_uid=brain_study, series_uid=brain_series, modality="MR",
                                      description="brain T1 sagittal", accession="ACC2", study_date="20240301",
                                      patient_id="P2", slices=5, rows=9, cols=11, spacing=(1.1, 0.9), thickness=2.0,
                                      orientation=(0.0, 0.9950042, 0.0998334, 0.0, -0.0998334, 0.9950042),
                                      origin=(20.0, -30.0, 15.0), seed=2),
    }
    sr_files = [write_sr(folder / "sr" / "chest.dcm", study_uid=chest_study, series_uid=chest_sr),
                write_sr(folder / "sr" / "report.dcm", study_uid=report_study, series_uid=generate_uid())]
    server.upload([f for group in files.values() for f in group] + sr_files)
    loaded = Loaded(chest_study, chest_series, chest_sr, brain_study, brain_series, report_study, files)
    _LOADED[id(server)] = loaded
    return loaded


SHARED_DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "dicom2nifti"
