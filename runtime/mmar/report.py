"""The result a command reports to whoever launched it.

On Kubernetes the pod's termination message (`/dev/termination-log`, read by the operator without any
extra RBAC) carries it; `mmar run` and tests point `MMAR_TERMINATION_LOG` at a file instead. The payload is
small JSON (the kubelet keeps at most 4096 bytes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DEFAULT_TERMINATION_LOG = "/dev/termination-log"
MAX_BYTES = 4096


def termination_log_path() -> Path | None:
    explicit = os.environ.get("MMAR_TERMINATION_LOG")
    if explicit:
        return Path(explicit)
    default = Path(DEFAULT_TERMINATION_LOG)
    if default.exists() and os.access(default, os.W_OK):
        return default
    return None


def write_result(result: dict[str, Any]) -> None:
    """Write `result` as the termination message, if there is somewhere to write it (rank 0 only)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    path = termination_log_path()
    if path is None:
        return
    payload = json.dumps(result, separators=(",", ":"), default=str)
    if len(payload.encode()) > MAX_BYTES:  # keep the essentials rather than a truncated, unparsable JSON
        payload = json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))}, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(payload)
