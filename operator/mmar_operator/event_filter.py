"""Which MMARJob watch events need a reconcile (an in-memory filter in front of `reconcile`).

MMARJobs are watched with kopf.on.event, not on.create/on.update/on.resume: those make kopf diff a deep copy
of every event's body and PATCH its bookkeeping annotations onto every MMARJob (a third of the operator's
CPU and one request per MMARJob in bench/operator_latency.py). `EventFilter` tells the cases apart instead.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

CREATED, RESUMED, UPDATED = "created", "resumed", "updated"


def uid_of(meta: Mapping[str, Any]) -> str:
    return meta.get("uid") or f"{meta['namespace']}/{meta['name']}"


class EventFilter:
    """Which MMARJob events need a reconcile, from what this process last saw of each MMARJob (by uid): its
    generation (bumped by every spec edit) and labels (Kueue's pass through to the Jobs). Status changes,
    our own status patches included, need none. The first event of an MMARJob is a creation when it is an
    ADDED event without a status; otherwise (kopf's initial listing after a start, type None) a resume."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[Any, tuple[tuple[str, str], ...]]] = {}
        self._guard = threading.Lock()

    def classify(self, event_type: str | None, body: Mapping[str, Any]) -> str | None:
        meta = body["metadata"]
        signature = (meta.get("generation"), tuple(sorted((meta.get("labels") or {}).items())))
        with self._guard:
            before = self._seen.get(uid_of(meta))
            self._seen[uid_of(meta)] = signature
        if meta.get("deletionTimestamp"):
            return None  # being deleted: its children go with it
        if before is None:
            return CREATED if event_type == "ADDED" and not body.get("status") else RESUMED
        return UPDATED if before != signature else None

    def forget(self, uid: str) -> None:
        with self._guard:
            self._seen.pop(uid, None)
