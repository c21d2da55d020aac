"""STOW-RS: DICOM Segmentation files onto the server, each once.

A SEG whose SOPInstanceUID the server already holds (QIDO-RS) is skipped: its UIDs are derived from the
source series and the mask (mmar.pacs.seg), so pushing the same predictions again stores nothing twice,
and a push stopped half-way resumes.

One bad SEG does not stop the others: a file that cannot be read, whose UIDs are not DICOM UIDs (they go
into the STOW-RS URL and the server's index), or that the server refuses (HTTP 4xx, a STOW-RS failure
reason) is reported and left out, the rest is stored, and the push fails at the end naming it. What stops
the push at once is what no other SEG would get past either: wrong credentials, a server that is down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mmar.errors import MMARError
from mmar.pacs.client import BadAnswer, Connection, PacsError, Refused
from mmar.pacs.query import check_file_uids

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass
class Pushed:
    stored: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (file, why it was not stored)


def find_segs(folder: Path) -> list[Path]:
    """The DICOM Segmentation files under `folder` (temp files of an interrupted write left out)."""
    import pydicom

    if not folder.is_dir():
        raise MMARError(f"--input {folder}: not a folder")
    found = []
    for path in sorted(folder.rglob("*.dcm")):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except Exception:  # noqa: BLE001 - not DICOM: not ours to push
            continue
        if str(getattr(header, "SOPClassUID", "")) == SEGMENTATION_STORAGE:
            found.append(path)
    return found


def on_server(connection: Connection, ds) -> bool:
    rows = connection.call(f"QIDO-RS search for instance {ds.SOPInstanceUID}", connection.client.search_for_instances,
                           study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
                           search_filters={"SOPInstanceUID": ds.SOPInstanceUID})
    return any(((row.get("00080018") or {}).get("Value") or [None])[0] == ds.SOPInstanceUID for row in rows)


def read_seg(path: Path):
    """A SEG file, read and checked before any request is built from it."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as error:  # noqa: BLE001 - pydicom raises several types for a bad file
        raise PacsError(f"{path}: not a readable DICOM file ({type(error).__name__})") from None
    if str(ds.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
        raise PacsError(f"{path}: not a DICOM Segmentation (SOPClassUID {str(ds.get('SOPClassUID', ''))[:64]!r})")
    check_file_uids(ds, str(path))
    return ds


def push(connection: Connection, files: list[Path], log=print) -> Pushed:
    pushed = Pushed()

    def failed(path: Path, why: str) -> None:
        why = connection.redact(why)
        pushed.failed.append((path, why))
        log(f"not stored: {why}")

    for path in files:
        try:
            ds = read_seg(path)
        except PacsError as error:  # this file
            failed(path, str(error))
            continue
        try:
            if on_server(connection, ds):
                pushed.skipped.append(path)
                continue
            response = connection.call(f"STOW-RS store of {path.name}", connection.client.store_instances, [ds],
                                       study_instance_uid=ds.StudyInstanceUID)
            refused = getattr(response, "FailedSOPSequence", None) if response is not None else None
            if refused:
                reason = getattr(refused[0], "FailureReason", "?")
                raise Refused(f"{connection.url}: STOW-RS refused {path} (failure reason {reason})")
        except (Refused, BadAnswer) as error:  # this SEG only; wrong credentials or a server down raise on
            failed(path, str(error))
            continue
        pushed.stored.append(path)
        log(f"stored {path.name} (SEG {ds.SOPInstanceUID} of study {ds.StudyInstanceUID})")
    return pushed
