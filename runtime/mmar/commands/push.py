"""`mmar push MMAR_DIR --url URL [--input DIR]`: STOW-RS the DICOM Segmentations `mmar infer --dicom-seg`
wrote (default: the MMAR's infer output folder) to a DICOMweb server; those it already holds are skipped."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmar.report import write_result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mmar push",
        description="Store the DICOM Segmentations of `mmar infer --dicom-seg` on a DICOMweb server (STOW-RS). "
        "Credentials: MMAR_DICOMWEB_USERNAME + MMAR_DICOMWEB_PASSWORD, or MMAR_DICOMWEB_TOKEN.")
    parser.add_argument("mmar", metavar="MMAR_DIR", help="the MMAR folder")
    parser.add_argument("--url", required=True, help="the DICOMweb service, e.g. https://pacs.example/dicom-web")
    parser.add_argument("--input", type=Path, help="folder of SEG files (default: the MMAR's infer output, "
                        "MMAR_EVAL_OUTPUT_PATH)")
    args = parser.parse_args(argv)
    from mmar.pacs.client import errors_redacted

    with errors_redacted():  # no form of a credential in any error line, whatever raised it
        return _push(args)


def _push(args: argparse.Namespace) -> int:
    from mmar.errors import MMARError
    from mmar.pacs.client import connect
    from mmar.pacs.store import find_segs, push

    folder = args.input
    if folder is None:
        from mmar.archive import load_archive

        folder = load_archive(args.mmar, []).eval_dir
    files = find_segs(Path(folder))
    if not files:
        raise MMARError(f"{folder}: no DICOM Segmentation (.dcm) to push; `mmar infer --dicom-seg` writes them")
    connection = connect(args.url)
    pushed = push(connection, files)
    print(f"pushed {len(files)} DICOM SEG(s) to {connection.url}: {len(pushed.stored)} stored, "
          f"{len(pushed.skipped)} already there, {len(pushed.failed)} not stored")
    result = {"command": "push", "found": len(files), "stored": len(pushed.stored), "skipped": len(pushed.skipped),
              "failed": len(pushed.failed), "url": connection.url}
    if pushed.failed:  # the others are stored; the step still fails, naming what was left out, with its counts
        path, why = pushed.failed[0]  # `why` is redacted (mmar.pacs.store.push)
        more = f" (and {len(pushed.failed) - 1} more, listed above)" if len(pushed.failed) > 1 else ""
        line = (f"{len(pushed.failed)} of {len(files)} DICOM SEG(s) not stored ({len(pushed.stored)} stored, "
                f"{len(pushed.skipped)} already there): {why}{more}")
        print(f"error: {line}", file=sys.stderr)
        write_result({**result, "first_error": line})
        return 1
    write_result(result)
    return 0
