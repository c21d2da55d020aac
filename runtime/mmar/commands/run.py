"""`mmar run JOB.yaml --volume CLAIM=/local/path ...`: run an MMARJob manifest's steps on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmar import job as contract
from mmar import local_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmar run",
        description="Run the steps of an MMARJob manifest here, in order, with the same commands the operator runs "
        "in its pods. Each PersistentVolumeClaim the manifest names is mapped to a local folder. SIGTERM or "
        "SIGINT (Ctrl-C) is passed on to the running step (SIGHUP, a closed terminal, stops it as SIGTERM does); the "
        "status file then records the job as Interrupted and the exit code is 128 + the signal's number (143, 130, "
        "129). A step never outlives this command: on Linux it is sent SIGTERM when `mmar run` dies, even by SIGKILL; "
        "the status file, which names its runner, then reads as Interrupted (RunnerLost), and the next `mmar run` of "
        "the job says so (it refuses to start while that runner still runs).",
    )
    parser.add_argument("manifest", type=Path, help="the MMARJob YAML")
    parser.add_argument("-v", "--volume", action="append", default=[], metavar="CLAIM=PATH",
                        help="map a claim to a local folder (repeatable; one per claim the manifest uses)")
    parser.add_argument("--status", type=Path, default=None,
                        help="where to write the status summary (default: <workspace folder>/<job name>.status.json)")
    parser.add_argument("--grace-period", type=float, default=local_run.GRACE_SECONDS, metavar="SECONDS",
                        help="after SIGTERM/SIGINT, how long the running step may take to stop before it and "
                        "its processes are killed (default: %(default)g, as a pod's terminationGracePeriodSeconds)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.grace_period < 0:
        parser.error(f"--grace-period must be >= 0, got {args.grace_period:g}")
    job = contract.parse(args.manifest)
    volumes = local_run.parse_volumes(args.volume)
    return local_run.run(job, volumes, status_path=args.status, dry_run=args.dry_run, grace_seconds=args.grace_period)
