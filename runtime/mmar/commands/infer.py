"""`mmar infer DIR [--ckpt PATH] [--model ckpt|ts|onnx|trt] [--key LIST] [--allow-stale-export] [--dicom-seg]`"""

from __future__ import annotations

import argparse

from mmar.commands._common import add_archive_arguments, gate_passes, locked, open_archive
from mmar.report import write_result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmar infer", description="Predict every image of a datalist list -> eval/.")
    add_archive_arguments(parser)
    parser.add_argument("--ckpt", help="checkpoint (default models/model.ckpt) or exported model file")
    parser.add_argument("--model", default="ckpt", help="model format: ckpt (default), ts, onnx, trt")
    parser.add_argument("--allow-stale-export", action="store_true",
                        help="use an exported model even when models/export.json says it was exported from another "
                        "checkpoint than the one now in its place (a loud warning instead of an error)")
    parser.add_argument("--key", help="datalist list to predict (default: infer#datalist_key, 'validation')")
    parser.add_argument("--dicom-seg", action="store_true",
                        help="also write a DICOM Segmentation (<case>_seg.dcm beside the NIfTI) for every entry that "
                        "names its source series ('dicom', as `mmar pull` writes it); `mmar push` stores them")
    args = parser.parse_args(argv)
    with locked("infer", args, argv):
        return _infer(args)


def _infer(args: argparse.Namespace) -> int:
    archive = open_archive(args, for_validation=True)
    if not gate_passes("infer", archive, args.ckpt, args.model):
        return 0
    cases = None
    if args.dicom_seg:  # checked before the model runs: a bad source folder fails in seconds
        from mmar.pacs.predictions import plan

        cases = plan(archive, args.key)
        if not cases:
            print("warning: --dicom-seg: no entry of the list names its source series ('dicom'): no DICOM SEG written")
    from mmar.engine.evaluate import infer

    result = infer(archive, ckpt=args.ckpt, model=args.model, list_key=args.key,
                   allow_stale_export=args.allow_stale_export)
    if cases is not None:
        from mmar.pacs.predictions import write_segs

        result["dicom_segs"] = len(write_segs(archive, cases)) if cases else 0
    write_result(result)
    return 0
