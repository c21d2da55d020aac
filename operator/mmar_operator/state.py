"""The operator's state: the API wrapper, settings and metrics, the event filter and the watch cache, and the
per-MMARJob work queue (one reconcile at a time, a burst of events coalesced, failed and refused reconciles
remembered for the resync)."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any, Mapping

from mmar_operator import status
from mmar_operator.apply import Cluster
from mmar_operator.config import Config
from mmar_operator.event_filter import EventFilter
from mmar_operator.metrics import Metrics
from mmar_operator.watch_cache import WatchCache

RETRY_MAX_SECONDS = 300.0  # the longest wait between two tries of a create the API server refused (403)
# a step's create refused for now: retried by the resync with back-off
RETRIED_REASONS = (status.JOB_CREATE_FAILED, status.CHILD_NAME_CONFLICT)


class OperatorState:
    """What the handlers need, set at startup (or by tests)."""

    def __init__(self) -> None:
        self.cluster: Cluster | None = None
        self.config = Config.from_env()
        self.metrics = Metrics()
        self.events = EventFilter()
        self.cache = WatchCache()
        self._locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()
        self._waiting: set[tuple[str, str]] = set()  # MMARJobs with a reconcile waiting for their lock
        # MMARJobs whose last reconcile failed: the resync retries them (kopf retries no on.event handler),
        # finished ones too (e.g. a step appended after success)
        self.failed: set[tuple[str, str]] = set()
        # MMARJobs whose next step's create is refused for now (403: a quota; its name taken): (retries so far,
        # when the resync tries again, time.monotonic()); each retry waits twice as long, up to RETRY_MAX_SECONDS
        self.refused: dict[tuple[str, str], tuple[int, float]] = {}

    def retry_due(self, key: tuple[str, str], now: float) -> bool:
        with self._guard:
            return key not in self.refused or self.refused[key][1] <= now

    def after_retry(self, key: tuple[str, str], current: Mapping[str, Any] | None, interval: float, now: float) -> None:
        """Back off the resync of an MMARJob whose step's create is refused (see `retry_due`)."""
        refused = any(s.get("phase") == status.PENDING and s.get("reason") in RETRIED_REASONS
                      for s in (current or {}).get("steps") or [])
        with self._guard:
            if not refused:
                self.refused.pop(key, None)
                return
            retries = self.refused.get(key, (0, now))[0] + 1
            self.refused[key] = (retries, now + min(RETRY_MAX_SECONDS, interval * 2 ** (retries - 1)))

    def enqueue(self, namespace: str, name: str) -> bool:
        """False when a reconcile of this MMARJob already waits for its lock: that one reads the cluster
        after it gets the lock, so it also sees whatever prompted this call (a burst of child events
        makes one reconcile, not one each)."""
        with self._guard:
            if (namespace, name) in self._waiting:
                return False
            self._waiting.add((namespace, name))
            return True

    def started(self, namespace: str, name: str) -> None:
        with self._guard:
            self._waiting.discard((namespace, name))

    def lock(self, namespace: str, name: str) -> threading.Lock:
        # kopf serializes handlers per object, but a child Job's event and the MMARJob's own handler
        # may run at once in the thread pool: one reconcile per MMARJob at a time.
        with self._guard:
            return self._locks[(namespace, name)]
