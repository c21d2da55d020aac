"""render: every step kind, single and multi-node, as Kubernetes would accept it (official schemas, strict)."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest

from mmar import job as contract
from mmar_operator import render
from mmar_operator.config import Config
from operator_helpers import EXAMPLES, K8S_VERSIONS, manifest

CONFIG = Config(default_image="registry.example/mmar:1.0", runtime_metrics_port=9400, run_as_user=1000)
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

STEPS = {
    "convert": {"type": "convert", "input": "dicom", "output": "nifti", "resolution": [1.0], "force": True},
    "train": {"type": "train", "set": {"epochs": 5}},
    "finetune": {"type": "finetune", "ckpt": "models/model.pt"},
    "validate": {"type": "validate", "model": "ckpt"},
    "infer": {"type": "infer", "key": "validation"},
    "export": {"type": "export", "formats": ["torchscript", "onnx"]},
}
CASES = [(kind, 1) for kind in STEPS] + [("train", 3), ("finetune", 2)]


def rendered(kind: str, nodes: int, **spec):
    step = dict(STEPS[kind], nodes=nodes)
    job = contract.parse(manifest(step, task="segmentation", gpusPerNode=4, **spec))
    return job, render.render_step(job, 0, CONFIG)


def pod_of(objects):
    job = next(o for o in objects if o["kind"] == "Job")
    return job, job["spec"]["template"]["spec"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_is_valid_kubernetes(version):
    """All step kinds, single and multi-node, and the examples' steps, against one version's schemas."""
    objects = [obj for kind, nodes in CASES for obj in rendered(kind, nodes)[1]]
    for path in EXAMPLES:
        body = contract.load(path)
        body["metadata"].update(uid="0f0e", namespace="ns")
        job = contract.parse(body)
        objects += [o for i in range(len(job["spec"]["steps"])) for o in render.render_step(job, i, CONFIG)]
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("kind, nodes", CASES)
def test_pod_runs_the_contract_argv(kind, nodes):
    job, objects = rendered(kind, nodes)
    _, pod = pod_of(objects)
    main = pod["containers"][0]
    assert main["command"] + main["args"] == contract.step_argv(job, 0)
    assert main["image"] == CONFIG.default_image
    assert main["terminationMessagePolicy"] == "FallbackToLogsOnError"
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["MMAR_JOB_NAME"] == "spleen" and env["MMAR_STEP"] == kind and env["MMAR_METRICS_PORT"] == "9400"
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in main["ports"]
    init = pod.get("initContainers", [])
    if kind == "convert":
        assert init == []  # convert does not touch the MMAR
    else:
        assert [c["command"] + c["args"] for c in init] == [contract.init_argv(job, 0)]


@pytest.mark.parametrize("kind, nodes", CASES)
def test_restricted_security_and_volumes(kind, nodes):
    _, objects = rendered(kind, nodes)
    _, pod = pod_of(objects)
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["runAsNonRoot"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert set(mounts) == {"/workspace", "/data", "/dev/shm"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == "ws"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "data"
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}


def test_gpus_and_resources():
    _, objects = rendered("train", 1, resources={"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi"}})
    resources = pod_of(objects)[1]["containers"][0]["resources"]
    assert resources == {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "16Gi", "nvidia.com/gpu": "4"}}
    _, objects = rendered("convert", 1)
    assert "limits" not in pod_of(objects)[1]["containers"][0]["resources"]  # convert asks for no GPU


def test_single_node_is_a_plain_job_without_service():
    _, objects = rendered("train", 1)
    assert [o["kind"] for o in objects] == ["Job"]
    job, pod = pod_of(objects)
    assert "completionMode" not in job["spec"] and "subdomain" not in pod
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["podFailurePolicy"]["rules"][0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


@pytest.mark.parametrize("kind", ["train", "finetune"])
def test_multi_node_is_an_indexed_job_with_a_headless_service(kind):
    job_obj, objects = rendered(kind, 3)
    assert [o["kind"] for o in objects] == ["Service", "Job"]  # the Service first: rank 0 must resolve
    service, job = objects
    name = f"spleen-0-{kind}"
    assert service["metadata"]["name"] == job["metadata"]["name"] == name
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["ports"][0]["port"] == contract.MASTER_PORT
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    pod_labels = spec["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in service["spec"]["selector"].items())
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == name
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["PET_NNODES"]["value"] == "3" and env["PET_NPROC_PER_NODE"]["value"] == "4"
    assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # an Indexed Job's pod is named <job>-<index>; with the subdomain that is its DNS name
    assert env["PET_MASTER_ADDR"]["value"] == f"{name}-0.{name}"
    assert env["PET_MASTER_PORT"]["value"] == str(contract.MASTER_PORT)
    args = pod["containers"][0]["args"]
    assert "--node_rank=$(PET_NODE_RANK)" in args and "--master_addr=$(PET_MASTER_ADDR)" in args


def test_names_labels_owner_and_longest_names_fit():
    body = manifest({"type": "train", "name": "a" * 20, "nodes": 2}, *({"type": "validate", "name": f"v{i}"} for i in range(15)))
    body["metadata"].update(name="m" * 36, labels={"kueue.x-k8s.io/queue-name": "gpu", "team": "x"})
    job = contract.parse(body)
    for index in range(16):
        for obj in render.render_step(job, index, CONFIG):
            meta = obj["metadata"]
            # an indexed pod's hostname is "<job>-<rank>": it must stay a 63-character DNS label
            assert DNS_LABEL.match(meta["name"]) and len(meta["name"]) + len("-63") <= 63
            assert meta["namespace"] == "ns"
            assert meta["ownerReferences"] == [{"apiVersion": "mmar.dev/v1alpha1", "kind": "MMARJob", "name": "m" * 36, "uid": "uid-1",
                                                "controller": True, "blockOwnerDeletion": True}]
            assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "gpu" and "team" not in meta["labels"]
            assert meta["labels"][render.LABEL_STEP_INDEX] == str(index)
            if obj["kind"] == "Job":
                assert obj["spec"]["suspend"] is True  # created suspended: Kueue admits it


def test_spec_passthrough_and_run_policy():
    _, objects = rendered("validate", 1, image="my/image:2", imagePullPolicy="Always", serviceAccountName="trainer",
                          nodeSelector={"gpu": "a100"}, tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                          imagePullSecrets=[{"name": "regcred"}], shmSize="16Gi",
                          runPolicy={"backoffLimit": 2, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 60, "suspend": True})
    job, pod = pod_of(objects)
    assert (job["spec"]["backoffLimit"], job["spec"]["activeDeadlineSeconds"], job["spec"]["suspend"]) == (2, 3600, True)
    # the TTL is set on the finished Job once its result is recorded (handlers), never at creation
    assert "ttlSecondsAfterFinished" not in job["spec"]
    assert pod["containers"][0]["image"] == "my/image:2" and pod["containers"][0]["imagePullPolicy"] == "Always"
    assert pod["serviceAccountName"] == "trainer" and pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "16Gi"


def test_one_claim_mounted_twice_and_read_only_data():
    _, objects = rendered("train", 1, mmar={"claimName": "shared"}, data={"claimName": "shared", "path": "ds"})
    pod = pod_of(objects)[1]
    assert [v["name"] for v in pod["volumes"]] == ["workspace", "dshm"]
    assert {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]} == {"/workspace": "workspace", "/data": "workspace", "/dev/shm": "dshm"}
    _, objects = rendered("train", 1, data={"claimName": "data", "readOnly": True})
    pod = pod_of(objects)[1]
    assert next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/data")["readOnly"] is True


def test_the_strict_check_is_not_vacuous():
    _, objects = rendered("train", 2)
    job = objects[1]
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 4  # a typo'd field
    with pytest.raises(kubernetes_validate.ValidationError, match="'gpus' was unexpected"):
        kubernetes_validate.validate(job, K8S_VERSIONS[0], strict=True)


def test_operator_default_resources_never_give_convert_a_gpu():
    config = Config(default_resources={"requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 1}})
    job = contract.parse(manifest(STEPS["convert"], STEPS["train"], gpusPerNode=2))
    convert = render.render_step(job, 0, config)[0]["spec"]["template"]["spec"]["containers"][0]["resources"]
    train = render.render_step(job, 1, config)[0]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert convert == {"requests": {"cpu": "4", "memory": "16Gi"}}
    assert train == {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"nvidia.com/gpu": "2"}}
    # the MMARJob's own resources win over the operator's default
    job = contract.parse(manifest(STEPS["train"], resources={"requests": {"cpu": "1"}}))
    assert render.render_step(job, 0, config)[0]["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "1"}


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("MMAR_OPERATOR_DEFAULT_IMAGE", "r/mmar:9")
    monkeypatch.setenv("MMAR_OPERATOR_DEFAULT_RESOURCES", '{"requests": {"cpu": "2"}}')
    monkeypatch.setenv("MMAR_OPERATOR_NAMESPACES", "a, b,")
    monkeypatch.setenv("MMAR_OPERATOR_RESYNC_SECONDS", "5")
    config = Config.from_env()
    assert (config.default_image, config.default_resources, config.namespaces, config.resync_seconds) == ("r/mmar:9", {"requests": {"cpu": "2"}}, ("a", "b"), 5)
    monkeypatch.setenv("MMAR_OPERATOR_RESYNC_SECONDS", "soon")
    with pytest.raises(ValueError, match="MMAR_OPERATOR_RESYNC_SECONDS must be an integer"):
        Config.from_env()
    monkeypatch.setenv("MMAR_OPERATOR_RESYNC_SECONDS", "5")
    monkeypatch.setenv("MMAR_OPERATOR_DEFAULT_RESOURCES", '{"cpu": 2}')
    with pytest.raises(ValueError, match="MMAR_OPERATOR_DEFAULT_RESOURCES"):
        Config.from_env()


def test_rendered_objects_share_no_mutable_parts():
    """Plain data a caller can edit safely: no list or dict appears twice (YAML dumps show no anchors)."""
    import yaml

    _, objects = rendered("train", 2)
    assert "&id" not in yaml.safe_dump_all(objects)
