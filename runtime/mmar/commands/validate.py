"""`mmar validate DIR [--ckpt PATH] [--model ckpt|ts|onnx|trt] [--allow-stale-export]`"""

from __future__ import annotations

import argparse

from mmar.commands._common import add_archive_arguments, locked, open_archive
from mmar.report import write_result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmar validate", description="Metrics against ground truth -> eval/.")
    add_archive_arguments(parser)
    parser.add_argument("--ckpt", help="checkpoint (default models/model.ckpt) or exported model file")
    parser.add_argument("--model", default="ckpt", help="model format: ckpt (default), ts, onnx, trt")
    parser.add_argument("--allow-stale-export", action="store_true",
                        help="use an exported model even when models/export.json says it was exported from another "
                        "checkpoint than the one now in its place (a loud warning instead of an error)")
    args = parser.parse_args(argv)
    with locked("validate", args, argv):
        archive = open_archive(args, for_validation=True)
        from mmar.engine.evaluate import validate

        write_result(validate(archive, ckpt=args.ckpt, model=args.model,
                              allow_stale_export=args.allow_stale_export))
    return 0
