"""`mmar init DIR --task segmentation --datalist PATH`"""

from __future__ import annotations

import argparse

from mmar.scaffold import init
from mmar.tasks import TASKS


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmar init", description="Scaffold an MMAR folder for a datalist.")
    parser.add_argument("mmar", metavar="MMAR_DIR")
    parser.add_argument("--task", choices=TASKS, default="segmentation")
    parser.add_argument("--datalist", required=True, help="the datalist JSON (becomes DATASET_JSON)")
    parser.add_argument("--epochs", type=int, help="override the recipe's default number of epochs")
    parser.add_argument("--force", action="store_true", help="rewrite the configs of an existing MMAR")
    parser.add_argument("--exist-ok", action="store_true", help="leave an existing MMAR untouched (exit 0)")
    args = parser.parse_args(argv)
    init(args.mmar, task=args.task, datalist=args.datalist, force=args.force, exist_ok=args.exist_ok,
         epochs=args.epochs)
    return 0
