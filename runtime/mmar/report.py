"""The result a command reports to whoever launched it.

On Kubernetes the pod's termination message (`/dev/termination-log`, read by the operator without any
extra RBAC) carries it; `mmar run` and tests point `MMAR_TERMINATION_LOG` at a file instead. What a
result holds, per command, and how it is encoded within the kubelet's 4096 bytes is `mmar.results`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping

from mmar import results

DEFAULT_TERMINATION_LOG = "/dev/termination-log"
# the gate this command passed (`mmar --gate ...`, set by mmar.cli): its record goes into the command's result
GATE: dict[str, Any] | None = None


def termination_log_path() -> Path | None:
    explicit = os.environ.get("MMAR_TERMINATION_LOG")
    if explicit:
        return Path(explicit)
    default = Path(DEFAULT_TERMINATION_LOG)
    if default.exists() and os.access(default, os.W_OK):
        return default
    return None


def write_result(result: Mapping[str, Any]) -> None:
    """Check a command's result against its definition and write it as the termination message, if there is
    somewhere to write it (rank 0 only).

    The check comes first, on every rank and whether or not a message is written. A result that does not
    match `mmar.results` is a bug in the command: under MMAR_STRICT_RESULTS=1 (the test suite sets it) it
    raises ResultError, so tests catch it on any machine; in a user's run it is a warning and the result is
    written as read leniently, because the work it reports on (hours of training) is done and saved.
    """
    if GATE is not None and "gate" not in result:
        result = {**result, "gate": GATE}
    try:
        checked = results.check(result)
    except results.ResultError as error:
        if os.environ.get("MMAR_STRICT_RESULTS") == "1":
            raise
        print(f"warning: the {result.get('command')!r} result does not match mmar/results.py ({error}); "
              "reported without what does not match", file=sys.stderr)
        cls = results.definition_of(result)
        if cls is None:
            return
        checked = cls.from_dict(result, strict=False)
    _write(checked)


def write_failure(command: str, error: str, signal: str | None = None) -> None:
    """Report a command that stopped on an error (or a signal) with its one-line reason."""
    _write(results.failure(command, error, signal))


def _write(result: results.StepResult) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    path = termination_log_path()
    if path is None:
        return
    payload = results.encode(result)
    # not temp file + rename: /dev/termination-log is a file the kubelet bind-mounts, it cannot be replaced
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(payload, encoding="utf-8")
