"""The `mmar` command line: dispatch, and what every command shares as a process.

Each command lives in `mmar.commands.<name>` and is imported only when asked for, so `mmar run` and
`mmar convert` start without importing torch. Every command module exposes `main(argv) -> int`.

Shared here: the commands that write an MMAR (`LOCKING`) hold its lock (`mmar.lock`) and clean the temp
files of writers that died; SIGTERM (Kubernetes stopping a pod) and SIGINT (Ctrl-C) end a command with a
message and exit status 128 + signal, after the atomic writes in flight have been undone (`StopSignals`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator

from mmar import __version__
from mmar.errors import user_error

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
LOCKING = ("train", "validate", "infer", "export")  # the commands that write models/ or eval/
FLAGS = frozenset({"--finetune", "--restart", "--dicom-seg", "--allow-stale-export", "-h", "--help"})  # their options that take no value


GATE_OPTION = "--gate"  # `mmar --gate METRIC>=X infer|export|push ...` (mmar.gate)


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


class Stopped(BaseException):
    """A stop signal ended the command. A BaseException, as KeyboardInterrupt: no `except Exception` of a
    library swallows it, and every `finally` (the atomic writes' clean-up) runs on the way out."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(detail or f"stopped by {signal.Signals(signum).name}")
        self.signum, self.detail = signum, detail

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """SIGTERM and SIGINT raise `Stopped` where they land, unless a loop that can stop cleanly is running
    (`graceful()`, the training loop): that loop is asked to stop (`requested`) and stops at its next safe
    point, within a training or validation step. A second signal stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: int | None = None
        self._graceful = 0

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        if self._graceful and self.requested is None:
            self.requested = signum
            print(f"{signal.Signals(signum).name} received: stopping at the end of the current step "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)
            return
        raise Stopped(signum)

    @contextlib.contextmanager
    def graceful(self) -> Iterator[StopSignals]:
        self._graceful += 1
        try:
            yield self
        finally:
            self._graceful -= 1

    def name(self) -> str:
        return signal.Signals(self.requested).name if self.requested else ""


STOP = StopSignals()


def mmar_dir_of(argv: list[str]) -> Path | None:
    """The MMAR_DIR positional of a LOCKING command's argv, as its argparse parser will read it: every
    option of those commands takes one value except FLAGS, and `--set` takes values up to the next option."""
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "--":
            return Path(argv[index + 1]) if index + 1 < len(argv) else None
        if token.startswith("-") and len(token) > 1:
            if token in FLAGS or "=" in token:
                index += 1
            elif token == "--set":
                index += 1
                while index < len(argv) and not argv[index].startswith("-"):
                    index += 1
            else:
                index += 2
            continue
        return Path(token)
    return None


@contextlib.contextmanager
def mmar_lock(name: str, argv: list[str]) -> Iterator[None]:
    """The MMAR's lock for a LOCKING command, and the temp files of dead writers removed under it."""
    folder = mmar_dir_of(argv) if name in LOCKING else None
    if folder is None or not (folder / "config").is_dir():
        yield  # not an MMAR: the command reports that itself
        return
    from mmar.io import remove_stale_temp_files
    from mmar.lock import hold

    with hold(folder, " ".join([name, *argv])) as held:
        if held is not None:
            for sub in ("models", "eval"):
                for path in remove_stale_temp_files(folder / sub):
                    print(f"removed {path}: a temp file of a run that was killed while writing", flush=True)
        yield


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
    gate = None
    if argv[0] == GATE_OPTION:
        if len(argv) < 3:
            print(f"error: {GATE_OPTION} needs a value and a command: mmar {GATE_OPTION} val_mean_dice>=0.85 infer MMAR_DIR ...",
                  file=sys.stderr)
            return 2
        gate, argv = argv[1], argv[2:]
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if as_program and name in LOCKING:
        STOP.install()
    try:
        with mmar_lock(name, rest):
            if gate is not None and not _gate_passes(gate, name, rest):
                return 0
            module = importlib.import_module(f"mmar.commands.{name.replace('-', '_')}")
            return int(module.main(rest) or 0)
    except Exception as error:  # noqa: BLE001 - a user error wrapped by MONAI / DataLoader stays readable
        message = user_error(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        _report_failure(name, message)
        return _exit(1, as_program)
    except Stopped as stop:
        line = f"stopped by {signal.Signals(stop.signum).name}" + (f": {stop.detail}" if stop.detail else "")
        print(line, file=sys.stderr)
        _report_failure(name, line, signal.Signals(stop.signum).name)
        return _exit(stop.exit_status, as_program)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _report_failure(name, "interrupted", "SIGINT")
        return 130


def _gate_passes(text: str, name: str, rest: list[str]) -> bool:
    """Decide the gate (under the MMAR's lock, so a validation running beside it cannot change the answer
    half-way). Not passed: the skip is this command's result, exit 0. Passed: the command's own result will
    carry the gate's record (`mmar.report`)."""
    from mmar import gate, report

    record = gate.check(text, name, rest)
    if not record["passed"]:
        print(f"gate: {name} skipped: {record['message']}", flush=True)
        report.write_result({"command": name, "gate": record})
        return False
    print(f"gate: {record['message']}: running {name}", flush=True)
    report.GATE = record
    return True


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
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status
