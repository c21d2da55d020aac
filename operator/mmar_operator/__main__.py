"""`mmar-operator` (or `python -m mmar_operator`): run the kopf operator with its metrics and liveness endpoints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmar_operator.config import Config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmar-operator", description="Run MMARJob steps as Kubernetes Jobs.")
    parser.add_argument("-n", "--namespace", action="append", default=[],
                        help="namespace to watch (repeatable; default: $MMAR_OPERATOR_NAMESPACES, else the whole cluster)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--render", metavar="MANIFEST", type=Path,
                        help="print the objects the operator would create for MANIFEST's steps as YAML, and exit")
    parser.add_argument("--step", metavar="NAME", help="with --render: only this step")
    return parser


def render_manifest(path: Path, step: str | None, config: Config) -> str:
    """What the operator would create for each step of a manifest (no cluster needed)."""
    import yaml

    from mmar import job as contract
    from mmar.errors import MMARError

    from mmar_operator import render

    body = contract.load(path)
    body.setdefault("metadata", {}).setdefault("namespace", "default")
    body["metadata"].setdefault("uid", "00000000-0000-0000-0000-000000000000")  # set by the API server
    job = contract.parse(body)
    names = [s["name"] for s in contract.steps_of(job)]
    if step is not None and step not in names:
        raise MMARError(f"--step {step}: no such step in {path} (steps: {', '.join(names)})")
    objects = [obj for i, name in enumerate(names) if step in (None, name) for obj in render.render_step(job, i, config)]
    return yaml.safe_dump_all(objects, sort_keys=False, width=120)


def configure_logging(verbose: bool) -> None:
    """One handler on the root logger, kopf's, at INFO or, with -v, DEBUG; each of kopf's per-object lines
    prefixed with the object's `[namespace/name]` (`log_prefix`: kopf's default leaves it out, so its
    `Handler 'mmarjob' succeeded.` named nothing). Not also `logging.basicConfig`: that is a second root
    handler, so every line printed twice."""
    import kopf

    kopf.configure(verbose=verbose, log_prefix=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = Config.from_env()
    if args.render is not None:
        from mmar.errors import MMARError

        try:
            sys.stdout.write(render_manifest(args.render, args.step, config))
        except MMARError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    configure_logging(args.verbose)

    import kopf  # imported here so `--help` works without the operator extras

    from mmar_operator import handlers  # registers its handlers with kopf's default registry

    handlers.STATE.config = config
    handlers.STATE.metrics.serve(config.metrics_port)
    namespaces = args.namespace or list(config.namespaces)
    kopf.run(
        # one replica (the chart runs a Deployment of 1, strategy Recreate): no peering objects to manage
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{config.liveness_port}/healthz",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
