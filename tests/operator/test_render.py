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
    if nodes > 1:  # first every rank waits, bounded, for rank 0's name (mmar.distributed.wait_for_address)
        wait, *init = init
        assert wait["name"] == render.RENDEZVOUS_CONTAINER and wait["volumeMounts"] == []
        assert wait["command"] + wait["args"] == ["python", "-m", "mmar.distributed", "wait-for-address",
                                                  "$(PET_MASTER_ADDR)", str(render.RENDEZVOUS_DNS_SECONDS)]
        name = render.child_name(manifest(), kind)
        assert {"name": "PET_MASTER_ADDR", "value": f"{name}-0.{name}"} in wait["env"]
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
        if container["name"] == render.RENDEZVOUS_CONTAINER:  # resolves a name: no volume
            assert container["volumeMounts"] == []
            continue
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
    name = render.child_name(manifest(), kind)
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
            assert meta["labels"][render.LABEL_STEP] == contract.steps_of(job)[index]["name"]
            assert meta["labels"][render.LABEL_UID] == "uid-1"  # the owner's uid: what makes a Job this MMARJob's
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


def test_default_resources_per_step_type():
    """The operator's per-type defaults (chart runtime.stepResources) come before its one default; the
    MMARJob's own resources before both; a type without its own default gets the one default."""
    small = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
    big = {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "32Gi"}}
    config = Config(default_resources={"requests": {"cpu": "1"}}, step_resources={"convert": small, "train": big})
    job = contract.parse(manifest(STEPS["convert"], STEPS["train"], STEPS["validate"], gpusPerNode=1))
    res = [render.render_step(job, i, config)[0]["spec"]["template"]["spec"]["containers"][0]["resources"] for i in range(3)]
    assert res[0] == small
    assert res[1] == {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"}}
    assert res[2] == {"requests": {"cpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
    job = contract.parse(manifest(STEPS["convert"], resources={"requests": {"cpu": "2"}}))
    assert render.render_step(job, 0, config)[0]["spec"]["template"]["spec"]["containers"][0]["resources"] == {"requests": {"cpu": "2"}}


def test_preemption_is_not_a_failure_and_sigterm_has_time_to_save():
    """A pod deleted (exit 143 of container mmar after SIGTERM) or evicted/preempted (DisruptionTarget)
    is retried by the Job without counting against backoffLimit; podFailurePolicy needs restartPolicy
    Never; the grace period leaves the runtime time to save its state."""
    for kind, nodes in CASES:
        job, pod = pod_of(rendered(kind, nodes)[1])
        rules = job["spec"]["podFailurePolicy"]["rules"]
        assert {"action": "Ignore", "onExitCodes": {"containerName": "mmar", "operator": "In", "values": [143]}} in rules
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
        assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 60
        assert all(r["action"] != "Ignore" or r.get("onExitCodes", {}).get("values") in (None, [143]) for r in rules)


def test_chart_default_pull_secrets_unless_the_mmarjob_names_its_own():
    config = Config(image_pull_secrets=("regcred", "mirror"))
    _, pod = pod_of(render.render_step(contract.parse(manifest(STEPS["train"])), 0, config))
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    _, pod = pod_of(render.render_step(contract.parse(manifest(STEPS["train"], imagePullSecrets=[{"name": "own"}])), 0, config))
    assert pod["imagePullSecrets"] == [{"name": "own"}]
    _, pod = pod_of(render.render_step(contract.parse(manifest(STEPS["train"])), 0, Config()))
    assert "imagePullSecrets" not in pod


def test_config_step_resources_pull_secrets_and_pending_timeout_from_env(monkeypatch):
    monkeypatch.setenv("MMAR_OPERATOR_STEP_RESOURCES", '{"convert": {"requests": {"cpu": "500m"}}}')
    monkeypatch.setenv("MMAR_OPERATOR_IMAGE_PULL_SECRETS", "regcred, mirror")
    monkeypatch.setenv("MMAR_OPERATOR_PENDING_TIMEOUT_SECONDS", "90")
    config = Config.from_env()
    assert config.step_resources == {"convert": {"requests": {"cpu": "500m"}}}
    assert (config.image_pull_secrets, config.pending_timeout_seconds) == (("regcred", "mirror"), 90)
    monkeypatch.setenv("MMAR_OPERATOR_STEP_RESOURCES", '{"convrt": {"requests": {"cpu": "500m"}}}')
    with pytest.raises(ValueError, match="MMAR_OPERATOR_STEP_RESOURCES: 'convrt' is not a step type"):
        Config.from_env()
    monkeypatch.setenv("MMAR_OPERATOR_STEP_RESOURCES", '{"convert": {"cpu": "1"}}')
    with pytest.raises(ValueError, match="MMAR_OPERATOR_STEP_RESOURCES: convert must be"):
        Config.from_env()
    monkeypatch.delenv("MMAR_OPERATOR_STEP_RESOURCES")
    monkeypatch.setenv("MMAR_OPERATOR_PENDING_TIMEOUT_SECONDS", "0")
    with pytest.raises(ValueError, match="MMAR_OPERATOR_PENDING_TIMEOUT_SECONDS must be at least 1"):
        Config.from_env()


def test_config_step_types_are_the_contracts():
    from mmar_operator import config as config_module

    assert config_module.STEP_TYPES == contract.STEP_TYPES


def test_rank_zero_address_wait_is_bounded_and_names_the_cause():
    from mmar import distributed
    from mmar.errors import MMARError

    clock = [0.0]
    calls = []

    def resolve(host, port):
        calls.append(host)
        if len(calls) < 3:
            raise OSError(-3, "Temporary failure in name resolution")
        return [(2, 1, 6, "", ("10.244.0.7", 0))]

    def sleep(seconds):
        clock[0] += seconds

    assert distributed.wait_for_address("j-0.j", 30, resolve=resolve, sleep=sleep, clock=lambda: clock[0]) == "10.244.0.7"
    calls.clear()
    clock[0] = 0.0

    def never(host, port):
        raise OSError(-3, "Temporary failure in name resolution")

    with pytest.raises(MMARError, match=r"rank 0's address j-0.j did not resolve within 5 s .*Temporary failure in name resolution"):
        distributed.wait_for_address("j-0.j", 5, resolve=never, sleep=sleep, clock=lambda: clock[0])
    assert 5 <= clock[0] < 8  # bounded: it gave up right after the limit


def test_a_child_name_is_mmarjob_step_and_a_hash_of_the_owner_uid_and_step():
    """Issue 32 item 4: `<mmarjob>-<index>-<step>` let two MMARJobs want one name ("a" with step "x-1-train",
    "a-0-x" with its second step "train"); the owner's uid in the name keeps them apart, and the step's name,
    not its index, keeps a child's name when a step is inserted before it."""
    a = contract.parse({**manifest({"type": "train", "name": "x-1-train"}, uid="uid-a"), "metadata": {"name": "a", "namespace": "ns", "uid": "uid-a"}})
    b = contract.parse({**manifest({"type": "validate"}, {"type": "train"}), "metadata": {"name": "a-0-x", "namespace": "ns", "uid": "uid-b"}})
    names = {render.child_name(a, 0), render.child_name(b, 0), render.child_name(b, 1)}
    assert len(names) == 3
    import hashlib
    assert render.child_name(b, "train") == "a-0-x-train-" + hashlib.sha256(b"uid-b/train").hexdigest()[:5]
    assert render.child_name(b, 1) == render.child_name(b, "train")
    # the same MMARJob name and step in another MMARJob (another uid) is another name
    assert render.child_name({**b, "metadata": {**b["metadata"], "uid": "uid-c"}}, "train") != render.child_name(b, "train")
    # the longest names: the readable part is cut, the hash kept; still a DNS label with room for "-63"
    longest = contract.parse({**manifest({"type": "train", "name": "t" * 20}), "metadata": {"name": "m" * 36, "namespace": "ns", "uid": "u"}})
    name = render.child_name(longest, 0)
    assert name == "m" * 36 + "-" + "t" * 17 + "-" + hashlib.sha256(b"u/" + b"t" * 20).hexdigest()[:5]
    assert len(name) == render.CHILD_NAME_MAX and DNS_LABEL.match(name)
    cut = contract.parse({**manifest({"type": "train", "name": "t" * 16 + "-abc"}), "metadata": {"name": "m" * 36, "namespace": "ns", "uid": "u"}})
    assert render.child_name(cut, 0).startswith("m" * 36 + "-" + "t" * 16 + "-") and "--" not in render.child_name(cut, 0)  # no "-" left at the cut
