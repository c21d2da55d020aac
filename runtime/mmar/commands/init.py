"""`mmar init DIR --task segmentation --datalist PATH`"""

from __future__ import annotations

import argparse

from mmar.errors import MMARError
from mmar.scaffold import init
from mmar.tasks import TASKS


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmar init", description="Scaffold an MMAR folder for a datalist.")
    parser.add_argument("mmar", metavar="MMAR_DIR")
    parser.add_argument("--task", choices=TASKS, default="segmentation")
    parser.add_argument("--datalist", required=True, help="the datalist JSON (becomes DATASET_JSON)")
    # read as text and checked below: a bad count is a one-line `error:` like a bad --set epochs=...
    parser.add_argument("--epochs", metavar="N", help="override the recipe's default number of epochs (1 or more)")
    parser.add_argument("--force", action="store_true", help="rewrite the configs of an existing MMAR")
    parser.add_argument("--exist-ok", action="store_true", help="leave an existing MMAR untouched (exit 0)")
    args = parser.parse_args(argv)
    init(args.mmar, task=args.task, datalist=args.datalist, force=args.force, exist_ok=args.exist_ok,
         epochs=None if args.epochs is None else epochs_argument(args.epochs))
    return 0


def epochs_argument(text: str) -> int:
    try:
        epochs = int(text)
    except ValueError:
        epochs = 0
    if epochs < 1:
        raise MMARError(f"mmar init --epochs {text}: expected a whole number of epochs, 1 or more (e.g. --epochs 100)")
    return epochs
