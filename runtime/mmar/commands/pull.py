"""`mmar pull --url URL --dicom-dir DIR --output DIR --datalist FILE [--key test] [--labels DIR]
[--study-uid UID]... [--modality M] [--study-date D|D1-D2] [--accession A] [--series-description GLOB]`

QIDO-RS query -> WADO-RS retrieval of the matching image series into DIR/<study>/<series>/<sop>.dcm
(resumable) -> NIfTI through the project's converter into OUTPUT/<study>/<series>.nii.gz -> the datalist
list `--key`. Credentials come from the environment only (see mmar.pacs.client).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmar.report import write_result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmar pull",
        description="Pull image series from a DICOMweb server (QIDO-RS + WADO-RS), convert them to NIfTI and "
        "list them in a datalist. Credentials: MMAR_DICOMWEB_USERNAME + MMAR_DICOMWEB_PASSWORD, or "
        "MMAR_DICOMWEB_TOKEN. Retries: MMAR_DICOMWEB_RETRIES (default 4), MMAR_DICOMWEB_BACKOFF (default 1 s). "
        "Each request: MMAR_DICOMWEB_TIMEOUT (default 60 s); each search's pages: MMAR_DICOMWEB_MAX_PAGES (default "
        "1000), MMAR_DICOMWEB_SEARCH_TIMEOUT (default 600 s).")
    parser.add_argument("--url", required=True, help="the DICOMweb service, e.g. https://pacs.example/dicom-web")
    parser.add_argument("--dicom-dir", required=True, type=Path,
                        help="where instances are stored, as DIR/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm")
    parser.add_argument("--output", required=True, type=Path, help="NIfTI folder: OUTPUT/<StudyInstanceUID>/<SeriesInstanceUID>.nii.gz")
    parser.add_argument("--datalist", required=True, type=Path, help="datalist JSON to write the list into (other lists kept)")
    parser.add_argument("--key", default="test", help="the datalist list to replace (default: test)")
    parser.add_argument("--labels", type=Path,
                        help="folder of label masks, matched by name: LABELS/[<StudyInstanceUID>/]<SeriesInstanceUID>.nii[.gz]")
    query = parser.add_argument_group("query (at least one)")
    query.add_argument("--study-uid", action="append", default=[], metavar="UID", help="a StudyInstanceUID (repeatable)")
    query.add_argument("--modality", help="e.g. CT, MR")
    query.add_argument("--study-date", metavar="YYYYMMDD[-YYYYMMDD]", help="a day or a range")
    query.add_argument("--accession", help="AccessionNumber")
    query.add_argument("--series-description", metavar="GLOB", help="SeriesDescription pattern (* ?, case-insensitive)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from mmar.pacs.client import errors_redacted

    with errors_redacted():  # no form of a credential in any error line, whatever raised it
        return _pull(args)


def _pull(args: argparse.Namespace) -> int:
    from mmar.errors import MMARError
    from mmar.pacs import datalist as dl
    from mmar.pacs.client import connect
    from mmar.pacs.query import Query, find_series
    from mmar.pacs.retrieve import fetch_series, series_folder
    from mmar.pacs.volumes import convert_series, remove_abandoned

    query = Query(tuple(args.study_uid), args.modality, args.study_date, args.accession,
                  args.series_description).check()
    if args.labels is not None and not args.labels.is_dir():
        raise MMARError(f"--labels {args.labels}: not a folder")
    dl.read_existing(args.datalist)  # fail before any download when the datalist cannot be updated afterwards
    dicom_dir, output = args.dicom_dir.resolve(), args.output.resolve()
    connection = connect(args.url)
    say = connection.say  # lines with what the server sent (series descriptions) in them: redacted
    series = find_series(connection, query)
    images = [s for s in series if s.is_image]
    for skipped in (s for s in series if not s.is_image):
        say(f"skipped {skipped.label()}: not an image series")
    if not images:
        raise MMARError(connection.redact(f"{connection.url}: the series matching {query.describe()} hold no images "
                                          f"({', '.join(sorted({s.modality or '?' for s in series}))})"))
    from mmar.io import remove_stale_temp_files

    for path in remove_stale_temp_files(dicom_dir) + remove_stale_temp_files(output):
        print(f"removed {path}: a temp file of a pull that was stopped while writing")
    remove_abandoned(output)
    print(f"{len(images)} image series on {connection.url} match {query.describe()}")
    entries, retrieved, present, not_image = [], 0, 0, len(series) - len(images)
    for item in images:
        fetched = fetch_series(connection, item, dicom_dir, log=say)
        retrieved, present = retrieved + fetched.retrieved, present + fetched.present
        if fetched.retrieved + fetched.present == 0:
            say(f"skipped {item.label()}: no image instances")
            not_image += 1
            continue
        study_dir = output / item.study_uid
        for volume in convert_series(fetched.folder, study_dir, item.series_uid):
            label = dl.find_label(args.labels, item.study_uid, volume) if args.labels else None
            if args.labels and label is None:
                print(f"warning: no label in {args.labels} for {volume.name} (listed without one)")
            entries.append(dl.entry(volume, series_folder(dicom_dir, item), item.study_uid, item.series_uid,
                                    args.datalist, label))
    if not entries:
        raise MMARError(f"{connection.url}: none of the series matching {query.describe()} holds an image instance")
    dl.write_list(args.datalist, args.key, entries)
    print(f"pulled {len(images)} series ({retrieved} instances retrieved, {present} already on disk) -> "
          f"{len(entries)} case(s) in {args.datalist} [{args.key}]")
    write_result({"command": "pull", "series": len(images), "skipped_series": not_image, "retrieved": retrieved,
                  "present": present, "cases": len(entries), "datalist": str(args.datalist), "key": args.key})
    return 0
