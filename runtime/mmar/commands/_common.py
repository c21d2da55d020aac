"""Arguments shared by the commands that read an MMAR."""

from __future__ import annotations

import argparse

from mmar.archive import Archive, load_archive


def add_archive_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mmar", metavar="MMAR_DIR", help="the MMAR folder")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="override config or environment keys, e.g. epochs=10 train#batch_size=4 DATASET_JSON=/data/ds.json",
    )
    parser.add_argument("--file_root", "--file-root", dest="file_root",
                        help="base folder of the datalist's relative paths (overrides image_base_dir / DATA_ROOT)")


def open_archive(args: argparse.Namespace, *, for_validation: bool = False) -> Archive:
    return load_archive(args.mmar, args.overrides, for_validation=for_validation, file_root=args.file_root)
