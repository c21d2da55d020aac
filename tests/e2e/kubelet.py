"""A kubelet stand-in for the end-to-end tests: plays the node side of a real control plane that has none.

The control plane of `tests/e2e/with-cluster.sh` (../shared/k8s) runs the API server and the controllers
(Job, garbage collector, TTL-after-finished, ...) but no kubelet and no scheduler: the pods the Job
controller creates would stay Pending forever. `Kubelet` does what the node does, through the same API a
real kubelet uses, so the Job controller completes or fails Jobs exactly as on a cluster:

- registers its own Nodes (with `nvidia.com/gpu` capacity; tainted NoSchedule so a real scheduler puts
  nothing else there), keeps them Ready (node Leases renewed), and deletes them on `stop`;
- binds each new pod of a Job to one of them (`pods/binding`: the scheduler's call);
- runs the init containers, then the main one, through `pods/status` (waiting -> running -> terminated,
  exit codes, `startedAt`/`finishedAt`, termination messages), the pod phase Pending -> Running ->
  Succeeded/Failed;
- a pod being deleted (a Job suspended, a Job deleted) is terminated and removed (grace period 0), as a
  kubelet confirms a deletion;
- admits Kueue-queued Jobs (label `kueue.x-k8s.io/queue-name`) by unsuspending them, as Kueue does
  (automatically, or only when the test calls `admit`).

What each pod does is scripted (`script`): succeed (the default), the main or the init container fails, a
start error, a crash that leaves its log tail, a delay, or running until released. A container's
termination message is made by the runtime's own result code: the result a step of that type reports is
written through `mmar.report.write_result` (MMAR_TERMINATION_LOG pointed at a temporary file) and read
back, as the real container leaves it in /dev/termination-log. A failed step's message is what the runtime
leaves then: its failure result if the CLI writes one, else the log tail ending in `error: ...`.

    kubelet = Kubelet(api, namespaces=[ns]).start()
    kubelet.script("demo-0-train", Outcome.fail("training diverged"))
    ...
    kubelet.stop()
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import threading
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping

log = logging.getLogger("kubelet-standin")

GPU = "nvidia.com/gpu"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_JOB_NAME = "batch.kubernetes.io/job-name"  # set by the Job controller (also as plain job-name)
LABEL_MMARJOB = "mmar.dev/mmarjob"
LABEL_STEP = "mmar.dev/step"
MERGE_PATCH = "application/merge-patch+json"
STANDIN_LABEL = "mmar.dev/kubelet-standin"  # on the stand-in's Nodes (label and NoSchedule taint)
# the files `mmar export` writes per format (mmar.export.FORMATS; not imported: that module pulls in torch)
EXPORT_FILES = {"torchscript": "model.ts", "onnx": "model.onnx", "tensorrt": "model.trt"}
# what a real kubelet keeps of a container's log as its termination message (FallbackToLogsOnError)
LOG_TAIL_LINES, LOG_TAIL_BYTES = 80, 2048


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------------ outcomes


@dataclass(frozen=True)
class Outcome:
    """What one pod does. Build with the class methods; `delay` is the seconds its main container runs."""

    kind: str = "succeed"  # succeed | fail | init_fail | start_error | crash
    delay: float = 0.0
    exit_code: int = 0
    error: str | None = None  # fail / init_fail: the error line the runtime prints
    reason: str | None = None  # start_error: the waiting reason; crash: the terminated reason
    log_tail: str | None = None  # crash: the container's last log lines (its termination message)
    result: Mapping[str, Any] | None = None  # succeed: fields that override the realistic result
    hold: threading.Event | None = None  # run until this is set (see Kubelet.release), then finish

    @classmethod
    def succeed(cls, delay: float = 0.0, result: Mapping[str, Any] | None = None) -> "Outcome":
        return cls("succeed", delay=delay, result=result)

    @classmethod
    def fail(cls, error: str = "the step failed", exit_code: int = 1, delay: float = 0.0) -> "Outcome":
        """The main container exits non-zero after printing `error: <error>` (what `mmar` does on an error)."""
        return cls("fail", delay=delay, exit_code=exit_code, error=error)

    @classmethod
    def init_fail(cls, error: str = "the MMAR could not be initialized", exit_code: int = 1) -> "Outcome":
        """The init container (`mmar init`) exits non-zero; the main container never starts."""
        return cls("init_fail", exit_code=exit_code, error=error)

    @classmethod
    def start_error(cls, reason: str = "CreateContainerError", message: str | None = None, delay: float = 0.5) -> "Outcome":
        """The container cannot start: waiting with `reason` for `delay` s, then terminated StartError (128)."""
        return cls("start_error", delay=delay, exit_code=128, reason=reason, error=message)

    @classmethod
    def crash(cls, log_tail: str, exit_code: int = 137, reason: str = "OOMKilled", delay: float = 0.0) -> "Outcome":
        """Killed without writing a result: the termination message is the log tail (FallbackToLogsOnError)."""
        return cls("crash", delay=delay, exit_code=exit_code, reason=reason, log_tail=log_tail)

    @classmethod
    def running(cls, then: "Outcome | None" = None) -> "Outcome":
        """Run until `Kubelet.release` (or the pod's deletion), then do what `then` says (default: succeed)."""
        return replace(then or cls.succeed(), hold=threading.Event())


Match = Callable[[Mapping[str, Any]], bool]


def _matcher(what: str | Match) -> Match:
    """A Job name, an MMARJob step name, an MMARJob name, or a predicate over the pod (or Job) as a dict."""
    if callable(what):
        return what

    def match(obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        names = (labels.get(LABEL_JOB_NAME), labels.get("job-name"), labels.get(LABEL_STEP), labels.get(LABEL_MMARJOB))
        return what in names or meta.get("name") == what
    return match


@dataclass
class _Rule:
    match: Match
    outcome: Outcome
    times: int | None  # None: every matching pod; else this many pods, then the rule is spent


# --------------------------------------------------------------------------------- results (the runtime's)


def _args_of(container: Mapping[str, Any]) -> list[str]:
    return [*(container.get("command") or []), *(container.get("args") or [])]


def mmar_command(argv: list[str]) -> tuple[str | None, list[str]]:
    """(`mmar` subcommand, its arguments) of a container's argv, through a torchrun wrapper or a leading
    `--gate METRIC>=X` too."""
    for i, word in enumerate(argv):
        if PurePosixPath(word).name == "mmar" and i + 1 < len(argv):
            # `mmar train ...` or `torchrun ... -m mmar train ...`
            if i == 0 or argv[i - 1] == "-m":
                if argv[i + 1] == "--gate" and i + 3 < len(argv):
                    return argv[i + 3], argv[i + 4:]
                return argv[i + 1], argv[i + 2:]
    return None, []


def gate_of(argv: list[str]) -> str | None:
    """The `--gate` value of a container's argv, or None."""
    return argv[argv.index("--gate") + 1] if "--gate" in argv[:3] else None


# What the stand-in's MMARs hold as their last validation (eval/metrics.json): the key metric's value the
# stand-in's validate step reports, so a gate reads the number a validate step of the same job recorded.
STANDIN_VALIDATION = 0.8047


def _option(args: list[str], name: str) -> str | None:
    if name in args and args.index(name) + 1 < len(args):
        return args[args.index(name) + 1]
    return None


def _sets(args: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    if "--set" in args:
        for word in args[args.index("--set") + 1:]:
            if word.startswith("--"):
                break
            key, _, value = word.partition("=")
            values[key] = value
    return values


def _key_metric(task: str) -> str:
    if task == "classification":
        from mmar.tasks.classification import KEY_METRIC
    else:
        from mmar.tasks.segmentation import KEY_METRIC
    return KEY_METRIC


def realistic_result(argv: list[str], task: str = "segmentation", processes: int | None = None) -> dict[str, Any] | None:
    """The result `mmar <command>` returns for this argv, shaped as the runtime's commands return it
    (engine/train.py, engine/evaluate.py, export.py, convert/cli.py). None for commands without one (init)."""
    command, args = mmar_command(argv)
    root = args[0] if args and not args[0].startswith("-") else "/workspace/mmar"
    models, evals = f"{root}/models", f"{root}/eval"
    key = _key_metric(task)
    if command == "convert":
        return {"command": "convert", "converted": 4, "skipped": 0, "failed": 0}
    if command == "train":
        epochs = int(float(_sets(args).get("epochs", "2")))
        result: dict[str, Any] = {"command": "finetune" if "--finetune" in args else "train", "epochs": epochs,
                                  "key_metric": key, "best_metric": 0.8125, "best_epoch": epochs,
                                  "minutes": 0.05, "models_dir": models}
        if processes and processes > 1:
            result["processes"] = processes
        return result
    gate = gate_of(argv)
    if gate is not None:
        from mmar import job as contract

        record = contract.gate_decision(contract.parse_gate_text(gate), {key: STANDIN_VALIDATION})
        if not record["passed"]:
            return {"command": command, "gate": record}
        return {**(realistic_result([a for a in argv if a not in ("--gate", gate)], task, processes) or {}), "gate": record}
    if command == "validate":
        return {"command": "validate", "key_metric": key, "metric": STANDIN_VALIDATION, "num_cases": 4, "eval_dir": evals}
    if command == "pull":
        return {"command": "pull", "series": 3, "skipped_series": 1, "retrieved": 120, "present": 0, "cases": 3,
                "datalist": _option(args, "--datalist"), "key": _option(args, "--key") or "test"}
    if command == "push":
        return {"command": "push", "found": 3, "stored": 3, "skipped": 0, "failed": 0, "url": _option(args, "--url")}
    if command == "infer":
        result = {"command": "infer", "num_cases": 4, "outputs": 4, "eval_dir": evals}
        return {**result, "dicom_segs": 4} if "--dicom-seg" in args else result
    if command == "export":
        formats = (_option(args, "--formats") or ",".join(EXPORT_FILES)).split(",")
        shape = [int(s) for s in (_option(args, "--input-shape") or "1,1,96,96,96").split(",")]
        return {"command": "export", "formats": formats, "skipped": [], "files": [f"{models}/{EXPORT_FILES[f]}" for f in formats],
                "input_shape": shape, "precision": _option(args, "--precision") or "fp32",
                "max_abs_diff": {f: 1.2e-6 for f in formats}}
    return None


_TERMINATION_LOCK = threading.Lock()  # MMAR_TERMINATION_LOG is process-wide


def _written_by_runtime(write: Callable[[], None]) -> str:
    """What `write` (the runtime's report code) leaves in the termination log: MMAR_TERMINATION_LOG pointed
    at a temporary file, as a pod's /dev/termination-log, and read back. Rank 0, as the reporting pod."""
    with _TERMINATION_LOCK, tempfile.TemporaryDirectory(prefix="kubelet-standin-") as tmp:
        path = os.path.join(tmp, "termination-log")
        saved = {k: os.environ.get(k) for k in ("MMAR_TERMINATION_LOG", "RANK")}
        os.environ["MMAR_TERMINATION_LOG"] = path
        os.environ.pop("RANK", None)
        try:
            write()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return Path(path).read_text(encoding="utf-8") if os.path.exists(path) else ""


def termination_message(result: Mapping[str, Any]) -> str:
    """What the runtime leaves in its termination log for `result` (`mmar.report.write_result`)."""
    from mmar import report

    return _written_by_runtime(lambda: report.write_result(dict(result)))


def runtime_reports_failures() -> bool:
    """Whether `mmar`'s CLI writes a failure result (`mmar.report.write_failure`) when a command fails.
    Read from its source rather than found by running a failing command (slow: torch): a stand-in must
    not guess, and until the CLI calls it a failed step leaves no termination log."""
    spec = importlib.util.find_spec("mmar.cli")
    return spec is not None and spec.origin is not None and "write_failure" in Path(spec.origin).read_text()


def failure_message(argv: list[str], error: str) -> str:
    """The termination message of a step that failed with `error`, as the runtime leaves it: its failure
    result when the CLI reports one, else (nothing written: FallbackToLogsOnError) the log tail, which
    ends with the `error: ...` line `mmar` prints."""
    from mmar import report

    if runtime_reports_failures():
        command, _ = mmar_command(argv)
        message = _written_by_runtime(lambda: report.write_failure(command or "mmar", error))
        if message:
            return message
    return log_tail(f"error: {error}\n")


def log_tail(text: str) -> str:
    """A log's tail as the kubelet keeps it for FallbackToLogsOnError."""
    lines = text.rstrip("\n").splitlines()[-LOG_TAIL_LINES:]
    return "\n".join(lines).encode()[-LOG_TAIL_BYTES:].decode(errors="ignore")


# -------------------------------------------------------------------------------------------------- kubelet


@dataclass
class _PodRun:
    thread: threading.Thread
    outcome: Outcome
    deleted: threading.Event = field(default_factory=threading.Event)


class Kubelet:
    """Nodes, pod binding and pod lifecycles for the pods of Jobs in `namespaces` (None: all)."""

    def __init__(self, api: Any, namespaces: Iterable[str] | None = None, *, nodes: int = 2, gpus_per_node: int = 8,
                 node_prefix: str | None = None, admit_kueue: bool = True, step_seconds: float = 0.05):
        self.api = api
        self.core, self.batch, self.custom = api.CoreV1Api(), api.BatchV1Api(), api.CustomObjectsApi()
        self.coordination = api.CoordinationV1Api()
        self.namespaces = list(namespaces) if namespaces is not None else None
        # this instance's own Nodes (deleted by stop: the pod GC then removes pods left bound to them)
        prefix = node_prefix or f"standin-{uuid.uuid4().hex[:6]}"
        self.node_names = [f"{prefix}-{i}" for i in range(nodes)]
        self.gpus_per_node = gpus_per_node
        self.admit_kueue = admit_kueue
        self.step_seconds = step_seconds  # the pause between a pod's status transitions
        self._rules: list[_Rule] = []
        self._held: list[Match] = []  # Kueue-queued Jobs not to admit on their own
        self._runs: dict[str, _PodRun] = {}  # pod uid -> its run
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._tasks: dict[tuple[str, str], str | None] = {}  # (namespace, mmarjob) -> spec.task
        self._next_node = 0
        self.errors: list[str] = []  # what went wrong in the stand-in itself (tests may assert it is empty)

    # ----------------------------------------------------------------------------------------- control

    def script(self, what: str | Match, outcome: Outcome, times: int | None = None) -> Outcome:
        """From now on, pods matching `what` (Job name, step name, MMARJob name or predicate) do `outcome`
        (the latest matching rule wins; `times`: only for that many pods). Returns the outcome."""
        with self._lock:
            self._rules.append(_Rule(_matcher(what), outcome, times))
        return outcome

    def release(self, outcome: Outcome) -> None:
        """Let the pods holding on `outcome` (from Outcome.running) finish."""
        if outcome.hold is not None:
            outcome.hold.set()

    def hold_admission(self, what: str | Match) -> None:
        """Leave Kueue-queued Jobs matching `what` (Job name, step, MMARJob name or a predicate over the Job)
        suspended until `admit` is called: a queue without quota."""
        with self._lock:
            self._held.append(_matcher(what))

    def admit(self, namespace: str, job_name: str) -> None:
        """Admit a Kueue-queued Job (what Kueue does once the queue has quota): unsuspend it."""
        self.batch.patch_namespaced_job(job_name, namespace, {"spec": {"suspend": False}}, _content_type=MERGE_PATCH)

    def start(self) -> "Kubelet":
        for name in self.node_names:
            self._register_node(name)
        scopes = self.namespaces if self.namespaces is not None else [None]
        for namespace in scopes:
            self._spawn(self._watch_pods, namespace)
            if self.admit_kueue:
                self._spawn(self._watch_kueue_jobs, namespace)
        self._spawn(self._heartbeat)
        return self

    def stop(self) -> None:
        """Stop the watches and pod runs, and delete this instance's Nodes."""
        self._stop.set()
        with self._lock:
            runs = list(self._runs.values())
            rules = list(self._rules)
        for rule in rules:  # a held pod must not keep its thread alive
            if rule.outcome.hold is not None:
                rule.outcome.hold.set()
        for thread in [*self._threads, *(r.thread for r in runs)]:
            thread.join(timeout=10)
        for name in self.node_names:
            try:
                self.core.delete_node(name)
            except self.api.ApiException as error:
                if error.status != 404:
                    raise

    def __enter__(self) -> "Kubelet":
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=self._guarded, args=(target, *args), daemon=True, name=f"kubelet-{target.__name__}")
        thread.start()
        self._threads.append(thread)

    def _guarded(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        except Exception as error:  # noqa: BLE001 - recorded: a broken stand-in must show in the test
            if not self._stop.is_set():
                log.exception("kubelet stand-in: %s failed", target.__name__)
                self.errors.append(f"{target.__name__}: {error!r}")

    # -------------------------------------------------------------------------------------------- nodes

    def _register_node(self, name: str) -> None:
        body = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                                  STANDIN_LABEL: "true"}},
            # a real scheduler (kind) must not place other pods on a node nothing runs; the stand-in binds
            # its pods itself, and binding, like a kubelet's admission, does not look at taints
            "spec": {"taints": [{"key": STANDIN_LABEL, "value": "true", "effect": "NoSchedule"}]},
        }
        try:
            self.core.create_node(body)
        except self.api.ApiException as error:
            if error.status != 409:
                raise
        capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", GPU: str(self.gpus_per_node), "ephemeral-storage": "1Ti"}
        now = now_rfc3339()
        status = {
            "capacity": capacity, "allocatable": capacity,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet stand-in is posting ready status",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "v1.32.13-standin",
                         "kubeProxyVersion": "", "containerRuntimeVersion": "standin://1", "osImage": "kubelet stand-in",
                         "kernelVersion": "", "machineID": "", "systemUUID": "", "bootID": ""},
        }
        self.core.patch_node_status(name, {"status": status}, _content_type=MERGE_PATCH)
        self._renew_lease(name)

    def _renew_lease(self, name: str) -> None:
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {"metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now}}
        try:
            self.coordination.patch_namespaced_lease(name, "kube-node-lease", body, _content_type=MERGE_PATCH)
        except self.api.ApiException as error:
            if error.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", body)

    def _heartbeat(self) -> None:
        """Renew the node Leases, so the node lifecycle controller keeps the nodes Ready (no evictions)."""
        while not self._stop.wait(10):
            for name in self.node_names:
                self._renew_lease(name)

    # ---------------------------------------------------------------------------------------- watching

    def _watch(self, list_fn: Callable[..., Any], namespace: str | None, handle: Callable[[dict[str, Any]], None], **selector: Any) -> None:
        """List, then watch from that resourceVersion; on expiry (410) or a closed stream, start over."""
        from kubernetes import watch

        client = self.api.ApiClient()
        while not self._stop.is_set():
            listing = list_fn(namespace, **selector) if namespace else list_fn(**selector)
            for item in listing.items:
                handle(client.sanitize_for_serialization(item))
            version = listing.metadata.resource_version
            stream = watch.Watch()
            try:
                kwargs = dict(selector, resource_version=version, timeout_seconds=5, allow_watch_bookmarks=False)
                events = stream.stream(list_fn, namespace, **kwargs) if namespace else stream.stream(list_fn, **kwargs)
                for event in events:
                    if self._stop.is_set():
                        break
                    if event["type"] == "ERROR":
                        break  # e.g. 410 Gone: list again
                    handle(client.sanitize_for_serialization(event["object"]))
            except self.api.ApiException as error:
                if error.status != 410:
                    raise
            finally:
                stream.stop()

    def _watch_pods(self, namespace: str | None) -> None:
        fn = self.core.list_namespaced_pod if namespace else self.core.list_pod_for_all_namespaces
        self._watch(fn, namespace, self._on_pod, label_selector=LABEL_JOB_NAME)

    def _watch_kueue_jobs(self, namespace: str | None) -> None:
        fn = self.batch.list_namespaced_job if namespace else self.batch.list_job_for_all_namespaces
        self._watch(fn, namespace, self._on_job, label_selector=KUEUE_QUEUE)

    def _on_job(self, job: dict[str, Any]) -> None:
        meta, spec = job["metadata"], job.get("spec") or {}
        with self._lock:
            held = any(match(job) for match in self._held)
        if self.admit_kueue and not held and spec.get("suspend") and not meta.get("deletionTimestamp") and not _job_finished(job) \
                and not (meta.get("annotations") or {}).get("mmar.dev/kubelet-standin-admitted"):
            # admitted once, as Kueue does: a Job the MMARJob suspends later is not admitted again behind its back
            log.info("kueue stand-in: admitting Job %s/%s", meta["namespace"], meta["name"])
            self.batch.patch_namespaced_job(meta["name"], meta["namespace"], {
                "metadata": {"annotations": {"mmar.dev/kubelet-standin-admitted": now_rfc3339()}},
                "spec": {"suspend": False}}, _content_type=MERGE_PATCH)

    def _on_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        with self._lock:
            run = self._runs.get(uid)
        if meta.get("deletionTimestamp"):
            if run is not None:
                run.deleted.set()  # its thread terminates the containers and confirms the deletion
            elif (pod.get("spec") or {}).get("nodeName") in self.node_names or not (pod.get("spec") or {}).get("nodeName"):
                self._confirm_deletion(pod)
            return
        phase = (pod.get("status") or {}).get("phase")
        if run is not None or phase in ("Succeeded", "Failed"):
            return
        node = (pod.get("spec") or {}).get("nodeName")
        if node and node not in self.node_names:
            return  # another node's pod
        outcome = self._outcome_for(pod)
        thread = threading.Thread(target=self._run_pod_guarded, args=(pod, node), daemon=True, name=f"pod-{meta['name']}")
        with self._lock:
            self._runs[uid] = _PodRun(thread, outcome)
        thread.start()

    def _outcome_for(self, pod: Mapping[str, Any]) -> Outcome:
        with self._lock:
            for rule in reversed(self._rules):
                if (rule.times is None or rule.times > 0) and rule.match(pod):
                    if rule.times is not None:
                        rule.times -= 1
                    return rule.outcome
        return Outcome.succeed()

    # ---------------------------------------------------------------------------------------- pod life

    def _task_of(self, pod: Mapping[str, Any]) -> str:
        meta = pod["metadata"]
        key = (meta["namespace"], (meta.get("labels") or {}).get(LABEL_MMARJOB, ""))
        if key not in self._tasks:
            task = None
            if key[1]:
                try:
                    body = self.custom.get_namespaced_custom_object("mmar.dev", "v1alpha1", key[0], "mmarjobs", key[1])
                    task = (body.get("spec") or {}).get("task")
                except self.api.ApiException:
                    pass
            self._tasks[key] = task
        return self._tasks[key] or "segmentation"

    def _bind(self, pod: Mapping[str, Any]) -> str:
        meta = pod["metadata"]
        with self._lock:
            node = self.node_names[self._next_node % len(self.node_names)]
            self._next_node += 1
        body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"]},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
        # the client cannot deserialize the Status this returns into V1Binding: take the raw response
        self.core.create_namespaced_pod_binding(meta["name"], meta["namespace"], body, _preload_content=False)
        return node

    def _patch_status(self, pod: Mapping[str, Any], status: dict[str, Any]) -> None:
        meta = pod["metadata"]
        self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status}, _content_type=MERGE_PATCH)

    def _wait(self, run: _PodRun, seconds: float) -> bool:
        """Sleep `seconds` (or until the pod is deleted / the stand-in stops); True if the pod should stop."""
        return run.deleted.wait(seconds) or self._stop.is_set()

    def _run_pod_guarded(self, pod: dict[str, Any], node: str | None) -> None:
        """A pod whose run broke in the stand-in fails visibly (its error in `errors` and in the pod),
        rather than hanging the test until its timeout."""
        try:
            self._run_pod(pod, node)
        except Exception as error:  # noqa: BLE001
            if self._stop.is_set():
                return
            log.exception("kubelet stand-in: pod %s failed", pod["metadata"]["name"])
            self.errors.append(f"pod {pod['metadata']['name']}: {error!r}")
            try:
                self._patch_status(pod, {"phase": "Failed", "reason": "KubeletStandInError", "message": repr(error)[:500]})
            except Exception:  # noqa: BLE001 - best effort: the error is recorded above
                pass

    def _run_pod(self, pod: dict[str, Any], node: str | None) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        with self._lock:
            run = self._runs[meta["uid"]]
        outcome = run.outcome
        if not node:
            try:
                node = self._bind(pod)
            except self.api.ApiException as error:
                if error.status != 409:
                    raise
                # bound meanwhile (by a scheduler, or another stand-in): run it only if on one of our nodes
                node = self.core.read_namespaced_pod(meta["name"], meta["namespace"]).spec.node_name
                if node not in self.node_names:
                    with self._lock:
                        self._runs.pop(meta["uid"], None)
                    return
        started = now_rfc3339()
        inits, mains = spec.get("initContainers") or [], spec.get("containers") or []
        base: dict[str, Any] = {"hostIP": "127.0.0.1", "podIP": "10.244.0.10", "podIPs": [{"ip": "10.244.0.10"}], "startTime": started}
        scheduled = _condition("PodScheduled", True, started)
        waiting = [_waiting(c, "PodInitializing" if inits else "ContainerCreating") for c in mains]

        # init containers, one after the other
        done_inits: list[dict[str, Any]] = []
        for i, container in enumerate(inits):
            running = [_running(container, now_rfc3339())]
            self._patch_status(pod, {**base, "phase": "Pending", "conditions": [scheduled, _condition("Initialized", False, started, "ContainersNotInitialized")],
                                     "initContainerStatuses": done_inits + running + [_waiting(c, "PodInitializing") for c in inits[i + 1:]],
                                     "containerStatuses": waiting})
            if self._wait(run, self.step_seconds):
                return self._terminate(pod, run, base)
            if outcome.kind == "init_fail":
                finished = _terminated(container, outcome.exit_code, "Error", started,
                                       failure_message(_args_of(container), outcome.error or "init failed"))
                conditions = [scheduled, _condition("Initialized", False, started, "PodFailed"), _condition("Ready", False, started, "PodFailed"),
                              _condition("ContainersReady", False, started, "PodFailed")]
                self._patch_status(pod, {**base, "phase": "Failed", "conditions": conditions,
                                         "initContainerStatuses": done_inits + [finished] + [_waiting(c, "PodInitializing") for c in inits[i + 1:]],
                                         "containerStatuses": waiting})
                return self._finish(pod, run)
            done_inits.append(_terminated(container, 0, "Completed", started, ""))
        initialized = _condition("Initialized", True, started)

        if outcome.kind == "start_error":
            reason = outcome.reason or "CreateContainerError"
            message = outcome.error or f'failed to create containerd task: exec: "{_args_of(mains[0])[0]}": executable file not found in $PATH'
            self._patch_status(pod, {**base, "phase": "Pending", "conditions": [scheduled, initialized], "initContainerStatuses": done_inits,
                                     "containerStatuses": [{**_waiting(c, reason), "state": {"waiting": {"reason": reason, "message": message}}} for c in mains]})
            if self._wait(run, outcome.delay):
                return self._terminate(pod, run, base)
            finished = [_terminated(c, 128, "StartError", started, message) for c in mains]
            self._patch_status(pod, {**base, "phase": "Failed", "conditions": _final_conditions(started, scheduled, initialized, "PodFailed"),
                                     "initContainerStatuses": done_inits, "containerStatuses": finished})
            return self._finish(pod, run)

        # the main container runs
        self._patch_status(pod, {**base, "phase": "Running",
                                 "conditions": [scheduled, initialized, _condition("ContainersReady", True, started), _condition("Ready", True, started)],
                                 "initContainerStatuses": done_inits, "containerStatuses": [_running(c, started) for c in mains]})
        if self._wait(run, max(outcome.delay, self.step_seconds)):
            return self._terminate(pod, run, base, done_inits)
        if outcome.hold is not None:
            while not outcome.hold.is_set():
                if self._wait(run, 0.1):
                    return self._terminate(pod, run, base, done_inits)

        main = mains[0]
        argv = _args_of(main)
        index = (meta.get("annotations") or {}).get("batch.kubernetes.io/job-completion-index", "0")
        if outcome.kind == "succeed":
            exit_code, reason = 0, "Completed"
            processes = _torchrun_processes(argv)
            result = realistic_result(argv, self._task_of(pod), processes)
            if result is not None and outcome.result:
                result.update(outcome.result)
            # only rank 0 writes the result (report.write_result); the other ranks leave no message
            message = termination_message(result) if result is not None and index == "0" else ""
        elif outcome.kind == "fail":
            exit_code, reason = outcome.exit_code, "Error"
            message = failure_message(argv, outcome.error or "the step failed")
        else:  # crash
            exit_code, reason = outcome.exit_code, outcome.reason or "Error"
            message = log_tail(outcome.log_tail or "")
        phase = "Succeeded" if exit_code == 0 else "Failed"
        finished = [_terminated(main, exit_code, reason, started, message)] + [_terminated(c, exit_code, reason, started, "") for c in mains[1:]]
        self._patch_status(pod, {**base, "phase": phase, "conditions": _final_conditions(started, scheduled, initialized, "PodCompleted" if exit_code == 0 else "PodFailed"),
                                 "initContainerStatuses": done_inits, "containerStatuses": finished})
        self._finish(pod, run)

    def _finish(self, pod: Mapping[str, Any], run: _PodRun) -> None:
        """The pod is terminal; stay around to confirm its deletion when it comes (a deleted pod bound to
        a node stays until its kubelet confirms, terminal or not)."""
        while not self._stop.is_set():
            if run.deleted.wait(0.5):
                self._confirm_deletion(pod)
                return

    def _terminate(self, pod: Mapping[str, Any], run: _PodRun, base: dict[str, Any], done_inits: list[dict[str, Any]] | None = None) -> None:
        """The pod is being deleted (e.g. its Job suspended): stop its containers (SIGTERM, exit 143) and
        confirm the deletion, as a kubelet does."""
        if self._stop.is_set() and not run.deleted.is_set():
            return
        started = base["startTime"]
        try:
            mains = pod["spec"].get("containers") or []
            self._patch_status(pod, {**base, "phase": "Failed", "conditions": _final_conditions(started, _condition("PodScheduled", True, started),
                                                                                             _condition("Initialized", True, started), "PodFailed"),
                                     "initContainerStatuses": done_inits or [],
                                     "containerStatuses": [_terminated(c, 143, "Error", started, "") for c in mains]})
        except self.api.ApiException as error:
            if error.status not in (404, 422):
                raise
        self._confirm_deletion(pod)

    def _confirm_deletion(self, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], grace_period_seconds=0)
        except self.api.ApiException as error:
            if error.status != 404:
                raise


