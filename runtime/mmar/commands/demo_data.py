"""`mmar demo-data OUT [--task segmentation] [--cases N]`: a small synthetic dataset and its datalist."""

from __future__ import annotations

import argparse

from mmar.synthetic import write_segmentation_dataset


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmar demo-data", description="Generate a small synthetic dataset.")
    parser.add_argument("out", metavar="OUT")
    parser.add_argument("--task", choices=["segmentation", "classification"], default="segmentation")
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--size", type=int, default=32, help="edge length of the volumes / images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true",
                        help="segmentation: write anisotropic volumes under OUT/raw for `mmar convert -r 1` to resample")
    args = parser.parse_args(argv)
    if args.task == "segmentation":
        path = write_segmentation_dataset(args.out, cases=args.cases, size=args.size, seed=args.seed, raw=args.raw)
    else:
        from mmar.synthetic import write_classification_dataset

        path = write_classification_dataset(args.out, cases=args.cases, size=args.size, seed=args.seed)
    print(f"datalist: {path}")
    return 0
