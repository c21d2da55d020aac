"""The `mmar` command line: dispatch only.

Each command lives in `mmar.commands.<name>` and is imported only when asked for, so `mmar run` and
`mmar convert` start without importing torch. Every command module exposes `main(argv) -> int`.
"""

from __future__ import annotations

import importlib
import os
import sys

from mmar import __version__
from mmar.errors import user_error

COMMANDS = {
    "init": "scaffold an MMAR folder (configs, commands/, models/, eval/)",
    "train": "train (or --finetune) the MMAR's model on its datalist",
    "validate": "compute metrics against ground truth -> eval/metrics.json",
    "infer": "predict every image of a datalist -> eval/",
    "export": "export the model to TorchScript / ONNX / TensorRT",
    "convert": "convert DICOM / NIfTI / MHA to (isotropic) NIfTI",
    "run": "run an MMARJob manifest's steps on this machine",
    "demo-data": "generate a small synthetic dataset with its datalist",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"mmar {__version__}: Medical Model ARchive runtime", "", "usage: mmar COMMAND [ARGS...]", ""]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "`mmar COMMAND --help` describes a command."]
    return "\n".join(lines)


def quiet_optional_backends() -> None:
    """MONAI announces at import that NVIDIA's optional GPU image codec is absent; that is not news to a user."""
    import logging
    import warnings

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*NvImgCodecPydicomReader.*")


def main(argv: list[str] | None = None) -> int:
    quiet_optional_backends()
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"mmar.commands.{name.replace('-', '_')}")
    try:
        return int(module.main(rest) or 0)
    except Exception as error:  # noqa: BLE001 - a user error wrapped by MONAI / DataLoader stays readable
        message = user_error(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        if as_program:
            # Worker threads of a failed data pipeline may still be alive; they must not turn a clean
            # error exit into an abort at interpreter shutdown. Every result file is written atomically,
            # so there is nothing to flush but the streams.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
