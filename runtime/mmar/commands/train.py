"""`mmar train DIR [--finetune] [--ckpt PATH] [--set KEY=VALUE ...]`"""

from __future__ import annotations

import argparse

from mmar.commands._common import add_archive_arguments, open_archive
from mmar.report import write_result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmar train", description="Train the MMAR's model on its datalist.")
    add_archive_arguments(parser)
    parser.add_argument("--finetune", action="store_true",
                        help="start from models/model.ckpt (or --ckpt / PRETRAIN_WEIGHTS_FILE) with a fresh optimizer")
    parser.add_argument("--ckpt", help="initial weights (with --finetune: the checkpoint to fine-tune)")
    args = parser.parse_args(argv)
    archive = open_archive(args)
    from mmar.engine.train import train

    write_result(train(archive, finetune=args.finetune, ckpt=args.ckpt))
    return 0
