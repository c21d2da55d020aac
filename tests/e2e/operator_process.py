"""The real operator (`python -m mmar_operator`) as a subprocess of an end-to-end test.

    with OperatorProcess(["my-ns"], kubeconfig=path) as operator:   # started and ready
        ...
        operator.kill()          # SIGKILL, mid-run
        operator.start()         # again, same settings, a fresh log section
    print(operator.log_text())

Its metrics and liveness ports are free ports chosen at start, so several operators (of several tests or
helpers) run side by side. `kubeconfig` lets a test run it with other credentials (e.g. a ServiceAccount
token: exactly the RBAC the Helm chart grants); the process never sees the test's own KUBECONFIG then.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterable, Mapping

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_IMAGE = "ghcr.io/mmar-dev/mmar:e2e"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OperatorProcess:
    def __init__(self, namespaces: Iterable[str] = (), *, kubeconfig: str | None = None, image: str = DEFAULT_IMAGE,
                 resync_seconds: int = 2, env: Mapping[str, str] | None = None, verbose: bool = False,
                 ready_timeout: float = 60.0):
        self.namespaces = list(namespaces)
        self.kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
        self.image = image
        self.resync_seconds = resync_seconds
        self.extra_env = dict(env or {})
        self.verbose = verbose
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen | None = None
        self.metrics_port = self.liveness_port = 0
        self._log = tempfile.NamedTemporaryFile(mode="ab", prefix="mmar-operator-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)
        self.starts = 0

    # ----------------------------------------------------------------------------------------- lifecycle

    def command(self) -> list[str]:
        argv = [sys.executable, "-m", "mmar_operator"]
        for namespace in self.namespaces:
            argv += ["-n", namespace]
        return argv + (["-v"] if self.verbose else [])

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMAR_OPERATOR_")}
        env.pop("KUBECONFIG", None)
        if self.kubeconfig:
            env["KUBECONFIG"] = self.kubeconfig
        env.update({
            "MMAR_OPERATOR_DEFAULT_IMAGE": self.image,
            "MMAR_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "MMAR_OPERATOR_LIVENESS_PORT": str(self.liveness_port),
            "MMAR_OPERATOR_RESYNC_SECONDS": str(self.resync_seconds),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        return env

    def start(self) -> "OperatorProcess":
        """Start (or restart after terminate/kill) and wait until ready; its output goes to the log file."""
        if self.running():
            raise RuntimeError(f"the operator is already running (pid {self.process.pid})")
        self.metrics_port, self.liveness_port = free_port(), free_port()
        self.starts += 1
        self._log.write(f"===== start {self.starts}: {' '.join(self.command())}\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(self.command(), env=self.environment(), cwd=ROOT, stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Ready: the liveness endpoint answers (kopf serves it once its startup handlers have run)."""
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.process.returncode} before it was ready:\n{self.log_text()[-4000:]}")
            if self.healthy():
                return
            time.sleep(0.1)
        raise RuntimeError(f"the operator was not ready within {self.ready_timeout:.0f}s:\n{self.log_text()[-4000:]}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (what Kubernetes sends a pod), wait for the exit; returns the exit code."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 10.0) -> int:
        """SIGKILL: no cleanup at all (an OOM kill, a node lost)."""
        return self._signal(signal.SIGKILL, timeout)

    def _signal(self, signum: int, timeout: float) -> int:
        if self.process is None:
            raise RuntimeError("the operator was never started")
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
                raise RuntimeError(f"the operator did not exit within {timeout:.0f}s of {signal.Signals(signum).name}:\n{self.log_text()[-4000:]}")
        self._log.write(f"===== exit {self.process.returncode} after {signal.Signals(signum).name}\n".encode())
        self._log.flush()
        return self.process.returncode

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.running():
            try:
                self.terminate()
            except RuntimeError:
                pass
        self._log.close()

    def __enter__(self) -> "OperatorProcess":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()
