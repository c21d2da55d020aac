"""QIDO-RS: the series a pull asks for, by study UIDs or by attributes.

Modality, StudyDate (a day or a range) and AccessionNumber go to the server as QIDO matching keys. The
SeriesDescription pattern is matched here (shell glob, case-insensitive) on the descriptions the server
returns: wildcard matching of LO attributes is optional in QIDO-RS and servers differ (Orthanc 1.10 matches
`chest*` against "chest axial" on some attributes and not on others), a glob here means the same everywhere.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from mmar.pacs.client import Connection, PacsError

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
DATE = re.compile(r"^\d{8}(-\d{8})?$")
# QIDO attributes asked for beyond the defaults (not every server returns these unasked)
SERIES_FIELDS = ["0008103E", "00080060", "00200011", "00201209"]
# modalities whose objects are not pixel images (DICOM PS3.3 C.7.3.1.1.1): SR, SEG, presentation states...
NON_IMAGE_MODALITIES = {"SR", "SEG", "PR", "KO", "DOC", "RTSTRUCT", "RTPLAN", "RTRECORD", "REG", "FID", "AU",
                        "ECG", "HD", "PLAN", "RWV", "SMR", "ANN", "POS", "RESP", "EPS", "M3D"}


@dataclass(frozen=True)
class Query:
    study_uids: tuple[str, ...] = ()
    modality: str | None = None
    study_date: str | None = None
    accession: str | None = None
    series_description: str | None = None

    def check(self) -> Query:
        if not (self.study_uids or self.modality or self.study_date or self.accession or self.series_description):
            raise PacsError("no query: give --study-uid (one or more) or at least one of --modality, --study-date, "
                            "--accession, --series-description")
        for uid in self.study_uids:
            check_uid(uid, "--study-uid")
        if self.study_date and not DATE.match(self.study_date):
            raise PacsError(f"--study-date {self.study_date!r}: expected YYYYMMDD or YYYYMMDD-YYYYMMDD")
        return self

    def server_filters(self) -> dict[str, str]:
        keys = {"Modality": self.modality, "StudyDate": self.study_date, "AccessionNumber": self.accession}
        return {k: v for k, v in keys.items() if v}

    def describe(self) -> str:
        parts = [f"StudyInstanceUID in {list(self.study_uids)}"] if self.study_uids else []
        parts += [f"{k}={v}" for k, v in self.server_filters().items()]
        if self.series_description:
            parts.append(f"SeriesDescription ~ {self.series_description!r}")
        return ", ".join(parts)

    def matches_description(self, description: str) -> bool:
        pattern = self.series_description
        return not pattern or fnmatch.fnmatchcase(description.lower(), pattern.lower())


@dataclass(frozen=True)
class Series:
    study_uid: str
    series_uid: str
    modality: str = ""
    description: str = ""
    number: str = ""

    @property
    def is_image(self) -> bool:
        return self.modality.upper() not in NON_IMAGE_MODALITIES

    def label(self) -> str:
        text = f"series {self.series_uid} ({self.modality or '?'}"
        return text + (f", {self.description!r})" if self.description else ")")


def is_uid(uid) -> bool:
    return isinstance(uid, str) and len(uid) <= 64 and bool(UID.match(uid))


def _shown(uid) -> str:
    """A value that is not a UID, for an error line: quoted (control characters escaped), cut short."""
    return repr(uid[:80] + ("..." if len(uid) > 80 else "")) if isinstance(uid, str) else repr(uid)


def check_uid(uid: str, where: str) -> str:
    """A DICOM UID (digits and dots, at most 64 characters): also what makes it safe as a folder name."""
    if not is_uid(uid):
        raise PacsError(f"{where}: {_shown(uid)} is not a DICOM UID (digits and dots, at most 64 characters)")
    return uid


def check_file_uids(ds, where: str, expected: dict[str, str] | None = None) -> None:
    """The UIDs inside a DICOM file (not what a QIDO-RS answer said about it), before anything is built on
    them: Study/Series/SOP Instance UID and SOP Class UID must be DICOM UIDs (they become folder names, SEG
    references, STOW-RS URLs), FrameOfReferenceUID too where present; `expected` (keyword -> UID): what the
    file must hold, e.g. the series QIDO-RS listed it in. PacsError naming `where` and the attribute."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID"):
        value = str(ds.get(keyword, "") or "") if keyword in ds else ""
        if not value and keyword == "FrameOfReferenceUID":  # optional here; a SEG's source must have one (seg.py)
            continue
        if not is_uid(value):
            raise PacsError(f"{where}: {keyword} {_shown(value)} is not a DICOM UID (digits and dots, at most 64 "
                            "characters)")
        if expected and keyword in expected and value != expected[keyword]:
            raise PacsError(f"{where}: {keyword} {value} is not {expected[keyword]}, the one the server listed it under")


def find_series(connection: Connection, query: Query) -> list[Series]:
    """The series `query` matches, in the server's order; an error when none does (or a study UID is unknown)."""
    client = connection.client
    filters = query.server_filters()
    found: list[Series] = []
    if query.study_uids:
        for study in dict.fromkeys(query.study_uids):
            rows = connection.search(f"QIDO-RS search for the series of study {study}", client.search_for_series,
                                     study_instance_uid=study, search_filters=filters, fields=SERIES_FIELDS)
            if not rows and not _study_exists(connection, study):
                raise PacsError(f"{connection.url}: study {study} not found (QIDO-RS returned no such study)")
            found += [_series(row, connection.url) for row in rows]
    else:
        rows = connection.search("QIDO-RS search for series", client.search_for_series, search_filters=filters,
                                 fields=SERIES_FIELDS)
        found = [_series(row, connection.url) for row in rows]
    found = [s for s in found if query.matches_description(s.description)]
    if not found:
        raise PacsError(f"{connection.url}: no series matches {query.describe()}")
    return list({s.series_uid: s for s in found}.values())


def _study_exists(connection: Connection, study: str) -> bool:
    rows = connection.call(f"QIDO-RS search for study {study}", connection.client.search_for_studies,
                           search_filters={"StudyInstanceUID": study})
    return bool(rows)


def _series(row: dict, url: str) -> Series:
    def value(tag: str) -> str:
        values = (row.get(tag) or {}).get("Value") or [""]
        return str(values[0])

    study, series = value("0020000D"), value("0020000E")
    check_uid(study, f"{url}: a QIDO-RS result's StudyInstanceUID")
    check_uid(series, f"{url}: a QIDO-RS result's SeriesInstanceUID")
    return Series(study, series, value("00080060"), value("0008103E"), value("00200011"))
