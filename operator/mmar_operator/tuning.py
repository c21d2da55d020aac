"""kopf's settings for a burst of MMARJobs (imported by `__main__`, which registers the startup handler).

kopf runs sync handlers in a thread pool whose default size is min(32, CPUs + 4): 6 threads on a 2-CPU
node. A reconcile is a few API round trips (a new MMARJob's: create its Job, patch its status; see
handlers.py) and little else: profiled with bench/operator_latency.py (100 MMARJobs from 16 clients), a
reconcile (of four round trips then) took 0.44 s, of it 0.10-0.17 s per round trip and a few ms of CPU, so
100 MMARJobs applied at once queued behind 6 threads. The pool is sized for a burst instead (Config.workers, MMAR_OPERATOR_WORKERS); idle threads cost
a stack of virtual memory, not resident memory (peak RSS 111 -> 123 MB at 64). `apply.Cluster.from_kubeconfig`
sizes its HTTP connection pool the same, so every thread keeps its own keep-alive connection instead of
opening a new one (TLS handshake and all) per call.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from mmar_operator.config import Config

log = logging.getLogger(__name__)


def tune(settings: kopf.OperatorSettings, config: Config) -> None:
    """Apply the throughput settings of `config` to kopf's `settings`."""
    settings.execution.max_workers = config.workers


@kopf.on.startup()
def _tune(settings: kopf.OperatorSettings, **_: Any) -> None:
    config = Config.from_env()
    tune(settings, config)
    log.debug("handler threads: %d", config.workers)
