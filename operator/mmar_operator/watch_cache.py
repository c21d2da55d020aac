"""What the operator knows of each unfinished MMARJob and its Jobs from the watch, without asking the API
server (a child Job's event is reconciled from it: no GET, no LIST)."""

from __future__ import annotations

import copy
import threading
from collections import defaultdict
from typing import Any, Mapping

from mmar_operator import render, status


class WatchCache:
    """Each MMARJob's latest body from the watch, the status its last reconcile left on the API server (this
    operator is the status's only writer, and the watch may not have brought that write back yet), and the
    latest body of each Job labelled with its name. A status is known only after a reconcile of this process
    succeeded (a failure forgets it), so after a start the first one reads. Finished MMARJobs are not kept
    (their Jobs rarely change again): memory grows with the unfinished ones. A Job missing here (seen before
    its MMARJob) looks uncreated: creating it meets 409 and finds it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._bodies: dict[tuple[str, str], Mapping[str, Any]] = {}
        self._status: dict[tuple[str, str], dict[str, Any]] = {}
        self._jobs: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = defaultdict(dict)

    def saw_mmarjob(self, body: Mapping[str, Any]) -> None:
        if ((body.get("status") or {}).get("phase")) in status.TERMINAL:
            return
        with self._guard:
            self._bodies[(body["metadata"]["namespace"], body["metadata"]["name"])] = body

    def saw_job(self, body: Mapping[str, Any], deleted: bool) -> None:
        meta = body["metadata"]
        parent = (meta["namespace"], meta["labels"][render.LABEL_JOB])
        with self._guard:
            if deleted:
                self._jobs.get(parent, {}).pop(meta["name"], None)
            elif parent in self._bodies:
                self._jobs[parent][meta["name"]] = body

    def left_status(self, namespace: str, name: str, current: dict[str, Any] | None) -> None:
        """What the API server now holds as the MMARJob's status (None: not known)."""
        if current is not None and current.get("phase") in status.TERMINAL:
            self.forget(namespace, name)
            return
        with self._guard:
            if current is None:
                self._status.pop((namespace, name), None)
            else:
                self._status[(namespace, name)] = current

    def mmarjob(self, namespace: str, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """The MMARJob (with the status we left) and its Jobs, or None when this process does not know them."""
        with self._guard:
            body, current = self._bodies.get((namespace, name)), self._status.get((namespace, name))
            jobs = list(self._jobs.get((namespace, name), {}).values())
        if body is None or current is None:
            return None
        # the watch's own dicts, not copies (nothing here changes them; `reconcile` copies what it changes)
        return {**body, "status": copy.deepcopy(current)}, jobs

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            self._bodies.pop((namespace, name), None)
            self._status.pop((namespace, name), None)
            self._jobs.pop((namespace, name), None)
