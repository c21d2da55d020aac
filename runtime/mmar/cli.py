"""The `mmar` command line: dispatch, and what every command shares as a process.

Each command lives in `mmar.commands.<name>` and is imported only when asked for, so `mmar run` and
`mmar convert` start without importing torch. Every command module exposes `main(argv) -> int`.

Shared here: SIGTERM (Kubernetes stopping a pod) and SIGINT (Ctrl-C) end a command with a message and exit
status 128 + signal, after the atomic writes in flight have been undone (`mmar.stop`); an error is one
`error:` line and the command's failure result. The commands that write an MMAR (`LOCKING`) hold its lock
(`mmar.lock`), and the gated ones decide `--gate` (`mmar.gate`), themselves, right after their own
argparse parser has read argv (`mmar.commands._common`): only it knows which word is the MMAR.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys

from mmar import __version__
from mmar.errors import user_error
from mmar.stop import STOP, Stopped, stop_in_chain

COMMANDS = {
    "init": "scaffold an MMAR folder (configs, commands/, models/, eval/)",
    "train": "train (or --finetune) the MMAR's model on its datalist",
    "validate": "compute metrics against ground truth -> eval/metrics.json",
    "infer": "predict every image of a datalist -> eval/",
    "export": "export the model to TorchScript / ONNX / TensorRT",
    "convert": "convert DICOM / NIfTI / MHA to (isotropic) NIfTI",
    "pull": "query a DICOMweb server (QIDO-RS), retrieve series (WADO-RS), convert them, write a datalist",
    "push": "store the DICOM Segmentations `infer --dicom-seg` wrote to a DICOMweb server (STOW-RS)",
    "run": "run an MMARJob manifest's steps on this machine",
    "demo-data": "generate a small synthetic dataset with its datalist",
}
LOCKING = ("train", "validate", "infer", "export")  # the commands that write models/ or eval/ (they lock it)
SELF_GATED = ("infer", "export")  # they decide a pending --gate after their own parse (commands._common)

GATE_OPTION = "--gate"  # `mmar --gate 'METRIC>=X' infer|export|push ...` (mmar.gate)


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"mmar {__version__}: Medical Model ARchive runtime", "",
             "usage: mmar [--gate 'METRIC>=X'] COMMAND [ARGS...]", ""]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "`mmar COMMAND --help` describes a command.", "",
              "--gate 'METRIC>=X' (or 'METRIC<=X'), before infer, export or push: run the command only if the MMAR's",
              "last validation (eval/metrics.json) reaches the bar and measured the very model the command uses;",
              "else skip it (exit 0). Quote it: the shell reads `>` as a redirect.",
              "  e.g. mmar --gate 'val_mean_dice>=0.85' infer my_mmar"]
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
    gate_text = None
    if argv[0] == GATE_OPTION:
        if len(argv) < 3:
            print(f"error: {GATE_OPTION} needs a value and a command, quoted (the shell reads `>` as a redirect): "
                  f"mmar {GATE_OPTION} 'val_mean_dice>=0.85' infer MMAR_DIR ...", file=sys.stderr)
            return 2
        gate_text, argv = argv[1], argv[2:]
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if as_program and name in LOCKING:
        STOP.install()
    try:
        if gate_text is not None and not _gate_set(gate_text, name, rest):
            return 0
        module = importlib.import_module(f"mmar.commands.{name.replace('-', '_')}")
        return int(module.main(rest) or 0)
    except Exception as error:  # noqa: BLE001 - a user error wrapped by MONAI / DataLoader stays readable
        stop = stop_in_chain(error) or STOP.raised
        if stop is not None:  # a stop signal landed inside a library, which reported its own failure instead
            return _stopped(name, stop, as_program)
        message = user_error(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        _report_failure(name, message)
        return _exit(1, as_program)
    except (Stopped, KeyboardInterrupt) as stop:
        return _stopped(name, stop, as_program)
    finally:
        if gate_text is not None:  # a gate a failed command never decided is not left for the next (in-process) one
            from mmar import gate

            gate.PENDING = None


def _stopped(name: str, stop: BaseException, as_program: bool) -> int:
    """A stop's line, result and exit status. The line may have nowhere to go (the `mmar run` that read this
    step's stderr was killed, and sent the stop as it died): the result and the exit status still do."""
    if isinstance(stop, Stopped):
        line = f"stopped by {signal.Signals(stop.signum).name}" + (f": {stop.detail}" if stop.detail else "")
        with contextlib.suppress(OSError):
            print(line, file=sys.stderr)
        _report_failure(name, line, signal.Signals(stop.signum).name)
        return _exit(stop.exit_status, as_program)
    with contextlib.suppress(OSError):
        print("interrupted", file=sys.stderr)
    _report_failure(name, "interrupted", "SIGINT")
    return 130


def _gate_set(text: str, name: str, rest: list[str]) -> bool:
    """Read `--gate TEXT` for the command `name` before it runs (a bad value fails before any work) and leave
    it pending for the command: infer and export decide it after their own parse, holding the MMAR's lock,
    with the model they will load (`commands._common.gate_passes`). push locks nothing and loads no model:
    its gate is decided here, against the MMAR's model.ckpt. False: skipped (exit 0)."""
    from mmar import gate

    gate.PENDING = gate.require(text, name)
    if name in SELF_GATED:
        return True
    archive = gate.archive_of(rest)
    return gate.passes(name, archive, archive.models_dir / gate.MODEL_FILE)


def _report_failure(command: str, line: str, signal_name: str | None = None) -> None:
    """The failure as the step's result (termination message): the operator and `mmar run` show this line
    whatever the log ends with. `mmar run` reports for its steps itself; convert reports its own."""
    if command in ("run", "convert"):
        return
    from mmar.report import write_failure

    with contextlib.suppress(OSError):
        write_failure(command, line, signal_name)


def _exit(status: int, as_program: bool) -> int:
    if as_program:
        # Worker threads of a failed data pipeline may still be alive; they must not turn a clean
        # error exit into an abort at interpreter shutdown. Every result file is written atomically,
        # so there is nothing to flush but the streams.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):  # a reader that is gone (EPIPE) must not change the status
                stream.flush()
        os._exit(status)
    return status
