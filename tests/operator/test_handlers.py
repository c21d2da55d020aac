"""handlers + apply against an in-memory API server: create, replayed create, step transitions, failure,
operator restart, suspend, Kueue, deletion, transient errors, adoption."""

from __future__ import annotations

import re

import copy

import kopf
import pytest
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry

from mmar_operator import handlers, render
from mmar_operator.apply import AdoptionError, Cluster, is_transient
from mmar_operator.config import Config
from mmar_operator.metrics import Metrics
from operator_helpers import FakeKube, manifest

CONFIG = Config(default_image="registry.example/mmar:1.0")
TRAIN_RESULT = '{"command":"train","epochs":5,"key_metric":"val_mean_dice","best_metric":0.91,"best_epoch":5}'
EXPORT_RESULT = ('{"command":"export","files":["/workspace/mmar/models/model.ts"],"formats":["torchscript"],"skipped":[],'
                 '"precision":"fp32","input_shape":[1,1,96,96,96],"max_abs_diff":{"torchscript":1e-06}}')


@pytest.fixture
def kube():
    return FakeKube()


@pytest.fixture
def cluster(kube):
    return Cluster(kube, kube, kube, sleep=lambda s: None)


@pytest.fixture
def metrics():
    return Metrics(CollectorRegistry())


def body(kube, *steps, **spec):
    return kube.add_mmarjob(manifest(*(steps or ({"type": "train"}, {"type": "export"})), **spec))


def reconcile(kube, cluster, metrics, now="2026-01-01T00:00:00Z"):
    """What any trigger does: reconcile the MMARJob as the API server has it now."""
    return handlers.reconcile(kube.mmarjob(), cluster, CONFIG, metrics, now=now)


