"""STOW-RS: DICOM Segmentation files onto the server, each once.

A SEG whose SOPInstanceUID the server already holds (QIDO-RS) is skipped: its UIDs are derived from the
source series and the mask (mmar.pacs.seg), so pushing the same predictions again stores nothing twice,
and a push stopped half-way resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mmar.errors import MMARError
from mmar.pacs.client import Connection, PacsError

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass
class Pushed:
    stored: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


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


def push(connection: Connection, files: list[Path], log=print) -> Pushed:
    import pydicom

    pushed = Pushed()
    for path in files:
        ds = pydicom.dcmread(path)
        if on_server(connection, ds):
            pushed.skipped.append(path)
            continue
        response = connection.call(f"STOW-RS store of {path.name}", connection.client.store_instances, [ds],
                                   study_instance_uid=ds.StudyInstanceUID)
        failed = getattr(response, "FailedSOPSequence", None) if response is not None else None
        if failed:
            reason = getattr(failed[0], "FailureReason", "?")
            raise PacsError(f"{connection.url}: STOW-RS refused {path} (failure reason {reason})")
        pushed.stored.append(path)
        log(f"stored {path.name} (SEG {ds.SOPInstanceUID} of study {ds.StudyInstanceUID})")
    return pushed
