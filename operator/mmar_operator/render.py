"""Pure: an MMARJob (parsed by `mmar.job`) -> the child objects of one step, as plain dicts.

One batch/v1 Job per step. A train/finetune step on several nodes is an Indexed Job (one pod per node,
the completion index is the node rank) plus a headless Service that gives pod 0 a stable DNS name for
torchrun's rendezvous. The container's argv is `mmar.job.step_argv()`, the same one `mmar run` executes.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Mapping

from mmar import job as contract

from mmar_operator.config import Config

GROUP = contract.GROUP  # the API group (mmar.job.outcome), also the prefix of the operator's labels
LABEL_JOB = f"{GROUP}/mmarjob"
LABEL_STEP = f"{GROUP}/step"
MANAGED_BY = {"app.kubernetes.io/managed-by": "mmar-operator", "app.kubernetes.io/name": "mmar"}
KUEUE_PREFIX = "kueue.x-k8s.io/"  # queue-name, priority-class: passed through so Kueue admits the Jobs
CONTAINER = "mmar"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
SIGTERM_EXIT = 143  # the runtime's exit code when stopped by SIGTERM (128 + 15)
TERMINATION_GRACE_SECONDS = 120
RENDEZVOUS_CONTAINER = "rendezvous"  # a multi-node step's init container: waits for rank 0's DNS name
RENDEZVOUS_DNS_SECONDS = 180  # ... at most this long (mmar.distributed.wait_for_address)  # SIGTERM -> SIGKILL: time to save the training state (render_job)


# A child's name: `<mmarjob>-<step>-<hash>`, the hash 5 hex digits of sha256("<MMARJob uid>/<step name>") (as
# the Job controller names pods). The step's name is its identity (never its index: inserting a step renames
# no child), and the owner's uid makes two MMARJobs' children differ even where `<mmarjob>-<step>` reads the
# same ("a" + "x-train" and "a-x" + "train"). The readable part is cut to leave a valid DNS-1035 label (a
# Service name) of at most CHILD_NAME_MAX characters, so that an indexed pod's hostname `<job>-<rank>` (rank
# < 64, at most "-63") stays a 63-character DNS label too.
CHILD_NAME_MAX = 60
CHILD_HASH_HEX = 5
LABEL_UID = f"{GROUP}/mmarjob-uid"  # the owner's uid, on every child: what marks it as this MMARJob's


def child_name(job: Mapping[str, Any], step: str | int) -> str:
    """Deterministic: a replayed event or a restarted operator finds the same name. `step`: the step's name
    (or its index in spec.steps)."""
    name = contract.steps_of(job)[step]["name"] if isinstance(step, int) else step
    digest = hashlib.sha256(f"{job['metadata'].get('uid') or ''}/{name}".encode()).hexdigest()[:CHILD_HASH_HEX]
    readable = f"{contract.name_of(job)}-{name}"[:CHILD_NAME_MAX - CHILD_HASH_HEX - 1].rstrip("-")
    return f"{readable}-{digest}"


def selector_labels(job: Mapping[str, Any], index: int) -> dict[str, str]:
    labels = {LABEL_JOB: contract.name_of(job), LABEL_STEP: contract.steps_of(job)[index]["name"]}
    if job["metadata"].get("uid"):
        labels[LABEL_UID] = job["metadata"]["uid"]
    return labels


def passthrough_labels(job: Mapping[str, Any]) -> dict[str, str]:
    labels = job["metadata"].get("labels") or {}
    return {k: v for k, v in labels.items() if k.startswith(KUEUE_PREFIX)}


def owner_reference(job: Mapping[str, Any]) -> dict[str, Any]:
    """Makes the MMARJob the controller of its children: deleting it garbage-collects them."""
    return {
        "apiVersion": contract.API_VERSION,
        "kind": contract.KIND,
        "name": contract.name_of(job),
        "uid": job["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def is_multinode(job: Mapping[str, Any], index: int) -> bool:
    return contract.steps_of(job)[index]["nodes"] > 1


def render_step(job: Mapping[str, Any], index: int, config: Config) -> list[dict[str, Any]]:
    """The objects step `index` needs, in creation order (the Service before the Job that resolves it)."""
    objects = []
    if is_multinode(job, index):
        objects.append(render_service(job, index))
    objects.append(render_job(job, index, config))
    return objects


def _metadata(job: Mapping[str, Any], index: int) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": child_name(job, index),
        "labels": {**MANAGED_BY, **passthrough_labels(job), **selector_labels(job, index)},
        "ownerReferences": [owner_reference(job)],
    }
    if job["metadata"].get("namespace"):
        meta["namespace"] = job["metadata"]["namespace"]
    return meta


# The hash of what a step's Job was made from (`spec_hash`), on the Job: a step that started runs with the
# spec it started with; a later edit of it is reported (status: condition SpecChangeIgnored), never applied
SPEC_HASH = f"{GROUP}/spec-hash"
# what the operator applies to a running step (suspend, the TTL after it finished, the pending timeout)
LIVE_POLICY = ("suspend", "ttlSecondsAfterFinished", "pendingTimeoutSeconds")


def spec_hash(job: Mapping[str, Any], index: int) -> str:
    """A digest of the spec a step's Job is made from: the step and the job-wide fields (image, claims,
    resources, selectors, runPolicy but what is applied live), not the other steps."""
    spec = {k: v for k, v in job["spec"].items() if k not in ("steps", "runPolicy")}
    policy = {k: v for k, v in (job["spec"].get("runPolicy") or {}).items() if k not in LIVE_POLICY}
    text = json.dumps({"step": contract.steps_of(job)[index], "spec": spec, "runPolicy": policy}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def render_service(job: Mapping[str, Any], index: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, index),
        "spec": {
            "clusterIP": "None",
            # rank 0 must be resolvable before it is Ready, or the other ranks cannot rendezvous
            "publishNotReadyAddresses": True,
            "selector": selector_labels(job, index),
            "ports": [{"name": "rendezvous", "port": contract.MASTER_PORT, "targetPort": contract.MASTER_PORT, "protocol": "TCP"}],
        },
    }


GPU = "nvidia.com/gpu"


def _resources(job: Mapping[str, Any], index: int, config: Config) -> dict[str, Any]:
    """The step's (else the job's, else the operator's default for its step type, else the operator's
    default) CPU/memory, and gpusPerNode GPUs.

    gpusPerNode is the one place GPUs are asked for: any nvidia.com/gpu in resources is replaced by it,
    so a convert step never holds a GPU because of a job-wide or operator-wide default.
    """
    step_type = contract.steps_of(job)[index]["type"]
    resources = (contract.resources_of(job, index) or copy.deepcopy(config.step_resources.get(step_type))
                 or copy.deepcopy(config.default_resources))
    resources = {k: {n: v for n, v in amounts.items() if n != GPU} for k, amounts in resources.items()}
    gpus = contract.gpus_of(job, index)
    if gpus > 0:  # an extended resource goes in limits (its request defaults to the limit)
        resources.setdefault("limits", {})[GPU] = gpus
    # quantities as strings: that is their wire form, and the typed client (kubernetes>=35) refuses ints
    return {k: {n: str(v) for n, v in amounts.items()} for k, amounts in resources.items() if amounts}


def _env(job: Mapping[str, Any], index: int, config: Config) -> list[dict[str, Any]]:
    step = contract.steps_of(job)[index]
    env: list[dict[str, Any]] = [
        {"name": "MMAR_JOB_NAME", "value": contract.name_of(job)},
        {"name": "MMAR_STEP", "value": step["name"]},
        {"name": "MMAR_METRICS_PORT", "value": str(config.runtime_metrics_port)},
    ]
    if is_multinode(job, index):
        # Kubeflow's PET_* contract (torchrun reads these too); the argv refers to them as $(PET_...)
        service = child_name(job, index)
        env += [
            {"name": "PET_NNODES", "value": str(step["nodes"])},
            {"name": "PET_NPROC_PER_NODE", "value": str(max(contract.gpus_of(job, index), 1))},
            {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
            {"name": "PET_MASTER_ADDR", "value": f"{child_name(job, index)}-0.{service}"},
            {"name": "PET_MASTER_PORT", "value": str(contract.MASTER_PORT)},
        ]
    secret = contract.credentials_secret(job, index)
    if secret:
        # DICOMweb credentials: the kubelet resolves the Secret, so no credential passes through the operator
        # (it needs no RBAC on Secrets) and none appears in the spec, the Job's args or the status. Each key is
        # optional: a Secret holds username + password, or token.
        env += [{"name": variable, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
                for key, variable in contract.CREDENTIAL_ENV.items()]
    return env


def _volumes(job: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    spec = job["spec"]
    workspace, data = spec["mmar"]["claimName"], spec["data"]["claimName"]
    volumes = [{"name": "workspace", "persistentVolumeClaim": {"claimName": workspace}}]
    mounts = [{"name": "workspace", "mountPath": contract.WORKSPACE_ROOT}]
    data_volume = "workspace"
    if data != workspace:  # one claim may hold both: mount the same volume twice
        data_volume = "data"
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": data, "readOnly": spec["data"]["readOnly"]}})
    mounts.append({"name": data_volume, "mountPath": contract.DATA_ROOT, "readOnly": spec["data"]["readOnly"]})
    # PyTorch DataLoader workers and NCCL pass tensors through /dev/shm; the container default is 64 MiB
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(spec["shmSize"])}})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _container(name: str, argv: list[str], job: Mapping[str, Any], index: int, config: Config, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    spec = job["spec"]
    return {
        "name": name,
        "image": spec.get("image") or config.default_image,
        "imagePullPolicy": spec["imagePullPolicy"],
        "command": argv[:1],
        "args": argv[1:],
        "env": _env(job, index, config),
        "volumeMounts": copy.deepcopy(mounts),  # no aliasing between containers: callers may edit one
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        # the runtime writes its result JSON there; on a crash the log tail is kept instead
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def render_job(job: Mapping[str, Any], index: int, config: Config) -> dict[str, Any]:
    spec, policy = job["spec"], job["spec"]["runPolicy"]
    step = contract.steps_of(job)[index]
    volumes, mounts = _volumes(job)

    main = _container(CONTAINER, contract.step_argv(job, index), job, index, config, mounts)
    main["resources"] = _resources(job, index, config)
    # one metrics port per local rank (the runtime serves on base + LOCAL_RANK), so that the PodMonitor
    # (ports `metrics` and `metrics-<n>`) scrapes every GPU's process, not only local rank 0
    local_ranks = max(1, contract.gpus_of(job, index)) if step["type"] in ("train", "finetune") else 1
    main["ports"] = [{"name": "metrics" if rank == 0 else f"metrics-{rank}",
                      "containerPort": config.runtime_metrics_port + rank, "protocol": "TCP"}
                     for rank in range(local_ranks)]
    if is_multinode(job, index):
        main["ports"].append({"name": "rendezvous", "containerPort": contract.MASTER_PORT, "protocol": "TCP"})

    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": config.run_as_user,
            "runAsGroup": config.run_as_user,
            "fsGroup": config.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [main],
        "volumes": volumes,
    }
    init = contract.init_argv(job, index)
    if init is not None:
        pod["initContainers"] = [_container("mmar-init", init, job, index, config, mounts)]
    if is_multinode(job, index):
        # Every rank (rank 0 too: torchrun connects to its own store by name) first waits, bounded, for
        # rank 0's name to resolve; without cluster DNS the step then fails naming the cause, instead of
        # torchrun retrying name resolution for many minutes under a step that looks Running.
        wait = _container(RENDEZVOUS_CONTAINER, ["python", "-m", "mmar.distributed", "wait-for-address",
                                                 "$(PET_MASTER_ADDR)", str(RENDEZVOUS_DNS_SECONDS)], job, index, config, [])
        wait["resources"] = {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}}
        pod["initContainers"] = [wait, *pod.get("initContainers", [])]
    if is_multinode(job, index):
        pod["subdomain"] = child_name(job, index)
    for key in ("serviceAccountName", "nodeSelector", "tolerations", "imagePullSecrets"):
        if key in spec:
            pod[key] = spec[key]
    if "imagePullSecrets" not in spec and config.image_pull_secrets:  # the chart's runtime.imagePullSecrets
        pod["imagePullSecrets"] = [{"name": name} for name in config.image_pull_secrets]
    # Stopping a pod (preemption, eviction, `kubectl delete pod`, a node drain) sends SIGTERM: the runtime
    # then finishes its current batch, saves the training state (models/train_state.pt, the checkpoints) to
    # the PVC and writes its result, which takes seconds on a small model and up to a minute or two for a
    # large one on network storage; the default 30 s would SIGKILL a save half-way.
    pod["terminationGracePeriodSeconds"] = TERMINATION_GRACE_SECONDS

    job_spec: dict[str, Any] = {
        "backoffLimit": policy["backoffLimit"],
        # Kueue admits a suspended Job; the operator also holds it while the MMARJob is suspended
        "suspend": bool(policy["suspend"] or passthrough_labels(job).get(f"{KUEUE_PREFIX}queue-name")),
        # A preempted, evicted or deleted pod is not the step's fault: it does not count against
        # backoffLimit, and the Job starts the next pod, which resumes from the state on the PVC. Evictions and
        # preemptions carry the DisruptionTarget condition; a pod deleted by hand or by a controller carries
        # none, but its `mmar` container stops on SIGTERM with exit code 143 (128 + 15), which the runtime
        # keeps for exactly that case. (podFailurePolicy needs restartPolicy Never, as rendered below.)
        "podFailurePolicy": {"rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [SIGTERM_EXIT]}},
        ]},
        "template": {"metadata": {"labels": _metadata(job, index)["labels"]}, "spec": pod},
    }
    if "activeDeadlineSeconds" in policy:
        job_spec["activeDeadlineSeconds"] = policy["activeDeadlineSeconds"]
    # No ttlSecondsAfterFinished here: the operator sets it on a finished Job once the step's result is
    # recorded in the MMARJob's status (reconcile._expire_recorded). Set at creation, the TTL controller
    # could delete the Job and its pods, with the termination message, before the result was read.
    if step["nodes"] > 1:
        job_spec.update(completionMode="Indexed", completions=step["nodes"], parallelism=step["nodes"])
    meta = _metadata(job, index)
    meta["annotations"] = {SPEC_HASH: spec_hash(job, index)}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
