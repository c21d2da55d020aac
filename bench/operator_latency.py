#!/usr/bin/env python
"""Benchmark: N MMARJobs applied at once; how long until the operator has created each one's first Job.

    .venv/bin/python bench/operator_latency.py               # 100 jobs, 16 parallel clients and one kubectl apply
    .venv/bin/python bench/operator_latency.py -n 100 -c 16 --repeats 3 --modes clients

Uses the cluster of $KUBECONFIG (or --kubeconfig) when it answers, else starts the repository's real control
plane (`../shared/k8s/control-plane up`, PORT_BASE from --port-base; stopped again at the end). Installs the
CRD, then per run: a fresh namespace, the real operator (`python -m mmar_operator -n NS`, a subprocess on
free metrics/liveness ports), one warm-up MMARJob (the operator's watches are up once its Job appears), then
N single-step MMARJobs created either from C parallel API clients (each its own connection, N/C each, one
after the other) or in one `kubectl apply -f` of a multi-document file (the baseline mode, printed in the
same run because the machine is shared and noisy).

Measured per MMARJob, from watch arrival times in this process (creation timestamps have one-second
resolution): the latency from the client's request (kubectl's start in the one-apply mode) to its first
child Job's ADDED event, and from the MMARJob's own ADDED event to that Job's (the operator's share alone).
Per run: p50/p95/max, the time from the first request until every MMARJob has a Job, the operator's peak RSS
(the sum of VmRSS over its process tree, sampled every 20 ms, and the main process's VmHWM), and duplicate
children (Jobs beyond one per MMARJob, counted after a settling pause: must be 0). Medians over the repeats.
Goal: p95 < 1 s for N=100 from 16 clients, peak RSS < 200 MB.

Two figures that depend less on how busy the machine is: the operator's CPU seconds over the burst, and its
API requests per MMARJob (from the API server's apiserver_request_total, watches aside, the benchmark's and
kubectl's own requests taken out; --show-requests breaks them down by verb and resource).

Where the time goes (docs/operator-latency.md), per run (--no-stages: none of it but the CPU line):
- the stages of each MMARJob's request->Job (STAGES: the create answered and seen by the operator's watch,
  kopf's dispatch, a handler thread, the Job's POST, this benchmark's watch), median and p95, timed from
  outside the operator's code: the operator runs as `python -c TRACER` (kopf's watch stream and handler
  invocation and urllib3's requests wrapped, then `python -m mmar_operator` as is), one clock for all;
  how many handler threads were used and how many handlers waited for one; how late kopf's event loop woke;
- each process's CPU seconds and run-queue wait over the burst (/proc/PID/task/*/schedstat: runnable but
  waiting for a CPU), for the operator, the control plane's processes (when it was started by
  `control-plane up`: their run/*.pid) and this benchmark;
- the API server's own view: apiserver_request_duration_seconds of the MMARJob and Job creates and the status
  patches, the API Priority and Fairness queue wait per priority level, etcd's request durations and its
  disk (WAL fsync, backend commit from etcd's /metrics), before and after the burst.
--workers sets the operator's MMAR_OPERATOR_WORKERS (its handler threads); --crds installs another CRD folder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from mmar_operator.apply import PLURAL, VERSION
from mmar_operator.render import GROUP, LABEL_JOB  # the parent MMARJob's name on every child

ROOT = Path(__file__).resolve().parents[1]
CONTROL_PLANE = ROOT.parent / "shared" / "k8s" / "control-plane"
GOAL_P95_S, GOAL_RSS_MB = 1.0, 200.0


def kubectl() -> str:
    local = ROOT / ".tools" / "bin" / "kubectl"
    found = str(local) if local.exists() else shutil.which("kubectl")
    if not found:
        raise SystemExit("kubectl not found (neither .tools/bin/kubectl nor on PATH)")
    return found


def mmarjob(name: str, namespace: str) -> dict[str, Any]:
    """The smallest MMARJob: one single-pod step, so its first child is one Job (no Service)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "MMARJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"mmar": {"claimName": "ws"}, "data": {"claimName": "data"}, "gpusPerNode": 0, "steps": [{"type": "validate"}]},
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p95 of 100 values is the 95th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, -(-len(ordered) * q // 100) - 1))] if ordered else float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------- cluster


def cluster_answers(kubeconfig: str) -> bool:
    if not Path(kubeconfig).is_file():
        return False
    done = subprocess.run([kubectl(), "--kubeconfig", kubeconfig, "--request-timeout=5s", "get", "--raw", "/readyz"],
                          capture_output=True, text=True)
    return done.returncode == 0


@contextlib.contextmanager
def control_plane(kubeconfig: str | None, port_base: int) -> Iterator[str]:
    """$KUBECONFIG's cluster when it answers; else a control plane of our own, stopped afterwards."""
    if kubeconfig and cluster_answers(kubeconfig):
        yield kubeconfig
        return
    if not CONTROL_PLANE.exists():
        raise SystemExit(f"no cluster at KUBECONFIG={kubeconfig!r} and no {CONTROL_PLANE} to start one")
    state = Path(tempfile.mkdtemp(prefix="bench-operator-k8s-"))
    env = {**os.environ, "PORT_BASE": str(port_base)}
    up = subprocess.run([str(CONTROL_PLANE), "up", str(state)], capture_output=True, text=True, env=env)
    if up.returncode != 0:  # what it did start (etcd, the API server) is stopped again, the ports freed
        subprocess.run([str(CONTROL_PLANE), "down", str(state)], capture_output=True, env=env)
        raise SystemExit(f"control-plane up failed ({up.returncode}): {up.stderr[-2000:]}")
    try:
        yield str(state / "kubeconfig")
    finally:
        subprocess.run([str(CONTROL_PLANE), "down", str(state)], capture_output=True, env=env)
        shutil.rmtree(state, ignore_errors=True)


def install_crd(kubeconfig: str, crds: Path = ROOT / "crds") -> None:
    k = [kubectl(), "--kubeconfig", kubeconfig]
    done = subprocess.run([*k, "apply", "-f", str(crds)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kubectl apply -f {crds} failed: {done.stderr[-2000:]}")
    subprocess.run([*k, "wait", "--for=condition=Established", "--timeout=60s", f"crd/{PLURAL}.{GROUP}"], check=True, capture_output=True)


# ------------------------------------------------------------------------------------------ operator


def tree_rss_kb(pid: int) -> int:
    """VmRSS of `pid` and all its descendants, kB (0 once gone)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pending.extend(int(c) for c in children)
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far (its threads included)."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def vm_hwm_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting on a run queue) of `pid`, its threads summed, from
    /proc/PID/task/*/schedstat (its first two fields, ns). Threads that have exited are not counted, so
    take it while the process runs. (0, 0) when gone."""
    on_cpu = waiting = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (task / "schedstat").read_text().split()
                on_cpu, waiting = on_cpu + int(fields[0]), waiting + int(fields[1])
    return on_cpu / 1e9, waiting / 1e9


# Run as `python -c TRACER -n NS` instead of `python -m mmar_operator -n NS` (--no-stages: not): the same
# operator, with four timestamps per object taken from outside its code (kopf's and urllib3's functions are
# wrapped before mmar_operator is imported). All are time.monotonic() (CLOCK_MONOTONIC, one clock for every
# process of the machine, so comparable with this benchmark's own), written to $BENCH_OPERATOR_TRACE:
#   W  t  plural  type  name                         kopf's watch stream yielded the event (in its event loop)
#   H  dispatched  started  ended  thread  handler  type  kind  name
#                                                    a sync handler handed to kopf's thread pool, begun in a
#                                                    thread of it, returned
#   L  t  lag                                        kopf's event loop woke up `lag` s after a 20 ms sleep was due
#   R  sent  answered  thread  method  path  parent  an API request of the operator's own client (urllib3:
#                                                    sent .. response headers in); parent: the MMARJob label of
#                                                    a created object's body (the Job's parent), else "-"
TRACER = r"""
import atexit, functools, os, re, runpy, threading, time
_out = open(os.environ["BENCH_OPERATOR_TRACE"], "w")
_lines, _lock = [], threading.Lock()
def _put(*fields):
    with _lock:
        _lines.append("\t".join(map(str, fields)))
def _flush():
    with _lock:
        taken = _lines[:]
        del _lines[:]
    if taken:
        _out.write("\n".join(taken) + "\n")
        _out.flush()
def _flusher():
    while True:
        time.sleep(0.2)
        _flush()
threading.Thread(target=_flusher, daemon=True, name="bench-trace").start()
atexit.register(_flush)

import urllib3.connectionpool as _cp
_label = re.compile(re.escape('"%s"' % os.environ["BENCH_OPERATOR_TRACE_LABEL"]) + r'\s*:\s*"([^"]+)"')
_urlopen = _cp.HTTPConnectionPool.urlopen
def urlopen(self, method, url, *args, **kwargs):
    body = kwargs.get("body", args[0] if args else None)
    parent = "-"
    if method == "POST" and isinstance(body, (str, bytes)):
        found = _label.search(body if isinstance(body, str) else body.decode("utf-8", "replace"))
        parent = found.group(1) if found else "-"
    sent = time.monotonic()
    try:
        return _urlopen(self, method, url, *args, **kwargs)
    finally:
        _put("R", sent, time.monotonic(), threading.get_ident(), method, url.split("?")[0], parent)
_cp.HTTPConnectionPool.urlopen = urlopen

from kopf._cogs.clients import watching as _watching
from kopf._core.actions import invocation as _invocation
_watch = _watching.infinite_watch
_lagging = []
async def _lag():
    import asyncio
    while True:
        due = time.monotonic() + 0.02
        await asyncio.sleep(0.02)
        now = time.monotonic()
        _put("L", now, now - due)
async def infinite_watch(*, resource, **kwargs):
    if not _lagging:
        import asyncio
        _lagging.append(asyncio.get_running_loop().create_task(_lag()))
    async for event in _watch(resource=resource, **kwargs):
        if isinstance(event, dict) and isinstance(event.get("object"), dict):
            _put("W", time.monotonic(), resource.plural, event.get("type"), (event["object"].get("metadata") or {}).get("name"))
        yield event
_watching.infinite_watch = infinite_watch
_invoke = _invocation.invoke
async def invoke(fn, *args, **kwargs):
    if _invocation.is_async_fn(fn):
        return await _invoke(fn, *args, **kwargs)
    dispatched = time.monotonic()
    @functools.wraps(fn)
    def traced(*a, **kw):
        started = time.monotonic()
        try:
            return fn(*a, **kw)
        finally:
            event = kw.get("event") or {}
            obj = event.get("object") if isinstance(event, dict) else None
            obj = obj if isinstance(obj, dict) else {}
            _put("H", dispatched, started, time.monotonic(), threading.get_ident(), getattr(fn, "__name__", "?"),
                 event.get("type", "-") if isinstance(event, dict) else "-", obj.get("kind", "-"), kw.get("name") or "-")
    return await _invoke(traced, *args, **kwargs)
_invocation.invoke = invoke

runpy.run_module("mmar_operator", run_name="__main__", alter_sys=True)
"""


class Operator:
    """`python -m mmar_operator -n NS` as a subprocess, its peak memory sampled in a thread."""

    def __init__(self, kubeconfig: str, namespace: str, log_path: Path, source: str | None = None,
                 trace_path: Path | None = None, workers: int | None = None, own_session: bool = False):
        env = {**os.environ, "KUBECONFIG": kubeconfig, "MMAR_OPERATOR_METRICS_PORT": str(free_port()),
               "MMAR_OPERATOR_LIVENESS_PORT": str(free_port())}
        if source:  # another copy of the mmar_operator package (--compare), ahead of the installed one
            env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
        if workers:  # kopf's handler threads (and the client's connection pool): Config.workers
            env["MMAR_OPERATOR_WORKERS"] = str(workers)
        self.log_path, self.trace_path = log_path, trace_path
        self._log = log_path.open("w")
        entry = ["-m", "mmar_operator"]
        if trace_path is not None:  # the same operator, its stages timed from outside (TRACER)
            env.update(BENCH_OPERATOR_TRACE=str(trace_path), BENCH_OPERATOR_TRACE_LABEL=LABEL_JOB)
            entry = ["-c", TRACER]
        # own_session: its own session, so its own scheduler autogroup (kernel.sched_autogroup_enabled=1 shares
        # the CPU between sessions first), as in a cluster, where it has its own container
        self.proc = subprocess.Popen([sys.executable, *entry, "-n", namespace], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=own_session)
        self.peak_rss_kb = 0
        self.hwm_kb = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            self.peak_rss_kb = max(self.peak_rss_kb, tree_rss_kb(self.proc.pid))
            self.hwm_kb = max(self.hwm_kb, vm_hwm_kb(self.proc.pid))
            self._stop.wait(0.02)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(f"the operator exited ({self.proc.returncode}); its log: {self.log_path}\n"
                             + self.log_path.read_text()[-3000:])

    def stop(self) -> None:
        self._stop.set()
        self._sampler.join()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# --------------------------------------------------------------------------------------------- watch


@dataclass
class Arrivals:
    """When this process saw each MMARJob and each child Job appear (monotonic seconds)."""

    mmarjobs: dict[str, float] = field(default_factory=dict)
    first_child: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def wait_for(self, names: set[str], deadline: float) -> bool:
        with self.changed:
            while not names <= self.first_child.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
            return True


def watch(list_fn, arrivals: Arrivals, on_added, stop: threading.Event, **kwargs: Any) -> None:
    """ADDED events of one list call, from its current resourceVersion on, until `stop`."""
    from kubernetes import watch as kwatch

    listed = list_fn(**kwargs)  # typed lists are models, custom-object lists plain dicts
    version = listed["metadata"]["resourceVersion"] if isinstance(listed, dict) else listed.metadata.resource_version
    while not stop.is_set():
        w = kwatch.Watch()
        for event in w.stream(list_fn, resource_version=version, timeout_seconds=5, **kwargs):
            now = time.monotonic()
            obj = event["object"]
            meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata
            version = meta["resourceVersion"] if isinstance(meta, dict) else meta.resource_version
            if event["type"] == "ADDED":
                with arrivals.changed:
                    on_added(meta, now)
                    arrivals.changed.notify_all()
            if stop.is_set():
                w.stop()
                break


def start_watches(api_client, namespace: str, arrivals: Arrivals, stop: threading.Event) -> list[threading.Thread]:
    from kubernetes import client

    batch, custom = client.BatchV1Api(api_client), client.CustomObjectsApi(api_client)

    def job_added(meta, now: float) -> None:
        parent = (meta.labels or {}).get(LABEL_JOB)
        if parent:
            arrivals.first_child.setdefault(parent, now)

    def mmarjob_added(meta, now: float) -> None:
        arrivals.mmarjobs.setdefault(meta["name"], now)

    threads = [
        threading.Thread(target=watch, args=(batch.list_namespaced_job, arrivals, job_added, stop), kwargs={"namespace": namespace}, daemon=True),
        threading.Thread(target=watch, args=(custom.list_namespaced_custom_object, arrivals, mmarjob_added, stop),
                         kwargs={"group": GROUP, "version": VERSION, "namespace": namespace, "plural": PLURAL}, daemon=True),
    ]
    for t in threads:
        t.start()
    return threads


# ------------------------------------------------------------------------------------- API requests

OPERATOR_RESOURCES = {"mmarjobs", "jobs", "pods", "services", "events"}


def scrape(api_client) -> str:
    """The API server's /metrics, as text."""
    response = api_client.rest_client.request("GET", f"{api_client.configuration.host}/metrics", headers={"Accept": "text/plain"})
    response.read()
    return response.data.decode()


def samples(text: str, family: str) -> Iterator[tuple[dict[str, str], float]]:
    """(labels, value) of each sample of a metric `family` (e.g. `x_bucket`, `x_sum`) in a /metrics text."""
    prefix = family + "{"
    for line in text.splitlines():
        if line.startswith(prefix):
            labels, value = line[len(prefix):].rsplit("} ", 1)
            yield {k: v.strip('"') for k, v in (part.split("=", 1) for part in labels.split('",') if "=" in part)}, float(value)
        elif line.startswith(family + " "):  # a series without labels
            yield {}, float(line.split()[1])


def api_requests(api_client, text: str | None = None) -> Counter:
    """The API server's own count of the requests it served so far, by (verb, resource, subresource),
    of clients other than the control plane's (`system_client` is empty for the operator, this benchmark
    and kubectl); watches are left out (long-running: counted when they start)."""
    counts: Counter = Counter()
    for fields, value in samples(scrape(api_client) if text is None else text, "apiserver_request_total"):
        if fields.get("system_client") or fields.get("verb") == "WATCH" or fields.get("resource") not in OPERATOR_RESOURCES:
            continue
        counts[(fields["verb"], fields["resource"], fields.get("subresource", ""))] += int(value)
    return counts


# the requests on the way from an MMARJob to its Job, timed by the API server itself
SERVER_REQUESTS = {"POST mmarjobs": ("POST", "mmarjobs", ""), "POST jobs": ("POST", "jobs", ""),
                   "PATCH mmarjobs/status": ("PATCH", "mmarjobs", "status")}


def histogram_delta(before: str, after: str, family: str, match) -> tuple[float, float, dict[float, float]]:
    """(count, sum, {le: count}) of the observations of histogram `family` between two scrapes, of the
    series whose labels `match` (a predicate) accepts, summed over them."""
    def totals(text: str) -> tuple[float, float, Counter]:
        count = sum(v for f, v in samples(text, family + "_count") if match(f))
        total = sum(v for f, v in samples(text, family + "_sum") if match(f))
        buckets: Counter = Counter()
        for f, v in samples(text, family + "_bucket"):
            if match(f):
                buckets[float(f["le"])] += v
        return count, total, buckets
    c0, s0, b0 = totals(before)
    c1, s1, b1 = totals(after)
    return c1 - c0, s1 - s0, {le: b1[le] - b0.get(le, 0) for le in b1}


def histogram_quantile(buckets: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding quantile q (like PromQL's, without the interpolation)."""
    total = buckets.get(float("inf"), max(buckets.values(), default=0))
    for le in sorted(buckets):
        if total and buckets[le] >= q * total:
            return le
    return float("nan")


def etcd_url(apiserver_pid: int | None) -> str | None:
    """etcd's client URL, from the API server's --etcd-servers (its /metrics: plain http on loopback)."""
    with contextlib.suppress(OSError, TypeError):
        for arg in Path(f"/proc/{apiserver_pid}/cmdline").read_bytes().split(b"\0"):
            if arg.startswith(b"--etcd-servers="):
                url = arg.split(b"=", 1)[1].decode().split(",")[0]
                return url if url.startswith("http://") else None
    return None


def scrape_etcd(url: str | None) -> str:
    import urllib.request

    if not url:
        return ""
    with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        return response.read().decode()
    return ""


def etcd_side(before: str, after: str) -> dict[str, tuple[float, float, float]]:
    """etcd's own disk latency over the burst: (count, mean, p95 bucket bound) of its WAL fsyncs and backend
    commits (every write waits for one WAL fsync; a slow or shared disk shows here)."""
    out = {}
    for label, family in (("WAL fsync", "etcd_disk_wal_fsync_duration_seconds"), ("backend commit", "etcd_disk_backend_commit_duration_seconds")):
        count, total, buckets = histogram_delta(before, after, family, lambda f: True)
        if count:
            out[label] = (count, total / count, histogram_quantile(buckets, 0.95))
    return out


def server_side(before: str, after: str) -> dict[str, Any]:
    """What the API server and etcd say about the burst: per request kind of SERVER_REQUESTS its count, mean
    and p95 (bucket bound) of apiserver_request_duration_seconds (the server's whole handling, admission and
    the etcd write included, the wait in an API Priority and Fairness queue too); per APF priority level the
    requests dispatched and their mean queue wait (apiserver_flowcontrol_request_wait_duration_seconds); the
    mean of etcd_request_duration_seconds per operation."""
    out: dict[str, Any] = {"requests": {}, "apf": {}, "etcd": {}}
    for label, (verb, resource, sub) in SERVER_REQUESTS.items():
        count, total, buckets = histogram_delta(before, after, "apiserver_request_duration_seconds", lambda f, v=verb, r=resource, s=sub:
                                                f.get("verb") == v and f.get("resource") == r and f.get("subresource", "") == s)
        out["requests"][label] = (count, total / count if count else float("nan"), histogram_quantile(buckets, 0.95))
    levels = {f.get("priority_level") for f, _ in samples(after, "apiserver_flowcontrol_dispatched_requests_total")}
    for level in sorted(filter(None, levels)):
        dispatched = (sum(v for f, v in samples(after, "apiserver_flowcontrol_dispatched_requests_total") if f.get("priority_level") == level)
                      - sum(v for f, v in samples(before, "apiserver_flowcontrol_dispatched_requests_total") if f.get("priority_level") == level))
        count, total, buckets = histogram_delta(before, after, "apiserver_flowcontrol_request_wait_duration_seconds",
                                                lambda f, lv=level: f.get("priority_level") == lv)
        if dispatched or count:
            out["apf"][level] = (dispatched, count, total / count if count else 0.0, histogram_quantile(buckets, 0.95) if count else 0.0)
    for operation in ("create", "update", "get", "list"):
        count, total, _ = histogram_delta(before, after, "etcd_request_duration_seconds", lambda f, o=operation: f.get("operation") == o)
        if count:
            out["etcd"][operation] = (count, total / count)
    return out


def operator_requests(before: Counter, after: Counter, n: int, mode: str) -> Counter:
    """The operator's requests between the two counts: everything of the non-system clients but the
    benchmark's (one create per MMARJob) and kubectl's (a read and a create per object)."""
    delta = Counter({key: after[key] - before[key] for key in after})
    delta[("POST", "mmarjobs", "")] -= n
    if mode == "apply":
        delta[("GET", "mmarjobs", "")] -= n
    return Counter({key: count for key, count in delta.items() if count > 0})


# ------------------------------------------------------------------------------------------- clients


def apply_from_clients(kubeconfig: str, names: list[str], namespace: str, clients: int,
                       answered: dict[str, float] | None = None) -> dict[str, float]:
    """C threads, each with its own API connection, creating its share one after the other. Returns when
    each request was sent; `answered` (when given) gets when each was answered."""
    from kubernetes import client, config

    sent: dict[str, float] = {}
    answered = {} if answered is None else answered
    shares = [names[i::clients] for i in range(clients)]
    apis = [client.CustomObjectsApi(config.new_client_from_config(config_file=kubeconfig)) for _ in shares]
    barrier = threading.Barrier(len(shares))
    errors: list[BaseException] = []

    def run(api, share: list[str]) -> None:
        try:
            barrier.wait()
            for name in share:
                sent[name] = time.monotonic()
                api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mmarjob(name, namespace))
                answered[name] = time.monotonic()
        except BaseException as error:  # noqa: BLE001 - reported by the caller
            errors.append(error)

    threads = [threading.Thread(target=run, args=(api, share)) for api, share in zip(apis, shares)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"a client failed: {errors[0]}")
    return sent


def apply_with_kubectl(kubeconfig: str, names: list[str], namespace: str, workdir: Path) -> dict[str, float]:
    manifest = workdir / f"{namespace}.yaml"
    manifest.write_text(yaml.safe_dump_all([mmarjob(n, namespace) for n in names]))
    start = time.monotonic()
    done = subprocess.run([kubectl(), "--kubeconfig", kubeconfig, "apply", "-f", str(manifest)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kubectl apply failed: {done.stderr[-2000:]}")
    return {n: start for n in names}


# ------------------------------------------------------------------------------------------------ run


@dataclass
class Result:
    mode: str
    from_request: list[float]
    from_arrival: list[float]
    until_all: float
    rss_mb: float
    hwm_mb: float
    cpu_s: float  # the operator's CPU time from the first request until every MMARJob had its Job
    applied_s: float  # from the first request until the last one was answered
    requests: Counter  # the operator's API requests by (verb, resource, subresource) (watches aside) from the first request to the end of the settling pause
    duplicates: int
    missing: int
    stages: dict[str, list[float]] = field(default_factory=dict)  # STAGES' per-MMARJob durations (with the trace)
    sched: dict[str, tuple[float, float]] = field(default_factory=dict)  # process -> (CPU s, run-queue wait s) over the burst
    server: dict[str, Any] = field(default_factory=dict)  # server_side()
    threads: tuple[int, int, int] = (0, 0, 0)  # handler threads used, most handlers running at once, most waiting for a thread


# Where the time of an MMARJob's request->Job goes, in order (they add up to request->Job):
STAGES = {
    "to operator watch": "the client's create request sent -> the operator's watch yields the MMARJob's ADDED event",
    "kopf dispatch": "-> kopf hands the event's handler to its thread pool (its event loop: per-object worker, processing)",
    "thread start": "-> the handler runs in a pool thread (a free thread, the GIL, a CPU)",
    "to POST": "-> the Job's create request sent (the handler's own work before it)",
    "POST jobs": "-> its response (the API server's handling, APF, etcd, the operator's wait to read it)",
    "to bench watch": "-> this benchmark's watch yields the Job's ADDED event",
}


def read_trace(path: Path) -> dict[str, list[list[str]]]:
    records: dict[str, list[list[str]]] = {"W": [], "H": [], "R": [], "L": []}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            fields = line.split("\t")
            if fields and fields[0] in records:
                records[fields[0]].append(fields[1:])
    return records


def loop_lags(records: dict[str, list[list[str]]], start: float, end: float) -> list[float]:
    """How late kopf's event loop woke up from its 20 ms sleeps between `start` and `end` (its GIL and CPU wait)."""
    return [float(lag) for t, lag in records["L"] if start <= float(t) <= end]


def watch_after_answer(records: dict[str, list[list[str]]], answered: dict[str, float]) -> list[float]:
    """Per MMARJob, the operator's watch event's time minus the create's answer at the client (< 0: before)."""
    watched = {name: float(t) for t, plural, kind, name in reversed(records["W"]) if plural == PLURAL and kind == "ADDED"}
    return [watched[m] - answered[m] for m in answered if m in watched]


def stages_of(records: dict[str, list[list[str]]], names: list[str], sent: dict[str, float],
              first_child: dict[str, float]) -> tuple[dict[str, list[float]], tuple[int, int, int]]:
    """Per stage of STAGES, each traced MMARJob's duration; and (handler threads used, most handlers running at
    once, most dispatched but not yet running) over the burst."""
    watched: dict[str, float] = {}
    for t, plural, kind, name in records["W"]:
        if plural == PLURAL and kind == "ADDED":
            watched.setdefault(name, float(t))
    handled: dict[str, tuple[float, float]] = {}
    spans: list[tuple[float, float, float]] = []
    threads = set()
    wanted = set(names)
    for dispatched, started, ended, thread, _fn, kind, obj_kind, name in records["H"]:
        span = (float(dispatched), float(started), float(ended))
        if span[0] >= min(sent.values(), default=0):
            spans.append(span)
            threads.add(thread)
        if obj_kind == "MMARJob" and kind == "ADDED" and name in wanted and name not in handled:
            handled[name] = span[:2]
    posted: dict[str, tuple[float, float]] = {}
    for t0, t1, _thread, method, path, parent in records["R"]:
        if method == "POST" and path.endswith("/jobs") and parent in wanted:
            posted.setdefault(parent, (float(t0), float(t1)))
    stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for m in names:
        if not (m in watched and m in handled and m in posted and m in first_child):
            continue
        points = [sent[m], watched[m], *handled[m], *posted[m], first_child[m]]
        for stage, (a, b) in zip(STAGES, zip(points, points[1:])):
            stages[stage].append(b - a)
    running = waiting = 0
    if spans:
        marks = sorted([(d, 0, 1) for d, _, _ in spans] + [(st, 0, -1) for _, st, _ in spans])
        level = 0
        for _, _, step in marks:
            level += step
            waiting = max(waiting, level)
        marks = sorted([(st, 1) for _, st, _ in spans] + [(e, -1) for _, _, e in spans])
        level = 0
        for _, step in marks:
            level += step
            running = max(running, level)
    return stages, (len(threads), running, waiting)


def one_run(kubeconfig: str, mode: str, n: int, clients: int, index: int, workdir: Path, settle: float, timeout: float,
            source: str | None = None, trace: bool = True, workers: int | None = None,
            peers: dict[str, int] | None = None, own_session: bool = False) -> Result:
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=kubeconfig)
    core = client.CoreV1Api(api_client)
    namespace = f"bench-operator-{os.getpid()}-{index}"
    core.create_namespace({"metadata": {"name": namespace}})
    arrivals, stop = Arrivals(), threading.Event()
    operator = Operator(kubeconfig, namespace, workdir / f"{namespace}.log", source,
                        workdir / f"{namespace}.trace" if trace else None, workers, own_session)
    try:
        threads = start_watches(api_client, namespace, arrivals, stop)
        # the warm-up job: the operator's watches are up, its imports and client paid, once its Job appears
        client.CustomObjectsApi(api_client).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, mmarjob("warmup", namespace))
        deadline = time.monotonic() + 120
        while not arrivals.wait_for({"warmup"}, min(deadline, time.monotonic() + 1)):
            operator.check_alive()
            if time.monotonic() > deadline:
                raise SystemExit(f"the operator made no Job for the warm-up MMARJob in 120 s; its log: {operator.log_path}")
        time.sleep(1.0)  # let the warm-up's own status patch and child events pass
        operator.peak_rss_kb = 0  # the peak under load, not the start-up's
        metrics_before = scrape(api_client)
        requests_before = api_requests(api_client, metrics_before)
        processes = {"operator": operator.proc.pid, **(peers or {}), "benchmark": os.getpid()}
        etcd = etcd_url((peers or {}).get("apiserver"))
        etcd_before = scrape_etcd(etcd)
        answered: dict[str, float] = {}
        sched_before = {name: schedstat(pid) for name, pid in processes.items()}
        cpu_before = cpu_seconds(operator.proc.pid)
        names = [f"bench-{i:04d}" for i in range(n)]
        if mode == "clients":
            sent = apply_from_clients(kubeconfig, names, namespace, clients, answered)
        else:
            sent = apply_with_kubectl(kubeconfig, names, namespace, workdir)
        applied = time.monotonic() - min(sent.values())  # how busy the API server is, for the reader
        complete = arrivals.wait_for(set(names), time.monotonic() + timeout)
        operator.check_alive()
        cpu = cpu_seconds(operator.proc.pid) - cpu_before
        sched_after = {name: schedstat(pid) for name, pid in processes.items()}
        sched = {name: (sched_after[name][0] - sched_before[name][0], sched_after[name][1] - sched_before[name][1])
                 for name in processes}
        server = server_side(metrics_before, scrape(api_client))
        server["etcd disk"] = etcd_side(etcd_before, scrape_etcd(etcd))
        if answered:  # when the MMARJob's create was answered, against the operator's seeing it
            server["answered"] = [answered[m] - sent[m] for m in names if m in answered]
        time.sleep(settle)  # a late duplicate (a replayed event, a resync) would show up here
        with arrivals.lock:
            got = [m for m in names if m in arrivals.first_child]
            from_request = [arrivals.first_child[m] - sent[m] for m in got]
            from_arrival = [arrivals.first_child[m] - arrivals.mmarjobs[m] for m in got if m in arrivals.mmarjobs]
            until_all = (max(arrivals.first_child[m] for m in got) - min(sent.values())) if complete else float("nan")
        requests = operator_requests(requests_before, api_requests(api_client), n, mode)
        stages, threads_used = {}, (0, 0, 0)
        if operator.trace_path is not None:
            records = read_trace(operator.trace_path)
            stages, threads_used = stages_of(records, names, sent, dict(arrivals.first_child))
            burst_end = max(arrivals.first_child.get(m, 0.0) for m in names)
            server["loop lag"] = loop_lags(records, min(sent.values()), burst_end)
            server["watch - answer"] = watch_after_answer(records, answered)
            # both watches are fed by the same API server: when both are late, the API server's fan-out is
            server["operator watch - benchmark watch"] = watch_after_answer(records, dict(arrivals.mmarjobs))
        stop.set()
        listed = client.BatchV1Api(api_client).list_namespaced_job(namespace, label_selector=LABEL_JOB)
        per_parent = Counter(j.metadata.labels[LABEL_JOB] for j in listed.items)
        duplicates = sum(count - 1 for count in per_parent.values() if count > 1)
        for t in threads:
            t.join(timeout=10)
        return Result(mode, from_request, from_arrival, until_all, operator.peak_rss_kb / 1024, operator.hwm_kb / 1024,
                      cpu, applied, requests, duplicates, n - len(got), stages, sched, server, threads_used)
    finally:
        stop.set()
        operator.stop()
        delete_namespace(core, namespace)


def delete_namespace(core, namespace: str, timeout: float = 180.0) -> None:
    """Delete the run's namespace and wait until it is gone: the garbage collection of its hundreds of
    objects would otherwise load the API server during the next run."""
    from kubernetes.client.exceptions import ApiException

    with contextlib.suppress(ApiException):
        core.delete_namespace(namespace, propagation_policy="Background")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            core.read_namespace(namespace)
        except ApiException as error:
            if error.status == 404:
                return
            raise
        time.sleep(0.5)
    print(f"  (namespace {namespace} still terminating after {timeout:.0f} s)", file=sys.stderr)


def n_of(r: Result) -> int:
    return len(r.from_request) + r.missing


def describe(r: Result) -> str:
    p = lambda vs, q: percentile(vs, q)  # noqa: E731
    return (f"{r.mode:<8} request->Job p50 {p(r.from_request, 50):5.2f} p95 {p(r.from_request, 95):5.2f} max {max(r.from_request, default=float('nan')):5.2f} s"
            f" | MMARJob seen->Job p50 {p(r.from_arrival, 50):5.2f} p95 {p(r.from_arrival, 95):5.2f} s"
            f" | applied in {r.applied_s:5.2f} s, all {r.until_all:5.2f} s | operator CPU {r.cpu_s:5.2f} s, {r.requests.total() / n_of(r):4.1f} API requests per MMARJob | RSS peak {r.rss_mb:5.1f} MB (HWM {r.hwm_mb:5.1f}) | duplicates {r.duplicates}"
            + (f" | MISSING {r.missing}" if r.missing else ""))


def describe_stages(r: Result) -> list[str]:
    """The lines of the stage breakdown of one run (empty without the trace)."""
    lines = []
    if r.stages and any(r.stages.values()):
        traced = len(next(iter(r.stages.values())))
        lines.append(f"stages (median/p95 s, {traced} traced): " + " | ".join(
            f"{stage} {statistics.median(vs):.3f}/{percentile(vs, 95):.3f}" for stage, vs in r.stages.items() if vs))
        used, running, waiting = r.threads
        lines.append(f"handler threads: {used} used, at most {running} running and {waiting} dispatched-not-running at once")
    if r.sched:
        wall = r.until_all if r.until_all == r.until_all else r.applied_s
        lines.append(f"over the burst ({wall:.2f} s), CPU / run-queue wait s: " + ", ".join(
            f"{name} {cpu:.2f}/{wait:.2f}" for name, (cpu, wait) in r.sched.items()))
    if r.server:
        lines.append("API server: " + ", ".join(f"{label} {count:.0f} mean {mean * 1000:.0f} ms p95<={p95 * 1000:.0f} ms"
                                             for label, (count, mean, p95) in r.server["requests"].items())
                     + " | APF wait by priority level: " + (", ".join(
                         f"{level} {dispatched:.0f} dispatched, mean {mean * 1000:.1f} ms p95<={p95 * 1000:.0f} ms"
                         for level, (dispatched, _, mean, p95) in r.server["apf"].items()) or "none")
                     + " | etcd requests mean: " + ", ".join(f"{op} {count:.0f} {mean * 1000:.1f} ms" for op, (count, mean) in r.server["etcd"].items())
                     + "".join(f" | etcd {label} {count:.0f} mean {mean * 1000:.1f} ms p95<={p95 * 1000:.0f} ms"
                               for label, (count, mean, p95) in r.server.get("etcd disk", {}).items()))
        outside = []  # a request's time at its client beyond the API server's: TLS, loopback, the client's wait for a CPU and the GIL
        if r.server.get("answered"):
            vs = r.server["answered"]
            outside.append(f"the MMARJob creates at the benchmark's clients median {statistics.median(vs):.3f} p95 {percentile(vs, 95):.3f}"
                           f" mean {statistics.fmean(vs):.3f} s vs mean {r.server['requests']['POST mmarjobs'][1]:.3f} s at the API server")
        if r.stages.get("POST jobs"):
            vs = r.stages["POST jobs"]
            outside.append(f"the Job creates at the operator mean {statistics.fmean(vs):.3f} s vs {r.server['requests']['POST jobs'][1]:.3f} s at the API server")
        if outside:
            lines.append("; ".join(outside))
        if r.server.get("watch - answer"):
            vs = r.server["watch - answer"]
            lines.append(f"the operator's watch event after the create's answer: median {statistics.median(vs):.3f} p95 {percentile(vs, 95):.3f} s")
        if r.server.get("operator watch - benchmark watch"):
            vs = r.server["operator watch - benchmark watch"]
            lines.append(f"the operator's watch event after the benchmark's (same MMARJob): median {statistics.median(vs):.3f} p95 {percentile(vs, 95):.3f} s")
        if r.server.get("loop lag"):
            vs = r.server["loop lag"]
            lines.append(f"kopf's event loop late to wake from a 20 ms sleep: median {statistics.median(vs) * 1000:.0f} ms p95 {percentile(vs, 95) * 1000:.0f} ms max {max(vs) * 1000:.0f} ms ({len(vs)} sleeps)")
    return lines


def control_plane_pids(kubeconfig: str) -> dict[str, int]:
    """The PIDs of the control plane's processes when it was started by `control-plane up` (its run/*.pid
    beside the kubeconfig), for their CPU and run-queue wait; else none."""
    pids = {}
    for name, short in (("kube-apiserver", "apiserver"), ("etcd", "etcd"), ("kube-controller-manager", "controller-manager")):
        with contextlib.suppress(OSError, ValueError):
            pids[short] = int((Path(kubeconfig).parent / "run" / f"{name}.pid").read_text().strip())
    return pids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--jobs", type=int, default=100, help="MMARJobs per run (default 100)")
    parser.add_argument("-c", "--clients", type=int, default=16, help="parallel API clients in the clients mode (default 16)")
    parser.add_argument("--modes", nargs="+", choices=("clients", "apply"), default=["clients", "apply"],
                        help="clients: C parallel API clients; apply: one kubectl apply (the baseline)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="a cluster to use (default $KUBECONFIG)")
    parser.add_argument("--port-base", type=int, default=int(os.environ.get("PORT_BASE", "30443")),
                        help="PORT_BASE of the control plane started when no cluster answers (default $PORT_BASE or 30443)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait for late duplicates after the last Job")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every MMARJob's Job")
    parser.add_argument("--show-requests", action="store_true", help="print the operator's API requests by verb and resource")
    parser.add_argument("--keep-logs", action="store_true", help="keep the operator's logs (their folder is printed)")
    parser.add_argument("--crds", default=str(ROOT / "crds"), help="the CRD folder to install (default: the repository's crds/)")
    parser.add_argument("--no-stages", action="store_true",
                        help="run the operator as `python -m mmar_operator`, without the trace of its stages (STAGES)")
    parser.add_argument("--operator-session", action="store_true",
                        help="start the operator in a session of its own (its own CPU share under sched autogroup, not this benchmark's)")
    parser.add_argument("--workers", type=int, help="the operator's handler threads (MMAR_OPERATOR_WORKERS; default its own)")
    parser.add_argument("--compare", metavar="DIR",
                        help="also run, alternating with this tree's, the operator package in DIR/mmar_operator (e.g. a copy "
                             "of an older version): same machine, same moments, so the two are comparable")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.clients < 1 or args.repeats < 1:
        parser.error("--jobs, --clients and --repeats must be positive")
    workdir = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    if args.compare and not (Path(args.compare) / "mmar_operator" / "__main__.py").is_file():
        parser.error(f"--compare {args.compare}: no mmar_operator package there")
    variants = [("", None)] + ([(f"{args.compare}: ", str(Path(args.compare).resolve()))] if args.compare else [])
    results: dict[str, list[Result]] = {f"{label}{m}": [] for label, _ in variants for m in args.modes}
    with control_plane(args.kubeconfig, args.port_base) as kubeconfig:
        install_crd(kubeconfig, Path(args.crds))
        peers = control_plane_pids(kubeconfig)
        print(f"cluster: {kubeconfig}; {args.jobs} MMARJobs per run, {args.repeats} repeats, modes {' '.join(args.modes)}"
              f" ({args.clients} clients); nproc {os.cpu_count()}, load {os.getloadavg()[0]:.2f}"
              f"; operator workers {args.workers or os.environ.get('MMAR_OPERATOR_WORKERS') or 'default'}"
              + ("" if args.no_stages else "; stages traced") + ("; the operator in its own session" if args.operator_session else ""))
        for repeat in range(args.repeats):  # modes (and variants) alternate, so that a busy moment of the machine hits all
            for (label, source), mode in [(v, m) for v in (variants if repeat % 2 == 0 else variants[::-1]) for m in args.modes]:
                key = f"{label}{mode}"
                load = os.getloadavg()[0]
                result = one_run(kubeconfig, mode, args.jobs, args.clients, sum(map(len, results.values())),
                                 workdir, args.settle, args.timeout, source, not args.no_stages, args.workers, peers,
                                 args.operator_session)
                results[key].append(result)
                print(f"  run {repeat + 1} (load {load:.2f}) {label}{describe(result)}", flush=True)
                for line in describe_stages(result):
                    print(f"    {line}", flush=True)
                if args.show_requests:
                    print("    per MMARJob: " + ", ".join(f"{verb} {resource}{'/' + sub if sub else ''} {count / n_of(result):.2f}"
                                                      for (verb, resource, sub), count in result.requests.most_common()))
    print("medians over the repeats:")
    ok = True
    for key, rs in results.items():
        variant, mode = key.rsplit(" ", 1)[0] + " " if " " in key else "", key.rsplit(" ", 1)[-1]
        med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
        p50, p95 = med(lambda r: percentile(r.from_request, 50)), med(lambda r: percentile(r.from_request, 95))
        worst, until_all = med(lambda r: max(r.from_request, default=float("nan"))), med(lambda r: r.until_all)
        rss, dups, missing = max(r.rss_mb for r in rs), sum(r.duplicates for r in rs), sum(r.missing for r in rs)
        label = variant + (f"{args.clients} clients" if mode == "clients" else "1 kubectl apply")
        print(f"  {label:<16} p50 {p50:.2f} s  p95 {p95:.2f} s  max {worst:.2f} s  all {until_all:.2f} s"
              f"  | operator's share p95 {med(lambda r: percentile(r.from_arrival, 95)):.2f} s"
              f"  | operator CPU {med(lambda r: r.cpu_s):.2f} s, API requests per MMARJob {med(lambda r: r.requests.total() / n_of(r)):.1f}  | RSS peak {rss:.1f} MB  duplicates {dups}" + (f"  missing {missing}" if missing else ""))
        if all(r.stages and all(r.stages.values()) for r in rs):
            print("  " + " " * 16 + " stages, medians of the runs' median/p95 s: " + " | ".join(
                f"{stage} {med(lambda r, st=stage: statistics.median(r.stages[st])):.3f}/{med(lambda r, st=stage: percentile(r.stages[st], 95)):.3f}"
                for stage in STAGES))
        if mode == "clients" and not variant:
            goal = p95 < GOAL_P95_S and rss < GOAL_RSS_MB and dups == 0 and missing == 0
            ok &= goal
            print(f"  goal ({args.jobs} jobs, {args.clients} clients: p95 < {GOAL_P95_S:g} s, RSS < {GOAL_RSS_MB:g} MB, 0 duplicates): "
                  + ("met" if goal else "NOT met"))
        ok &= dups == 0 and missing == 0
    if args.keep_logs:
        print(f"operator logs: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
