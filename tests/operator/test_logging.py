"""The operator CLI prints each log line once (kopf's handler only), at the level `-v` asks for."""

from __future__ import annotations

import os
import subprocess
import sys

# main() as the CLI runs it, with kopf.run replaced by a few log lines (no cluster needed); in a subprocess,
# so that the root logger starts as a fresh interpreter's does
SCRIPT = """
import logging, sys
import kopf
from mmar_operator import __main__ as cli

def run(**_):
    logging.getLogger("kopf.objects").info("kopf-info-line")
    logging.getLogger("mmar_operator.handlers").info("operator-info-line")
    logging.getLogger("mmar_operator.handlers").debug("operator-debug-line")
    logging.getLogger("mmar_operator.apply").warning("operator-warning-line")
    body = {"apiVersion": "mmar.dev/v1alpha1", "kind": "MMARJob", "metadata": {"namespace": "radiology", "name": "spleen"}}
    kopf.ObjectLogger(body=body, settings=kopf.OperatorSettings()).info("Handler 'mmarjob' succeeded.")

kopf.run = run
sys.exit(cli.main(sys.argv[1:]))
"""


def run_cli(*args: str) -> str:
    # port 0: any free port (the metrics server starts before kopf.run)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "-n", "ns", *args], capture_output=True, text=True,
                          env={**os.environ, "MMAR_OPERATOR_METRICS_PORT": "0"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_each_line_is_printed_once_at_info():
    out = run_cli()
    for line in ("kopf-info-line", "operator-info-line", "operator-warning-line"):
        assert out.count(line) == 1, out
    assert "operator-debug-line" not in out


def test_verbose_adds_debug_lines_once():
    out = run_cli("-v")
    for line in ("kopf-info-line", "operator-info-line", "operator-debug-line", "operator-warning-line"):
        assert out.count(line) == 1, out


def test_kopf_lines_about_an_object_name_it():
    """kopf's per-object lines (100 MMARJobs: hundreds of `Handler 'mmarjob' succeeded.`) say which one."""
    out = run_cli()
    assert out.count("[radiology/spleen] Handler 'mmarjob' succeeded.") == 1, out
