"""What the commands that read an MMAR share: their archive arguments, and the MMAR's lock and quality gate,
both taken after the command's own parser has read its argv.

Lock and gate follow the parse, not a second reading of argv beside it: argparse decides which word is
MMAR_DIR (abbreviated options such as `--fine` for `--finetune`, `--opt=value`, a new on/off flag before
MMAR_DIR), so the folder locked is the folder the command works on. Abbreviations are kept on purpose
(argparse's default, what Clara's scripts and users type); they cannot skip the lock.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Iterator, Sequence

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


@contextlib.contextmanager
def locked(command: str, args: argparse.Namespace, argv: Sequence[str]) -> Iterator[None]:
    """Hold the lock of the MMAR `args.mmar` (as the command's parser read it) for the block; the holder's
    record names `mmar COMMAND ARGV...`. Temp files of writers that died are removed under it (mmar.lock)."""
    from mmar.lock import mmar_lock

    with mmar_lock(Path(args.mmar), " ".join([command, *argv])):
        yield


def gate_passes(command: str, archive: Archive, ckpt: str | None = None, kind: str = "ckpt") -> bool:
    """The pending `mmar --gate` (none: True) for a command that will load `ckpt` (default: the MMAR's own
    model of that format). Decide it holding the lock; False: skipped, the command returns 0 at once."""
    from mmar import gate

    if gate.PENDING is None:
        return True
    from mmar.predict import default_checkpoint, normalize_kind

    kind = normalize_kind(kind)
    model = Path(ckpt) if ckpt else default_checkpoint(archive, kind)
    return gate.passes(command, archive, model, kind)
