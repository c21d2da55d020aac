"""`mmar export DIR [--ckpt models/model.ckpt] [--formats torchscript,onnx,tensorrt] [--precision fp32|fp16]
[--input-shape 1,1,96,96,96]`: see mmar.export."""

from __future__ import annotations

import argparse

from mmar.commands._common import add_archive_arguments, gate_passes, locked, open_archive
from mmar.report import write_result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mmar export",
        description="Export the trained model to TorchScript, ONNX and (with tensorrt and a CUDA GPU) TensorRT in "
        "models/, each checked against PyTorch on the same inputs; models/export.json records the results.",
    )
    add_archive_arguments(parser)
    parser.add_argument("--ckpt", help="the checkpoint to export (default: models/model.ckpt)")
    parser.add_argument("--formats", default="torchscript,onnx,tensorrt",
                        help="comma-separated: torchscript, onnx, tensorrt (default: all; tensorrt is skipped "
                        "with a message where it cannot be built)")
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                        help="precision of the TensorRT engine (TorchScript and ONNX keep the fp32 weights)")
    parser.add_argument("--input-shape", "--input_shape", dest="input_shape",
                        help="N,C,H,W[,D] (default: 1, network in_channels, spatial_size from the config)")
    parser.add_argument("--tolerance", type=float,
                        help="max abs difference allowed against PyTorch, as a fraction of max(1, max |output|) "
                        "(default 1e-3 for fp32, 5e-2 for fp16)")
    args = parser.parse_args(argv)
    with locked("export", args, argv):
        archive = open_archive(args)
        if not gate_passes("export", archive, args.ckpt):
            return 0
        from mmar.export import export, parse_formats, parse_input_shape

        shape = parse_input_shape(args.input_shape) if args.input_shape else None
        write_result(export(archive, ckpt=args.ckpt, formats=parse_formats(args.formats), precision=args.precision,
                            input_shape=shape, tolerance=args.tolerance))
    return 0
