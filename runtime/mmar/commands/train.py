"""`mmar train DIR [--finetune] [--restart] [--ckpt PATH] [--gpus N] [--set KEY=VALUE ...]`

A re-run resumes an unfinished run and leaves a finished one alone unless `epochs` is raised or
`--restart` is given (docs/runs.md). The MMAR's lock is held from the parse of argv on (`_common.locked`).

`--gpus N` (N > 1) re-launches this command under torchrun with N processes on this machine
(DistributedDataParallel, one process per GPU; on a machine without CUDA, N CPU processes with gloo,
which is how the multi-process path is tested). Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set, e.g. by
the operator's multi-node pods) the command joins the process group instead; see `mmar.distributed`.
"""

from __future__ import annotations

import argparse
import os
import signal

from mmar.commands._common import add_archive_arguments, locked, open_archive
from mmar.errors import MMARError, user_error
from mmar.report import write_result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmar train", description="Train the MMAR's model on its datalist.")
    add_archive_arguments(parser)
    parser.add_argument("--finetune", action="store_true",
                        help="start from models/model.ckpt (or --ckpt / PRETRAIN_WEIGHTS_FILE) with a fresh optimizer")
    parser.add_argument("--ckpt", help="initial weights (with --finetune: the checkpoint to fine-tune)")
    parser.add_argument("--restart", action="store_true",
                        help="start over even if models/ holds a finished or unfinished run; its models are moved to "
                             "models/previous/<UTC time>/, not deleted")
    parser.add_argument("--gpus", type=int, default=1, metavar="N",
                        help="data-parallel processes on this machine, one per GPU (torchrun; gloo CPU processes "
                             "where there is no GPU). train#batch_size is per process. Ignored under torchrun")
    args = parser.parse_args(argv)
    if args.gpus < 1:
        parser.error(f"--gpus must be >= 1, got {args.gpus}")
    with locked("train", args, argv):
        return _run(args, argv)


def _run(args, argv: list[str]) -> int:
    archive = open_archive(args)  # a config error is reported once, before any process is started
    if args.finetune:
        # no model to fine-tune (--ckpt, PRETRAIN_WEIGHTS_FILE, models/model.ckpt): one error before any work
        from mmar.archive import finetune_start

        finetune_start(archive, args.ckpt)
    from mmar import distributed

    if args.gpus > 1 and not distributed.under_torchrun():
        distributed.options(archive.config)  # the multi_gpu section is checked before N processes start
        # Ctrl-C reaches torchrun too; this process waits for it (and holds the MMAR's lock) until it ends
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return distributed.relaunch(args.gpus, ["train", *argv])
        finally:
            signal.signal(signal.SIGINT, previous)
    if distributed.under_torchrun():
        return _as_rank(archive, args)
    return _train(archive, args)


def _train(archive, args) -> int:
    from mmar.engine.train import train

    write_result(train(archive, finetune=args.finetune, ckpt=args.ckpt, restart=args.restart))
    return 0


def _as_rank(archive, args) -> int:
    """One rank of a torchrun job: its error is recorded for torchrun's failure summary and names the rank."""
    from torch.distributed.elastic.multiprocessing.errors import record

    rank = os.environ.get("RANK", "?")

    @record
    def run() -> int:
        try:
            return _train(archive, args)
        except Exception as error:  # noqa: BLE001 - only user errors (possibly wrapped by MONAI) are renamed
            message = user_error(error)
            if message is None:
                raise
            raise MMARError(message if message.startswith("rank ") else f"rank {rank}: {message}") from error

    return run()
