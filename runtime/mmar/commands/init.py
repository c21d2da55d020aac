"""`mmar init DIR --datalist PATH [--task segmentation|classification] [--file_root DIR] [--from-clara CLARA_MMAR]`"""

from __future__ import annotations

import argparse

from mmar.errors import MMARError
from mmar.scaffold import init
from mmar.tasks import TASKS


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmar init", description="Scaffold an MMAR folder for a datalist.")
    parser.add_argument("mmar", metavar="MMAR_DIR")
    parser.add_argument("--task", choices=TASKS,
                        help="default: told by the datalist (label_format or PNG images: classification; NIfTI: "
                             "segmentation)")
    parser.add_argument("--datalist", help="the datalist JSON (becomes DATASET_JSON; required unless --from-clara)")
    parser.add_argument("--file_root", "--file-root", "--data-root", dest="file_root", metavar="DIR",
                        help="the folder the datalist's relative paths are relative to, if not its own folder "
                             "(becomes DATA_ROOT; Clara's --file_root / image_base_dir)")
    parser.add_argument("--from-clara", metavar="CLARA_MMAR",
                        help="a Clara Train MMAR: its DATASET_JSON, DATA_ROOT, PROCESSING_TASK, epochs, learning_rate, "
                             "num_training_epoch_per_valid, amp, random seed and batch size are taken where not given "
                             "here (docs/clara-migration.md)")
    # read as text and checked below: a bad count is a one-line `error:` like a bad --set epochs=...
    parser.add_argument("--epochs", metavar="N", help="override the recipe's default number of epochs (1 or more)")
    parser.add_argument("--force", action="store_true", help="rewrite the configs of an existing MMAR")
    parser.add_argument("--exist-ok", action="store_true", help="leave an existing MMAR untouched (exit 0)")
    args = parser.parse_args(argv)
    if args.datalist is None and args.from_clara is None:
        parser.error("the following arguments are required: --datalist (or --from-clara CLARA_MMAR)")
    init(args.mmar, task=args.task, datalist=args.datalist, force=args.force, exist_ok=args.exist_ok,
         epochs=None if args.epochs is None else epochs_argument(args.epochs), file_root=args.file_root,
         from_clara=args.from_clara)
    return 0


def epochs_argument(text: str) -> int:
    try:
        epochs = int(text)
    except ValueError:
        epochs = 0
    if epochs < 1:
        raise MMARError(f"mmar init --epochs {text}: expected a whole number of epochs, 1 or more (e.g. --epochs 100)")
    return epochs
