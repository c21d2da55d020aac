"""Find the external CLI tools (helm, kubectl, promtool, hadolint) the packaging tests use.

`.ci/tools.sh` installs them into `.tools/bin`; otherwise PATH is searched. A missing tool
skips the test, except under MMAR_REQUIRE_TOOLS=1 (CI), where it fails it: CI must not go
green by skipping the checks it exists to run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS_BIN = ROOT / ".tools" / "bin"


def require_tool(name: str) -> str:
    """Absolute path of tool `name`; skip (or fail under MMAR_REQUIRE_TOOLS=1) when it is missing."""
    local = TOOLS_BIN / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} not found in {TOOLS_BIN} or PATH (run `bash .ci/tools.sh`)"
    if os.environ.get("MMAR_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def run_tool(args: list[str], *, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a tool, returning the completed process (stdout/stderr as text); never raises on exit code."""
    return subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def promtool_check_metrics(exposition: str) -> subprocess.CompletedProcess:
    """`promtool check metrics` on a text exposition (lints names, units, help, suffixes)."""
    return run_tool([require_tool("promtool"), "check", "metrics"], input=exposition)