def value(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_create_makes_the_first_step_only(kube, cluster, metrics):
    body(kube)
    st = reconcile(kube, cluster, metrics)
    assert [j["metadata"]["name"] for j in kube.jobs()] == ["spleen-0-train"]
    assert kube.jobs()[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/mmar:1.0"
    assert st["phase"] == "Pending" and [s["phase"] for s in st["steps"]] == ["Pending", "Waiting"]
    assert kube.mmarjob()["status"] == st  # patched through the status subresource
    assert value(metrics, "mmar_operator_jobs", phase="Pending") == 1
    assert value(metrics, "mmar_operator_children_created_total", kind="Job") == 1


def test_replayed_create_adopts_instead_of_duplicating(kube, cluster, metrics):
    body(kube)
    stale = kube.mmarjob()  # the event as first delivered, without status
    handlers.reconcile(stale, cluster, CONFIG, metrics)
    kube.calls.clear()
    handlers.reconcile(stale, cluster, CONFIG, metrics)  # delivered again (watch replay): same old body
    assert len(kube.jobs()) == 1
    assert "create_job" not in kube.calls  # the Job was observed: nothing to create
    # even a replay that races the observation (409 on create) adopts the existing Job
    assert cluster.ensure(render.render_step(handlers.contract.parse(stale), 0, CONFIG)[0])["metadata"]["uid"] == kube.jobs()[0]["metadata"]["uid"]


def test_steps_move_through_success_to_the_end(kube, cluster, metrics):
    body(kube)
    reconcile(kube, cluster, metrics)
    kube.start("spleen-0-train", at="2026-01-01T00:00:00Z")
    assert reconcile(kube, cluster, metrics)["phase"] == "Running"
    assert value(metrics, "mmar_operator_jobs", phase="Running") == 1 and value(metrics, "mmar_operator_jobs", phase="Pending") == 0

    kube.finish("spleen-0-train", ok=True, message=TRAIN_RESULT, at="2026-01-01T02:00:00Z")
    st = reconcile(kube, cluster, metrics, now="2026-01-01T02:00:01Z")
    assert [j["metadata"]["name"] for j in kube.jobs()] == ["spleen-0-train", "spleen-1-export"]
    assert st["phase"] == "Running" and st["currentStep"] == "export"
    assert st["results"]["bestMetric"] == 0.91 and st["results"]["epochs"] == 5
    assert value(metrics, "mmar_operator_step_duration_seconds_sum", step="train") == 7200
    assert value(metrics, "mmar_operator_steps_finished_total", step="train", phase="Succeeded") == 1

    kube.start("spleen-1-export")
    kube.finish("spleen-1-export", ok=True, message=EXPORT_RESULT)
    st = reconcile(kube, cluster, metrics, now="2026-01-01T03:00:00Z")
    assert st["phase"] == "Succeeded" and st["results"]["exported"] == ["/workspace/mmar/models/model.ts"]
    assert next(c for c in st["conditions"] if c["type"] == "Succeeded")["status"] == "True"
    # later triggers change nothing and observe no duration twice
    kube.calls.clear()
    reconcile(kube, cluster, metrics, now="2026-01-02T00:00:00Z")
    assert "patch_status" not in kube.calls and "create_job" not in kube.calls
    assert value(metrics, "mmar_operator_step_duration_seconds_count", step="train") == 1


def test_failure_stops_the_job(kube, cluster, metrics):
    body(kube)
    reconcile(kube, cluster, metrics)
    kube.start("spleen-0-train")
    kube.finish("spleen-0-train", ok=False, message="Traceback (most recent call last):\nValueError: label shape (1, 96, 96) != image shape")
    st = reconcile(kube, cluster, metrics)
    assert st["phase"] == "Failed" and "ValueError: label shape" in st["message"]
    assert [j["metadata"]["name"] for j in kube.jobs()] == ["spleen-0-train"]  # export never created
    reconcile(kube, cluster, metrics)
    assert len(kube.jobs()) == 1
    assert value(metrics, "mmar_operator_steps_finished_total", step="train", phase="Failed") == 1


def test_operator_restart_is_idempotent(kube, cluster, metrics):
    body(kube)
    reconcile(kube, cluster, metrics)
    kube.start("spleen-0-train")
    reconcile(kube, cluster, metrics)
    before = copy.deepcopy(kube.objects)
    kube.calls.clear()
    fresh = Cluster(kube, kube, kube, sleep=lambda s: None)  # a new process: nothing in memory
    st = handlers.reconcile(kube.mmarjob(), fresh, CONFIG, Metrics(CollectorRegistry()), now="2026-01-01T05:00:00Z")
    assert kube.objects == before and st == kube.mmarjob()["status"]
    assert not {"create_job", "create_service", "patch_status", "patch_job"} & set(kube.calls)


def test_multi_node_creates_service_then_indexed_job(kube, cluster, metrics):
    body(kube, {"type": "train", "nodes": 2})
    reconcile(kube, cluster, metrics)
    assert kube.calls.index("create_service") < kube.calls.index("create_job")
    assert kube.objects[("Service", "ns", "spleen-0-train")]["spec"]["clusterIP"] == "None"
    assert kube.jobs()[0]["spec"]["completionMode"] == "Indexed"


def test_a_spec_the_schema_cannot_judge_fails_with_its_reason(kube, cluster, metrics):
    """`set` keys are free-form in the CRD (a map key's length cannot be bounded for CEL); the contract
    refuses KEY=VALUE keys, and the operator reports that as InvalidSpec."""
    from operator_helpers import schema_errors

    bad = manifest({"type": "train", "set": {"epochs=5": 1}})
    assert schema_errors(bad) == []
    kube.add_mmarjob(bad)
    st = reconcile(kube, cluster, metrics)
    assert st["phase"] == "Failed" and "spec.steps[0].set" in st["message"]
    assert next(c for c in st["conditions"] if c["type"] == "Failed")["reason"] == "InvalidSpec"


def test_invalid_spec_fails_without_raising(kube, cluster, metrics):
    body(kube, {"type": "infer", "nodes": 2})
    st = reconcile(kube, cluster, metrics)
    assert st["phase"] == "Failed" and "spec.steps[0].nodes" in st["message"]
    assert kube.jobs() == []
    assert value(metrics, "mmar_operator_jobs", phase="Failed") == 1


def test_suspend_holds_and_releases_the_running_step(kube, cluster, metrics):
    body(kube)
    reconcile(kube, cluster, metrics)
    kube.start("spleen-0-train")
    kube.objects[("MMARJob", "ns", "spleen")]["spec"]["runPolicy"] = {"suspend": True}
    st = reconcile(kube, cluster, metrics)
    assert kube.jobs()[0]["spec"]["suspend"] is True and st["phase"] == "Suspended"
    kube.objects[("MMARJob", "ns", "spleen")]["spec"]["runPolicy"] = {"suspend": False}
    reconcile(kube, cluster, metrics)
    assert kube.jobs()[0]["spec"]["suspend"] is False


def test_created_suspended_never_starts_a_step(kube, cluster, metrics):
    body(kube, runPolicy={"suspend": True})
    assert reconcile(kube, cluster, metrics)["phase"] == "Suspended"
    assert kube.jobs() == []


def test_resume_says_what_is_true_at_once(kube, cluster, metrics):
    """The reconcile that releases a suspended Job reports the step as resuming, not as queued by Kueue."""
    body(kube)
    reconcile(kube, cluster, metrics)
    kube.start("spleen-0-train")
    kube.objects[("MMARJob", "ns", "spleen")]["spec"]["runPolicy"] = {"suspend": True}
    reconcile(kube, cluster, metrics)
    kube.objects[("MMARJob", "ns", "spleen")]["spec"]["runPolicy"] = {"suspend": False}
    st = reconcile(kube, cluster, metrics)
    assert kube.jobs()[0]["spec"]["suspend"] is False
    assert st["phase"] == "Running" and st["steps"][0]["phase"] == "Running" and "Kueue" not in st["message"]


def test_ttl_is_set_only_after_the_result_is_recorded(kube, cluster, metrics):
    body(kube, runPolicy={"ttlSecondsAfterFinished": 0})
    reconcile(kube, cluster, metrics)
    assert "ttlSecondsAfterFinished" not in kube.jobs()[0]["spec"]  # a running Job has none
    kube.start("spleen-0-train")
    kube.finish("spleen-0-train", ok=True, message=TRAIN_RESULT)
    kube.calls.clear()
    st = reconcile(kube, cluster, metrics)
    assert st["steps"][0]["result"]["epochs"] == 5
    # the status patch (with the result) comes before the TTL that lets the TTL controller delete the Job
    assert kube.calls.index("patch_status") < kube.calls.index("patch_job")
    assert kube.jobs()[0]["spec"]["ttlSecondsAfterFinished"] == 0 and "ttlSecondsAfterFinished" not in kube.jobs()[1]["spec"]
    kube.delete("Job", "spleen-0-train")  # what the TTL controller does next
    st = reconcile(kube, cluster, metrics)
    assert st["steps"][0]["result"]["epochs"] == 5 and st["results"]["epochs"] == 5


def test_an_operator_killed_between_status_and_ttl_sets_the_ttl_on_its_next_pass(kube, cluster, metrics):
    body(kube, runPolicy={"ttlSecondsAfterFinished": 30})
    reconcile(kube, cluster, metrics)
    kube.start("spleen-0-train")
    kube.finish("spleen-0-train", ok=True, message=TRAIN_RESULT)

    def killed(*args, **kwargs):  # the process dies right after the status patch
        raise SystemExit("killed")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(handlers, "_expire_recorded", killed)
        with pytest.raises(SystemExit):
            reconcile(kube, cluster, metrics)
    assert kube.mmarjob()["status"]["steps"][0]["phase"] == "Succeeded"
    assert "ttlSecondsAfterFinished" not in kube.jobs()[0]["spec"]
    reconcile(kube, cluster, metrics)  # the restarted operator
    assert kube.jobs()[0]["spec"]["ttlSecondsAfterFinished"] == 30


def test_an_init_container_failure_shows_its_own_message(kube, cluster, metrics):
    body(kube, task="segmentation")
    reconcile(kube, cluster, metrics)
    kube.start("spleen-0-train")
    kube.fail_init("spleen-0-train", "error: /workspace/mmar is not empty and holds no MMAR (config/ missing)")
    st = reconcile(kube, cluster, metrics)
    assert st["phase"] == "Failed"
    assert "init container mmar-init exited with code 1: /workspace/mmar is not empty and holds no MMAR (config/ missing)" in st["message"]
    assert "Job has reached the specified backoff limit" in st["steps"][0]["message"]


def test_kueue_queue_name_is_passed_and_left_to_kueue(kube, cluster, metrics):
    mmarjob = manifest({"type": "train"})
    mmarjob["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpu"}
    kube.add_mmarjob(mmarjob)
    st = reconcile(kube, cluster, metrics)
    job = kube.jobs()[0]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu" and job["spec"]["suspend"] is True
    assert st["phase"] == "Pending" and "waits for admission by Kueue (queue gpu)" in st["message"]
    assert next(c for c in st["conditions"] if c["type"] == "Running")["reason"] == "Queued"
    kube.calls.clear()
    reconcile(kube, cluster, metrics)
    assert "patch_job" not in kube.calls  # the operator never unsuspends what Kueue holds
    kube.objects[("Job", "ns", "spleen-0-train")]["spec"]["suspend"] = False  # admitted by Kueue
    kube.start("spleen-0-train")
    assert reconcile(kube, cluster, metrics)["phase"] == "Running"


def test_deletion_collects_children_and_forgets_metrics(kube, cluster, metrics):
    body(kube, {"type": "train", "nodes": 2})
    reconcile(kube, cluster, metrics)
    owned = [o for (k, _, _), o in kube.objects.items() if k in ("Job", "Service")]
    assert owned and all(o["metadata"]["ownerReferences"][0]["uid"] == "uid-1" and o["metadata"]["ownerReferences"][0]["controller"] for o in owned)
    kube.delete("MMARJob", "spleen")
    kube.collect_garbage("uid-1")  # what Kubernetes does with controller ownerReferences
    runtime = handlers.Runtime()
    runtime.cluster, runtime.metrics = cluster, metrics
    handlers.forget("ns", "spleen", runtime)
    assert [k for k in kube.objects] == []
    assert value(metrics, "mmar_operator_jobs", phase="Pending") == 0
    # a late event of a collected child finds no parent and does nothing
    assert cluster.get_mmarjob("ns", "spleen") is None


def test_child_event_reconciles_the_parent(kube, cluster, metrics, monkeypatch):
    body(kube)
    reconcile(kube, cluster, metrics)
    kube.start("spleen-0-train")
    runtime = handlers.Runtime()
    runtime.cluster, runtime.metrics, runtime.config = cluster, metrics, CONFIG
    monkeypatch.setattr(handlers, "RUNTIME", runtime)
    handlers._on_child(type="MODIFIED", body=kube.jobs()[0])
    assert kube.mmarjob()["status"]["phase"] == "Running"


def test_unexpected_errors_become_kopf_retries_and_are_counted(kube, cluster, metrics):
    body(kube)
    kube.fail_next = [ApiException(status=403, reason="Forbidden")]
    runtime = handlers.Runtime()
    runtime.cluster, runtime.metrics, runtime.config = cluster, metrics, CONFIG
    with pytest.raises(kopf.TemporaryError):
        handlers.reconcile_guarded(kube.mmarjob(), runtime)
    assert value(metrics, "mmar_operator_reconcile_errors_total") == 1


# ------------------------------------------------------------------------------------------------- apply


def test_transient_errors_are_retried_with_backoff(kube):
    delays = []
    cluster = Cluster(kube, kube, kube, sleep=delays.append, base_delay=1.0)
    kube.fail_next = [ApiException(status=503), ApiException(status=429), ConnectionResetError()]
    assert cluster.jobs_of("ns", "spleen") == []
    assert len(delays) == 3 and delays[0] < delays[2] and all(0.5 <= d <= 10 for d in delays)


def test_permanent_errors_are_not_retried(kube):
    cluster = Cluster(kube, kube, kube, sleep=lambda s: pytest.fail("slept"))
    kube.fail_next = [ApiException(status=422, reason="Invalid")]
    with pytest.raises(ApiException):
        cluster.jobs_of("ns", "spleen")


def test_retries_give_up_after_the_last_attempt(kube):
    cluster = Cluster(kube, kube, kube, attempts=3, sleep=lambda s: None)
    kube.fail_next = [ApiException(status=500)] * 3
    with pytest.raises(ApiException):
        cluster.jobs_of("ns", "spleen")


@pytest.mark.parametrize("error, transient", [(ApiException(status=503), True), (ApiException(status=404), False),
                                              (TimeoutError(), True), (ValueError(), False)])
def test_is_transient(error, transient):
    assert is_transient(error) is transient


def test_orphan_with_our_name_is_adopted_and_foreign_one_refused(kube, cluster):
    job = handlers.contract.parse(manifest({"type": "train"}))
    desired = render.render_step(job, 0, CONFIG)[0]
    orphan = copy.deepcopy(desired)
    orphan["metadata"]["ownerReferences"] = []
    kube.create_namespaced_job("ns", orphan)
    live = cluster.ensure(desired)
    assert live["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    foreign = copy.deepcopy(desired)
    foreign["metadata"]["ownerReferences"][0].update(uid="someone-else", name="other")
    kube.delete("Job", desired["metadata"]["name"])
    kube.create_namespaced_job("ns", foreign)
    with pytest.raises(AdoptionError, match="controlled by MMARJob other"):
        cluster.ensure(desired)


def test_status_patch_of_a_deleted_mmarjob_is_ignored(kube, cluster):
    cluster.patch_status("ns", "gone", {"phase": "Running"})  # 404: nothing to report on


def test_kopf_handlers_are_registered():
    registry = kopf.get_default_registry()
    watching = {h.id: h.selector.any_name for h in registry._watching.get_all_handlers()}
    assert watching.get("child-job") == "jobs"
    changing = {(h.id, h.reason) for h in registry._changing.get_all_handlers() if h.selector.any_name == "mmarjobs"}
    assert {("create", "create"), ("update", "update"), ("resume", None), ("delete", "delete")} <= changing
    # ids become annotation keys (mmar.dev/<id>) when kopf retries a handler: valid label-name syntax only
    assert all(re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", h.id) for h in registry._changing.get_all_handlers())
    delete = next(h for h in registry._changing.get_all_handlers() if h.id == "delete")
    assert delete.requires_finalizer is False  # optional: deleting an MMARJob is never blocked
    # no timers or daemons: kopf would add a finalizer to every MMARJob to stop them
    assert list(registry._spawning.get_all_handlers()) == []
    assert not any(h.requires_finalizer for h in registry._changing.get_all_handlers())
    assert "unfinished_mmarjobs" in {h.id for h in registry._indexing.get_all_handlers()}


def test_the_index_holds_only_unfinished_mmarjobs():
    assert handlers.unfinished_mmarjobs(namespace="ns", name="a") == {("ns", "a"): None}
    assert handlers._unfinished(status={"phase": "Running"}) and handlers._unfinished(status=None)
    assert not handlers._unfinished(status={"phase": "Succeeded"}) and not handlers._unfinished(status={"phase": "Failed"})


def test_resync_reconciles_each_unfinished_mmarjob_periodically(kube, cluster, metrics):
    import asyncio

    body(kube)
    runtime = handlers.Runtime()
    runtime.cluster, runtime.metrics, runtime.config = cluster, metrics, CONFIG

    async def two_rounds():
        task = asyncio.get_running_loop().create_task(handlers.resync({("ns", "spleen"): None, ("ns", "gone"): None}, 0.01, runtime))
        await asyncio.sleep(0.2)
        task.cancel()

    asyncio.run(two_rounds())
    assert [j["metadata"]["name"] for j in kube.jobs()] == ["spleen-0-train"]  # created once, adopted after
    assert kube.calls.count("get_mmarjob") >= 4 and value(metrics, "mmar_operator_reconcile_errors_total") == 0


def test_startup_configures_kopf(kube, cluster, monkeypatch):
    runtime = handlers.Runtime()
    runtime.cluster = cluster
    monkeypatch.setattr(handlers, "RUNTIME", runtime)
    settings = kopf.OperatorSettings()
    handlers._startup(settings=settings)
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)
    assert handlers._probe() == "ok"


def test_a_step_appended_after_success_runs_and_stale_keys_are_cleared(kube, cluster, metrics):
    body(kube, {"type": "train"})
    reconcile(kube, cluster, metrics)
    kube.start("spleen-0-train")
    kube.finish("spleen-0-train", ok=True, message=TRAIN_RESULT)
    assert reconcile(kube, cluster, metrics)["phase"] == "Succeeded"
    assert "completionTime" in kube.mmarjob()["status"]
    kube.objects[("MMARJob", "ns", "spleen")]["spec"]["steps"].append({"type": "export"})
    st = reconcile(kube, cluster, metrics)
    assert st["phase"] == "Running" and [j["metadata"]["name"] for j in kube.jobs()] == ["spleen-0-train", "spleen-1-export"]
    assert "completionTime" not in kube.mmarjob()["status"]  # the merge patch removed it


def test_a_stale_event_never_reruns_a_finished_step(kube, cluster, metrics):
    """Step done and recorded, its Job deleted by ttlSecondsAfterFinished, then an old event arrives."""
    body(kube)
    reconcile(kube, cluster, metrics)
    stale = kube.mmarjob()  # status: train Pending
    kube.start("spleen-0-train")
    kube.finish("spleen-0-train", ok=True, message=TRAIN_RESULT)
    reconcile(kube, cluster, metrics)  # records train Succeeded, creates export
    kube.delete("Job", "spleen-0-train")
    runtime = handlers.Runtime()
    runtime.cluster, runtime.metrics, runtime.config = cluster, metrics, CONFIG
    handlers.reconcile_guarded(stale, runtime)
    assert [j["metadata"]["name"] for j in kube.jobs()] == ["spleen-1-export"]
    assert kube.mmarjob()["status"]["steps"][0]["phase"] == "Succeeded"


def test_events_for_a_deleted_or_deleting_mmarjob_do_nothing(kube, cluster, metrics):
    runtime = handlers.Runtime()
    runtime.cluster, runtime.metrics, runtime.config = cluster, metrics, CONFIG
    assert handlers.reconcile_guarded({"metadata": {"namespace": "ns", "name": "spleen"}}, runtime) is None
    mmarjob = body(kube)
    kube.objects[("MMARJob", "ns", "spleen")]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert handlers.reconcile_guarded(mmarjob, runtime) is None
    assert kube.jobs() == []
