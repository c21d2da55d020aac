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
    if up.returncode != 0:
        raise SystemExit(f"control-plane up failed ({up.returncode}): {up.stderr[-2000:]}")
    try:
        yield str(state / "kubeconfig")
    finally:
        subprocess.run([str(CONTROL_PLANE), "down", str(state)], capture_output=True, env=env)
        shutil.rmtree(state, ignore_errors=True)


def install_crd(kubeconfig: str) -> None:
    k = [kubectl(), "--kubeconfig", kubeconfig]
    subprocess.run([*k, "apply", "-f", str(ROOT / "crds")], check=True, capture_output=True)
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


class Operator:
    """`python -m mmar_operator -n NS` as a subprocess, its peak memory sampled in a thread."""

    def __init__(self, kubeconfig: str, namespace: str, log_path: Path, source: str | None = None):
        env = {**os.environ, "KUBECONFIG": kubeconfig, "MMAR_OPERATOR_METRICS_PORT": str(free_port()),
               "MMAR_OPERATOR_LIVENESS_PORT": str(free_port())}
        if source:  # another copy of the mmar_operator package (--compare), ahead of the installed one
            env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "mmar_operator", "-n", namespace], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
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


def api_requests(api_client) -> Counter:
    """The API server's own count of the requests it served so far, by (verb, resource, subresource),
    of clients other than the control plane's (`system_client` is empty for the operator, this benchmark
    and kubectl); watches are left out (long-running: counted when they start)."""
    response = api_client.rest_client.request("GET", f"{api_client.configuration.host}/metrics", headers={"Accept": "text/plain"})
    response.read()
    counts: Counter = Counter()
    for line in response.data.decode().splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels, value = line[len("apiserver_request_total{"):].rsplit("} ", 1)
        fields = {k: v.strip('"') for k, v in (part.split("=", 1) for part in labels.split('",') if "=" in part)}
        if fields.get("system_client") or fields.get("verb") == "WATCH" or fields.get("resource") not in OPERATOR_RESOURCES:
            continue
        counts[(fields["verb"], fields["resource"], fields.get("subresource", ""))] += int(float(value))
    return counts


def operator_requests(before: Counter, after: Counter, n: int, mode: str) -> Counter:
    """The operator's requests between the two counts: everything of the non-system clients but the
    benchmark's (one create per MMARJob) and kubectl's (a read and a create per object)."""
    delta = Counter({key: after[key] - before[key] for key in after})
    delta[("POST", "mmarjobs", "")] -= n
    if mode == "apply":
        delta[("GET", "mmarjobs", "")] -= n
    return Counter({key: count for key, count in delta.items() if count > 0})


# ------------------------------------------------------------------------------------------- clients


def apply_from_clients(kubeconfig: str, names: list[str], namespace: str, clients: int) -> dict[str, float]:
    """C threads, each with its own API connection, creating its share one after the other."""
    from kubernetes import client, config

    sent: dict[str, float] = {}
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


def one_run(kubeconfig: str, mode: str, n: int, clients: int, index: int, workdir: Path, settle: float, timeout: float,
            source: str | None = None) -> Result:
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=kubeconfig)
    core = client.CoreV1Api(api_client)
    namespace = f"bench-operator-{os.getpid()}-{index}"
    core.create_namespace({"metadata": {"name": namespace}})
    arrivals, stop = Arrivals(), threading.Event()
    operator = Operator(kubeconfig, namespace, workdir / f"{namespace}.log", source)
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
        requests_before = api_requests(api_client)
        cpu_before = cpu_seconds(operator.proc.pid)
        names = [f"bench-{i:04d}" for i in range(n)]
        if mode == "clients":
            sent = apply_from_clients(kubeconfig, names, namespace, clients)
        else:
            sent = apply_with_kubectl(kubeconfig, names, namespace, workdir)
        applied = time.monotonic() - min(sent.values())  # how busy the API server is, for the reader
        complete = arrivals.wait_for(set(names), time.monotonic() + timeout)
        operator.check_alive()
        cpu = cpu_seconds(operator.proc.pid) - cpu_before
        time.sleep(settle)  # a late duplicate (a replayed event, a resync) would show up here
        with arrivals.lock:
            got = [m for m in names if m in arrivals.first_child]
            from_request = [arrivals.first_child[m] - sent[m] for m in got]
            from_arrival = [arrivals.first_child[m] - arrivals.mmarjobs[m] for m in got if m in arrivals.mmarjobs]
            until_all = (max(arrivals.first_child[m] for m in got) - min(sent.values())) if complete else float("nan")
        requests = operator_requests(requests_before, api_requests(api_client), n, mode)
        stop.set()
        listed = client.BatchV1Api(api_client).list_namespaced_job(namespace, label_selector=LABEL_JOB)
        per_parent = Counter(j.metadata.labels[LABEL_JOB] for j in listed.items)
        duplicates = sum(count - 1 for count in per_parent.values() if count > 1)
        for t in threads:
            t.join(timeout=10)
        return Result(mode, from_request, from_arrival, until_all, operator.peak_rss_kb / 1024, operator.hwm_kb / 1024,
                      cpu, applied, requests, duplicates, n - len(got))
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
        install_crd(kubeconfig)
        print(f"cluster: {kubeconfig}; {args.jobs} MMARJobs per run, {args.repeats} repeats, modes {' '.join(args.modes)}"
              f" ({args.clients} clients); nproc {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
        for repeat in range(args.repeats):  # modes (and variants) alternate, so that a busy moment of the machine hits all
            for (label, source), mode in [(v, m) for v in (variants if repeat % 2 == 0 else variants[::-1]) for m in args.modes]:
                key = f"{label}{mode}"
                result = one_run(kubeconfig, mode, args.jobs, args.clients, sum(map(len, results.values())),
                                 workdir, args.settle, args.timeout, source)
                results[key].append(result)
                print(f"  run {repeat + 1} {label}{describe(result)}", flush=True)
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