def _job_finished(job: Mapping[str, Any]) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in (job.get("status") or {}).get("conditions") or [])


def _torchrun_processes(argv: list[str]) -> int | None:
    if not argv or PurePosixPath(argv[0]).name != "torchrun":
        return None
    values = dict(word[2:].split("=", 1) for word in argv if word.startswith("--") and "=" in word)
    try:
        return int(values.get("nnodes", "1")) * int(values.get("nproc_per_node", "1"))
    except ValueError:
        return None  # $(PET_...) references: the kubelet would expand them; the count is in the env


def _condition(kind: str, true: bool, when: str, reason: str | None = None) -> dict[str, Any]:
    condition = {"type": kind, "status": "True" if true else "False", "lastProbeTime": None, "lastTransitionTime": when}
    if reason:
        condition["reason"] = reason
    return condition


def _final_conditions(started: str, scheduled: dict[str, Any], initialized: dict[str, Any], reason: str) -> list[dict[str, Any]]:
    now = now_rfc3339()
    return [scheduled, initialized, _condition("ContainersReady", False, now, reason), _condition("Ready", False, now, reason)]


def _container_base(container: Mapping[str, Any]) -> dict[str, Any]:
    image = container.get("image") or ""
    return {"name": container["name"], "image": image, "imageID": f"standin://{image}", "restartCount": 0}


def _waiting(container: Mapping[str, Any], reason: str) -> dict[str, Any]:
    return {**_container_base(container), "ready": False, "started": False, "state": {"waiting": {"reason": reason}}}


def _running(container: Mapping[str, Any], started: str) -> dict[str, Any]:
    return {**_container_base(container), "ready": True, "started": True, "containerID": f"standin://{container['name']}",
            "state": {"running": {"startedAt": started}}}


def _terminated(container: Mapping[str, Any], exit_code: int, reason: str, started: str, message: str) -> dict[str, Any]:
    terminated: dict[str, Any] = {"exitCode": exit_code, "reason": reason, "startedAt": started, "finishedAt": now_rfc3339(),
                                  "containerID": f"standin://{container['name']}"}
    if message:
        terminated["message"] = message
    return {**_container_base(container), "ready": False, "started": False, "containerID": f"standin://{container['name']}",
            "state": {"terminated": terminated}}


__all__ = ["Kubelet", "Outcome", "realistic_result", "termination_message", "failure_message", "log_tail", "mmar_command"]
