"""handlers + apply against an in-memory API server: create, replayed create, step transitions, failure,
operator restart, suspend, Kueue, deletion, transient errors, adoption."""

from __future__ import annotations

import copy

import kopf
import pytest
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry

from mmar import job as contract

from mmar_operator import handlers, render
from mmar_operator import reconcile as reconciler
from mmar_operator.apply import AdoptionError, Cluster, is_transient
from mmar_operator.config import Config
from mmar_operator.event_filter import CREATED
from mmar_operator.metrics import Metrics
from mmar_operator.state import OperatorState
from operator_helpers import FakeKube, manifest

CONFIG = Config(default_image="registry.example/mmar:1.0")
TRAIN_RESULT = '{"command":"train","epochs":5,"key_metric":"val_mean_dice","best_metric":0.91,"best_epoch":5}'
TRAIN, EXPORT = (render.child_name(manifest(), step) for step in ("train", "export"))  # spleen, uid uid-1
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
    return reconciler.reconcile(kube.mmarjob(), cluster, CONFIG, metrics, now=now)


def value(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_create_makes_the_first_step_only(kube, cluster, metrics):
    body(kube)
    st = reconcile(kube, cluster, metrics)
    assert [j["metadata"]["name"] for j in kube.jobs()] == [TRAIN]
    assert kube.jobs()[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/mmar:1.0"
    assert st["phase"] == "Pending" and [s["phase"] for s in st["steps"]] == ["Pending", "Waiting"]
    assert kube.mmarjob()["status"] == st  # patched through the status subresource
    assert value(metrics, "mmar_operator_jobs", phase="Pending") == 1
    assert value(metrics, "mmar_operator_children_created_total", kind="Job") == 1


def test_replayed_create_adopts_instead_of_duplicating(kube, cluster, metrics):
    body(kube)
    stale = kube.mmarjob()  # the event as first delivered, without status
    reconciler.reconcile(stale, cluster, CONFIG, metrics)
    kube.calls.clear()
    reconciler.reconcile(stale, cluster, CONFIG, metrics)  # delivered again (watch replay): same old body
    assert len(kube.jobs()) == 1
    assert "create_job" not in kube.calls  # the Job was observed: nothing to create
    # even a replay that races the observation (409 on create) adopts the existing Job
    assert cluster.ensure(render.render_step(contract.parse(stale), 0, CONFIG)[0])["metadata"]["uid"] == kube.jobs()[0]["metadata"]["uid"]


def test_steps_move_through_success_to_the_end(kube, cluster, metrics):
    body(kube)
    reconcile(kube, cluster, metrics)
    kube.start(TRAIN, at="2026-01-01T00:00:00Z")
    assert reconcile(kube, cluster, metrics)["phase"] == "Running"
    assert value(metrics, "mmar_operator_jobs", phase="Running") == 1 and value(metrics, "mmar_operator_jobs", phase="Pending") == 0

    kube.finish(TRAIN, ok=True, message=TRAIN_RESULT, at="2026-01-01T02:00:00Z")
    st = reconcile(kube, cluster, metrics, now="2026-01-01T02:00:01Z")
    assert [j["metadata"]["name"] for j in kube.jobs()] == [TRAIN, EXPORT]
    assert st["phase"] == "Running" and st["currentStep"] == "export"
    assert st["results"]["bestMetric"] == 0.91 and st["results"]["epochs"] == 5
    assert value(metrics, "mmar_operator_step_duration_seconds_sum", step="train") == 7200
    assert value(metrics, "mmar_operator_steps_finished_total", step="train", phase="Succeeded") == 1

    kube.start(EXPORT)
    kube.finish(EXPORT, ok=True, message=EXPORT_RESULT)
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
    kube.start(TRAIN)
    kube.finish(TRAIN, ok=False, message="Traceback (most recent call last):\nValueError: label shape (1, 96, 96) != image shape")
    st = reconcile(kube, cluster, metrics)
    assert st["phase"] == "Failed" and "ValueError: label shape" in st["message"]
    assert [j["metadata"]["name"] for j in kube.jobs()] == [TRAIN]  # export never created
    reconcile(kube, cluster, metrics)
    assert len(kube.jobs()) == 1
    assert value(metrics, "mmar_operator_steps_finished_total", step="train", phase="Failed") == 1


def test_operator_restart_is_idempotent(kube, cluster, metrics):
    body(kube)
    reconcile(kube, cluster, metrics)
    kube.start(TRAIN)
    reconcile(kube, cluster, metrics)
    before = copy.deepcopy(kube.objects)
    kube.calls.clear()
    fresh = Cluster(kube, kube, kube, sleep=lambda s: None)  # a new process: nothing in memory
    st = reconciler.reconcile(kube.mmarjob(), fresh, CONFIG, Metrics(CollectorRegistry()), now="2026-01-01T05:00:00Z")
    assert kube.objects == before and st == kube.mmarjob()["status"]
    assert not {"create_job", "create_service", "patch_status", "patch_job"} & set(kube.calls)


def test_multi_node_creates_service_then_indexed_job(kube, cluster, metrics):
    body(kube, {"type": "train", "nodes": 2})
    reconcile(kube, cluster, metrics)
    assert kube.calls.index("create_service") < kube.calls.index("create_job")
    assert kube.objects[("Service", "ns", TRAIN)]["spec"]["clusterIP"] == "None"
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
    kube.start(TRAIN)
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
    kube.start(TRAIN)
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
    kube.start(TRAIN)
    kube.finish(TRAIN, ok=True, message=TRAIN_RESULT)
    kube.calls.clear()
    st = reconcile(kube, cluster, metrics)
    assert st["steps"][0]["result"]["epochs"] == 5
    # the status patch (with the result) comes before the TTL that lets the TTL controller delete the Job
    assert kube.calls.index("patch_status") < kube.calls.index("patch_job")
    assert kube.jobs()[0]["spec"]["ttlSecondsAfterFinished"] == 0 and "ttlSecondsAfterFinished" not in kube.jobs()[1]["spec"]
    kube.delete("Job", TRAIN)  # what the TTL controller does next
    st = reconcile(kube, cluster, metrics)
    assert st["steps"][0]["result"]["epochs"] == 5 and st["results"]["epochs"] == 5


def test_an_operator_killed_between_status_and_ttl_sets_the_ttl_on_its_next_pass(kube, cluster, metrics):
    body(kube, runPolicy={"ttlSecondsAfterFinished": 30})
    reconcile(kube, cluster, metrics)
    kube.start(TRAIN)
    kube.finish(TRAIN, ok=True, message=TRAIN_RESULT)

    def killed(*args, **kwargs):  # the process dies right after the status patch
        raise SystemExit("killed")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reconciler, "_expire_recorded", killed)
        with pytest.raises(SystemExit):
            reconcile(kube, cluster, metrics)
    assert kube.mmarjob()["status"]["steps"][0]["phase"] == "Succeeded"
    assert "ttlSecondsAfterFinished" not in kube.jobs()[0]["spec"]
    reconcile(kube, cluster, metrics)  # the restarted operator
    assert kube.jobs()[0]["spec"]["ttlSecondsAfterFinished"] == 30


def test_an_init_container_failure_shows_its_own_message(kube, cluster, metrics):
    body(kube, task="segmentation")
    reconcile(kube, cluster, metrics)
    kube.start(TRAIN)
    kube.fail_init(TRAIN, "error: /workspace/mmar is not empty and holds no MMAR (config/ missing)")
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
    kube.objects[("Job", "ns", TRAIN)]["spec"]["suspend"] = False  # admitted by Kueue
    kube.start(TRAIN)
    assert reconcile(kube, cluster, metrics)["phase"] == "Running"


def test_deletion_collects_children_and_forgets_metrics(kube, cluster, metrics):
    body(kube, {"type": "train", "nodes": 2})
    reconcile(kube, cluster, metrics)
    owned = [o for (k, _, _), o in kube.objects.items() if k in ("Job", "Service")]
    assert owned and all(o["metadata"]["ownerReferences"][0]["uid"] == "uid-1" and o["metadata"]["ownerReferences"][0]["controller"] for o in owned)
    kube.delete("MMARJob", "spleen")
    kube.collect_garbage("uid-1")  # what Kubernetes does with controller ownerReferences
    runtime = OperatorState()
    runtime.cluster, runtime.metrics = cluster, metrics
    reconciler.forget("ns", "spleen", runtime)
    assert [k for k in kube.objects] == []
    assert value(metrics, "mmar_operator_jobs", phase="Pending") == 0
    # a late event of a collected child finds no parent and does nothing
    assert cluster.get_mmarjob("ns", "spleen") is None


def test_child_event_reconciles_the_parent(kube, cluster, metrics, monkeypatch):
    body(kube)
    reconcile(kube, cluster, metrics)
    kube.start(TRAIN)
    runtime = OperatorState()
    runtime.cluster, runtime.metrics, runtime.config = cluster, metrics, CONFIG
    monkeypatch.setattr(handlers, "STATE", runtime)
    handlers._on_child(event={"type": "MODIFIED", "object": kube.jobs()[0]})
    assert kube.mmarjob()["status"]["phase"] == "Running"


def test_unexpected_errors_become_kopf_retries_and_are_counted(kube, cluster, metrics):
    body(kube)
    kube.fail_next = [ApiException(status=403, reason="Forbidden")]
    runtime = OperatorState()
    runtime.cluster, runtime.metrics, runtime.config = cluster, metrics, CONFIG
    with pytest.raises(kopf.TemporaryError):
        reconciler.reconcile_guarded(kube.mmarjob(), runtime)
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


def test_an_object_with_our_name_is_ours_only_when_we_control_it(kube, cluster):
    """No adoption (issue 32 item 5): an object of the wanted name without our uid as its controller, orphaned
    (no controller) or another's, is never taken over."""
    job = contract.parse(manifest({"type": "train"}))
    desired = render.render_step(job, 0, CONFIG)[0]
    ours = kube.create_namespaced_job("ns", copy.deepcopy(desired))
    assert cluster.ensure(desired)["metadata"]["uid"] == ours["metadata"]["uid"]  # a replayed create
    kube.delete("Job", desired["metadata"]["name"])
    orphan = copy.deepcopy(desired)
    orphan["metadata"]["ownerReferences"] = []
    kube.create_namespaced_job("ns", orphan)
    with pytest.raises(AdoptionError, match="has no controller, not by MMARJob spleen"):
        cluster.ensure(desired)
    assert kube.jobs()[0]["metadata"]["ownerReferences"] == []  # left alone
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
    assert watching.get("child-job") == "jobs" and watching.get("mmarjob") == "mmarjobs"
    # no on.create/on.update/on.resume/on.delete: kopf would diff every event and PATCH its annotations onto
    # every MMARJob (handlers.Triggers tells the cases apart instead)
    assert list(registry._changing.get_all_handlers()) == []
    # no timers or daemons: kopf would add a finalizer to every MMARJob to stop them
    assert list(registry._spawning.get_all_handlers()) == []
    assert "unfinished_mmarjobs" in {h.id for h in registry._indexing.get_all_handlers()}


def test_the_index_holds_only_unfinished_mmarjobs():
    assert handlers.unfinished_mmarjobs(namespace="ns", name="a") == {("ns", "a"): None}
    assert handlers._unfinished(status={"phase": "Running"}) and handlers._unfinished(status=None)
    assert not handlers._unfinished(status={"phase": "Succeeded"}) and not handlers._unfinished(status={"phase": "Failed"})


def test_resync_reconciles_each_unfinished_mmarjob_periodically(kube, cluster, metrics):
    import asyncio

    body(kube)
    runtime = OperatorState()
    runtime.cluster, runtime.metrics, runtime.config = cluster, metrics, CONFIG

    async def two_rounds():
        task = asyncio.get_running_loop().create_task(reconciler.resync({("ns", "spleen"): None, ("ns", "gone"): None}, 0.01, runtime))
        await asyncio.sleep(0.2)
        task.cancel()

    asyncio.run(two_rounds())
    assert [j["metadata"]["name"] for j in kube.jobs()] == [TRAIN]  # created once, adopted after
    assert kube.calls.count("get_mmarjob") >= 4 and value(metrics, "mmar_operator_reconcile_errors_total") == 0


def test_startup_configures_kopf(kube, cluster, monkeypatch):
    runtime = OperatorState()
    runtime.cluster = cluster
    monkeypatch.setattr(handlers, "STATE", runtime)
    settings = kopf.OperatorSettings()
    handlers._startup(settings=settings)
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, handlers.NoDiffBase)
    assert settings.persistence.diffbase_storage.build(body=kopf.Body(manifest())) == {}
    assert handlers._probe() == "ok"


def test_a_step_appended_after_success_runs_and_stale_keys_are_cleared(kube, cluster, metrics):
    body(kube, {"type": "train"})
    reconcile(kube, cluster, metrics)
    kube.start(TRAIN)
    kube.finish(TRAIN, ok=True, message=TRAIN_RESULT)
    assert reconcile(kube, cluster, metrics)["phase"] == "Succeeded"
    assert "completionTime" in kube.mmarjob()["status"]
    kube.objects[("MMARJob", "ns", "spleen")]["spec"]["steps"].append({"type": "export"})
    st = reconcile(kube, cluster, metrics)
    assert st["phase"] == "Running" and [j["metadata"]["name"] for j in kube.jobs()] == [TRAIN, EXPORT]
    assert "completionTime" not in kube.mmarjob()["status"]  # the merge patch removed it


def test_a_stale_event_never_reruns_a_finished_step(kube, cluster, metrics):
    """Step done and recorded, its Job deleted by ttlSecondsAfterFinished, then an old event arrives."""
    body(kube)
    reconcile(kube, cluster, metrics)
    stale = kube.mmarjob()  # status: train Pending
    kube.start(TRAIN)
    kube.finish(TRAIN, ok=True, message=TRAIN_RESULT)
    reconcile(kube, cluster, metrics)  # records train Succeeded, creates export
    kube.delete("Job", TRAIN)
    runtime = OperatorState()
    runtime.cluster, runtime.metrics, runtime.config = cluster, metrics, CONFIG
    reconciler.reconcile_guarded(stale, runtime)
    assert [j["metadata"]["name"] for j in kube.jobs()] == [EXPORT]
    assert kube.mmarjob()["status"]["steps"][0]["phase"] == "Succeeded"


def test_events_for_a_deleted_or_deleting_mmarjob_do_nothing(kube, cluster, metrics):
    runtime = OperatorState()
    runtime.cluster, runtime.metrics, runtime.config = cluster, metrics, CONFIG
    assert reconciler.reconcile_guarded({"metadata": {"namespace": "ns", "name": "spleen"}}, runtime) is None
    mmarjob = body(kube)
    kube.objects[("MMARJob", "ns", "spleen")]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert reconciler.reconcile_guarded(mmarjob, runtime) is None
    assert kube.jobs() == []


# ------------------------------------------------------------------------------- MMARJob events (on.event)


def mmarjob_event(monkeypatch, kube, cluster, metrics):
    """handlers._on_mmarjob wired to a fresh Runtime over the in-memory API server."""
    runtime = OperatorState()
    runtime.cluster, runtime.metrics, runtime.config = cluster, metrics, CONFIG
    monkeypatch.setattr(handlers, "STATE", runtime)
    return lambda type, body: handlers._on_mmarjob(event={"type": type, "object": body})


def test_a_new_mmarjob_creates_its_first_job_without_reading_anything(kube, cluster, metrics, monkeypatch):
    event = mmarjob_event(monkeypatch, kube, cluster, metrics)
    added = body(kube)
    event("ADDED", added)
    assert kube.calls == ["create_job", "patch_status"]  # no GET of the MMARJob, no LIST of its Jobs
    assert [j["metadata"]["name"] for j in kube.jobs()] == [TRAIN]
    assert kube.mmarjob()["status"]["steps"][0]["phase"] == "Pending"
    # our own status patch comes back as MODIFIED: same generation and labels, nothing to do
    event("MODIFIED", kube.mmarjob())
    assert kube.calls == ["create_job", "patch_status"]


def test_a_new_mmarjob_whose_job_name_is_taken_gets_the_full_reconcile(kube, cluster, metrics, monkeypatch):
    """The ADDED event replayed after a reconcile already made the Job (409): adopted, read, not duplicated."""
    event = mmarjob_event(monkeypatch, kube, cluster, metrics)
    added = body(kube)
    reconcile(kube, cluster, metrics)
    kube.start(TRAIN)
    kube.calls.clear()
    event("ADDED", added)
    assert kube.calls[:3] == ["create_job", "get_mmarjob", "list_jobs"]
    assert [j["metadata"]["name"] for j in kube.jobs()] == [TRAIN]
    assert kube.mmarjob()["status"]["phase"] == "Running"  # what the Job shows, not the fast path's guess


def test_a_name_held_by_another_owner_is_a_condition_and_retried(kube, cluster, metrics, monkeypatch):
    """Issue 32 item 4: a clash that still happens shows on the MMARJob (the step Pending, condition
    ChildNameConflict, a Warning Event), is retried with back-off, and goes on once the name is free."""
    event = mmarjob_event(monkeypatch, kube, cluster, metrics)
    added = body(kube)
    foreign = render.render_step(contract.parse(copy.deepcopy(added)), 0, CONFIG)[0]
    foreign["metadata"]["ownerReferences"][0].update(uid="someone-else", name="other")
    kube.create_namespaced_job("ns", foreign)
    event("ADDED", added)  # no failure: the status says it
    st = kube.mmarjob()["status"]
    assert (st["phase"], st["reason"]) == ("Pending", "ChildNameConflict")
    assert (st["steps"][0]["phase"], st["steps"][0]["reason"]) == ("Pending", "ChildNameConflict")
    assert f"Job ns/{TRAIN} exists and is controlled by MMARJob other" in st["steps"][0]["message"]
    conflict = next(c for c in st["conditions"] if c["type"] == "ChildNameConflict")
    assert conflict["status"] == "True" and conflict["reason"] == "NameTaken" and TRAIN in conflict["message"]
    # and the Job, labelled with this MMARJob's name but not its own, is named as ignored (ForeignJobsIgnored)
    assert [(e["type"], e["reason"]) for e in kube.events] == [("Warning", "ChildNameConflict"), ("Warning", "ForeignJobsIgnored")]
    assert handlers.STATE.failed == set() and value(metrics, "mmar_operator_reconcile_errors_total") == 0
    handlers.STATE.after_retry(("ns", "spleen"), st, 30, now=0.0)
    assert not handlers.STATE.retry_due(("ns", "spleen"), 29.0)  # backed off like a quota's 403
    assert kube.jobs()[0]["metadata"]["ownerReferences"][0]["uid"] == "someone-else"  # left alone

    kube.delete("Job", TRAIN)
    st = reconciler.reconcile_guarded(added, handlers.STATE)
    assert st["steps"][0]["phase"] == "Pending" and st["steps"][0]["reason"] != "ChildNameConflict"
    assert kube.jobs()[0]["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    conflict = next(c for c in st["conditions"] if c["type"] == "ChildNameConflict")
    assert (conflict["status"], conflict["reason"]) == ("False", "NoConflict")


def test_first_sight_after_a_start_is_a_full_reconcile(kube, cluster, metrics, monkeypatch):
    body(kube)
    reconcile(kube, cluster, metrics)
    kube.start(TRAIN)
    event = mmarjob_event(monkeypatch, kube, cluster, metrics)  # a new operator process
    kube.calls.clear()
    event(None, kube.mmarjob())  # kopf's initial listing
    assert kube.calls[:2] == ["get_mmarjob", "list_jobs"] and "create_job" not in kube.calls
    assert kube.mmarjob()["status"]["phase"] == "Running"


def test_spec_and_label_edits_reconcile_status_changes_do_not(kube, cluster, metrics, monkeypatch):
    event = mmarjob_event(monkeypatch, kube, cluster, metrics)
    event("ADDED", body(kube))
    kube.calls.clear()
    event("MODIFIED", kube.mmarjob())  # status only
    assert kube.calls == []
    edited = kube.objects[("MMARJob", "ns", "spleen")]
    edited["spec"]["runPolicy"] = {**edited["spec"].get("runPolicy", {}), "suspend": True}
    edited["metadata"]["generation"] = 2
    event("MODIFIED", kube.mmarjob())
    assert kube.calls[:2] == ["get_mmarjob", "list_jobs"] and "patch_job" in kube.calls  # the Job suspended
    kube.calls.clear()
    edited["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "q"}
    event("MODIFIED", kube.mmarjob())
    assert kube.calls[:1] == ["get_mmarjob"]


def test_deleted_or_deleting_mmarjobs_are_forgotten(kube, cluster, metrics, monkeypatch):
    event = mmarjob_event(monkeypatch, kube, cluster, metrics)
    added = body(kube)
    added["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    event("ADDED", added)
    assert kube.calls == [] and kube.jobs() == []
    event("DELETED", added)
    assert handlers.STATE.events.classify("ADDED", manifest()) == CREATED  # a new one of that name


def test_a_failed_reconcile_is_retried_by_the_resync_even_when_finished(kube, cluster, metrics):
    import asyncio

    body(kube, {"type": "train"})
    runtime = OperatorState()
    runtime.cluster, runtime.metrics, runtime.config = cluster, metrics, CONFIG
    kube.fail_next = [ApiException(status=401, reason="Unauthorized")]
    with pytest.raises(kopf.TemporaryError):
        reconciler.reconcile_new(kube.mmarjob(), runtime)
    assert runtime.failed == {("ns", "spleen")} and kube.jobs() == []

    async def one_round():
        task = asyncio.get_running_loop().create_task(reconciler.resync({}, 0.01, runtime))  # not in the unfinished index
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(one_round())
    assert [j["metadata"]["name"] for j in kube.jobs()] == [TRAIN] and runtime.failed == set()


def test_a_child_event_is_reconciled_from_what_the_watch_brought(kube, cluster, metrics, monkeypatch):
    """After this process's own reconcile, a child's event needs no GET of the MMARJob nor LIST of its Jobs."""
    event = mmarjob_event(monkeypatch, kube, cluster, metrics)
    event("ADDED", body(kube))
    event("MODIFIED", kube.mmarjob())  # the watch brings our status patch back
    kube.start(TRAIN)
    kube.calls.clear()
    handlers._on_child(event={"type": "MODIFIED", "object": kube.jobs()[0]})
    # no read: the status patch, and the step's StepStarted Event
    assert kube.calls == ["patch_status", "create_event"] and kube.mmarjob()["status"]["phase"] == "Running"
    # the step finishes: pods are read for its result, the next step is created, nothing else is read
    kube.finish(TRAIN, ok=True, message=TRAIN_RESULT)
    kube.calls.clear()
    handlers._on_child(event={"type": "MODIFIED", "object": kube.jobs()[0]})
    assert kube.calls == ["list_pods", "create_job", "patch_status", "create_event"]  # + its StepSucceeded Event
    st = kube.mmarjob()["status"]
    assert [s["phase"] for s in st["steps"]] == ["Succeeded", "Pending"] and st["steps"][0]["result"]["best_metric"] == 0.91


def test_the_known_status_wins_over_a_watch_body_that_lags_behind_our_patch(kube, cluster, metrics, monkeypatch):
    """The watch has not brought back our patch recording train's success, and train's Job is gone (TTL):
    the status we left, not the body's older one, says train is done; it is never run again."""
    event = mmarjob_event(monkeypatch, kube, cluster, metrics)
    event("ADDED", body(kube))
    stale = kube.mmarjob()
    event("MODIFIED", stale)  # status: train Pending
    kube.start(TRAIN)
    kube.finish(TRAIN, ok=True, message=TRAIN_RESULT)
    handlers._on_child(event={"type": "MODIFIED", "object": kube.jobs()[0]})  # records train, creates export
    train = kube.jobs()[0]
    kube.delete("Job", TRAIN)
    handlers._on_child(event={"type": "DELETED", "object": train})
    handlers._on_child(event={"type": "MODIFIED", "object": kube.jobs()[0]})  # export's event
    assert [j["metadata"]["name"] for j in kube.jobs()] == [EXPORT]
    assert kube.mmarjob()["status"]["steps"][0]["phase"] == "Succeeded"


def test_after_a_failed_reconcile_the_next_one_reads_the_api_server(kube, cluster, metrics, monkeypatch):
    event = mmarjob_event(monkeypatch, kube, cluster, metrics)
    event("ADDED", body(kube))
    kube.start(TRAIN)
    kube.fail_next = [ApiException(status=500, reason="x")] * 5  # patch_status fails through every retry
    with pytest.raises(kopf.TemporaryError):
        handlers._on_child(event={"type": "MODIFIED", "object": kube.jobs()[0]})
    kube.calls.clear()
    handlers._on_child(event={"type": "MODIFIED", "object": kube.jobs()[0]})
    assert kube.calls[:2] == ["get_mmarjob", "list_jobs"] and kube.mmarjob()["status"]["phase"] == "Running"


def test_finished_mmarjobs_are_not_kept_in_memory(kube, cluster, metrics, monkeypatch):
    event = mmarjob_event(monkeypatch, kube, cluster, metrics)
    event("ADDED", body(kube, {"type": "train"}))
    event("MODIFIED", kube.mmarjob())
    known = handlers.STATE.cache
    assert known.mmarjob("ns", "spleen") is not None
    kube.start(TRAIN)
    kube.finish(TRAIN, ok=True, message=TRAIN_RESULT)
    handlers._on_child(event={"type": "MODIFIED", "object": kube.jobs()[0]})
    assert kube.mmarjob()["status"]["phase"] == "Succeeded"
    event("MODIFIED", kube.mmarjob())
    handlers._on_child(event={"type": "MODIFIED", "object": kube.jobs()[0]})  # e.g. the echo of its TTL patch
    assert known.mmarjob("ns", "spleen") is None and not known._bodies and not any(known._jobs.values())


# ------------------------------------------------------------- a step whose pod does not (yet) run


def reason_of(st):
    """While Pending, the Running condition (False) says why."""
    return next(c["reason"] for c in st["conditions"] if c["type"] == "Running")


def test_a_pod_that_cannot_start_is_pending_with_the_kubelets_reason_then_fails(kube, cluster, metrics):
    """The real Job controller sets `active` and `startTime` while the pod is still Pending: that is not
    Running. The kubelet's waiting reason is the step's and the MMARJob's, and after the pending timeout
    (spec.runPolicy.pendingTimeoutSeconds) the step fails with it and its Job is stopped."""
    body(kube, {"type": "train"}, runPolicy={"pendingTimeoutSeconds": 120})
    reconcile(kube, cluster, metrics)
    kube.pend(TRAIN, waiting=("ErrImageNeverPull", 'Container image "mmar:9" is not present with pull policy of Never'))
    st = reconcile(kube, cluster, metrics, now="2026-01-01T00:01:00Z")
    assert (st["phase"], st["steps"][0]["phase"], st["steps"][0]["reason"]) == ("Pending", "Pending", "ErrImageNeverPull")
    assert st["message"] == ('step train is pending: its pod cannot start (the step fails at 2026-01-01T00:02:00Z, '
                             'spec.runPolicy.pendingTimeoutSeconds 120): ErrImageNeverPull: container mmar: '
                             'Container image "mmar:9" is not present with pull policy of Never')
    patches = kube.calls.count("patch_status")
    assert reconcile(kube, cluster, metrics, now="2026-01-01T00:01:30Z") == st  # nothing new: no status patch
    assert kube.calls.count("patch_status") == patches
    running = next(c for c in st["conditions"] if c["type"] == "Running")
    assert (running["status"], running["reason"]) == ("False", "ErrImageNeverPull")
    assert "activeDeadlineSeconds" not in kube.jobs()[0]["spec"]

    st = reconcile(kube, cluster, metrics, now="2026-01-01T00:02:00Z")
    assert (st["phase"], st["steps"][0]["phase"], st["steps"][0]["reason"]) == ("Failed", "Failed", "ErrImageNeverPull")
    assert st["message"].startswith("step train failed: its pod did not start within 120 s (spec.runPolicy.pendingTimeoutSeconds): "
                                    "ErrImageNeverPull: container mmar: Container image")
    assert kube.jobs()[0]["spec"]["activeDeadlineSeconds"] == 1  # the Job controller ends it and its pod
    # recorded: the Job's later states change nothing, and it is stopped once
    kube.finish(TRAIN, ok=False, message=None)
    calls = kube.calls.count("patch_job")
    assert reconcile(kube, cluster, metrics, now="2026-01-01T00:03:00Z")["steps"][0]["reason"] == "ErrImageNeverPull"
    assert kube.calls.count("patch_job") == calls and len(kube.jobs()) == 1


def test_unschedulable_uses_the_operators_default_timeout(kube, cluster, metrics):
    body(kube, {"type": "train"})
    reconcile(kube, cluster, metrics)
    kube.pend(TRAIN, unschedulable="0/1 nodes are available: 1 Insufficient cpu.")
    st = reconcile(kube, cluster, metrics, now="2026-01-01T00:09:59Z")
    assert (st["phase"], reason_of(st)) == ("Pending", "Unschedulable")
    assert st["steps"][0]["message"] == ("its pod cannot start (the step fails at 2026-01-01T00:10:00Z, spec.runPolicy.pendingTimeoutSeconds "
                                         f"{CONFIG.pending_timeout_seconds}): Unschedulable: 0/1 nodes are available: 1 Insufficient cpu.")
    st = reconcile(kube, cluster, metrics, now="2026-01-01T00:10:00Z")
    assert (st["phase"], st["steps"][0]["reason"]) == ("Failed", "Unschedulable")


def test_a_pod_being_set_up_or_initializing_is_not_a_problem(kube, cluster, metrics):
    body(kube, {"type": "train"}, runPolicy={"pendingTimeoutSeconds": 1})
    reconcile(kube, cluster, metrics)
    kube.pend(TRAIN, waiting=("ContainerCreating", ""))
    st = reconcile(kube, cluster, metrics, now="2026-01-01T01:00:00Z")  # long past the timeout: no problem known
    assert (st["phase"], reason_of(st), st["steps"][0]["phase"]) == ("Pending", "StepPending", "Pending")
    kube.pend(TRAIN, init_running=True)  # `mmar init` runs in the init container: the step runs
    st = reconcile(kube, cluster, metrics, now="2026-01-01T01:00:00Z")
    assert (st["phase"], st["steps"][0]["phase"]) == ("Running", "Running")
    kube.objects[("Job", "ns", TRAIN)]["status"]["ready"] = 1
    kube.objects[("Pod", "ns", f"{TRAIN}-0-pend")]["status"]["phase"] = "Running"
    calls = kube.calls.count("list_pods")
    assert reconcile(kube, cluster, metrics)["phase"] == "Running"
    assert kube.calls.count("list_pods") == calls  # a ready pod: no pod is read


def test_probe_is_not_ok_until_the_api_server_answered(kube, cluster, monkeypatch):
    runtime = OperatorState()
    monkeypatch.setattr(handlers, "STATE", runtime)
    with pytest.raises(kopf.PermanentError, match="no API client"):
        handlers._probe()
    runtime.cluster = cluster
    kube.fail_next = [ConnectionRefusedError(111, "Connection refused")]
    with pytest.raises(kopf.PermanentError, match="has not answered yet.*Connection refused"):
        handlers._probe()
    assert handlers._probe() == "ok" and kube.calls.count("get_api_resources") == 2
    assert handlers._probe() == "ok" and kube.calls.count("get_api_resources") == 2  # reached: no more requests
    other = Cluster(kube, kube, kube, sleep=lambda s: None)
    other.jobs_of("ns", "spleen")  # any answered request counts
    runtime.cluster = other
    assert handlers._probe() == "ok" and kube.calls.count("get_api_resources") == 2


def test_one_event_per_step_outcome_never_repeated(kube, cluster, metrics):
    body(kube, {"type": "train"}, {"type": "export"})
    reconcile(kube, cluster, metrics)
    kube.pend(TRAIN, waiting=("ImagePullBackOff", 'Back-off pulling image "r/mmar:9"'))
    reconcile(kube, cluster, metrics, now="2026-01-01T00:00:10Z")
    reconcile(kube, cluster, metrics, now="2026-01-01T00:00:20Z")  # nothing new: no second Event
    kube.objects[("Job", "ns", TRAIN)]["status"]["ready"] = 1
    reconcile(kube, cluster, metrics, now="2026-01-01T00:00:30Z")
    kube.finish(TRAIN, ok=True, message=TRAIN_RESULT)
    reconcile(kube, cluster, metrics)
    kube.finish(EXPORT, ok=False, message=None)
    reconcile(kube, cluster, metrics)
    reconcile(kube, cluster, metrics)
    got = [(e["type"], e["reason"], e["message"]) for e in kube.events]
    assert got == [
        ("Warning", "ImagePullBackOff", 'step train cannot start: its pod cannot start (the step fails at 2026-01-01T00:10:00Z, '
                                        'spec.runPolicy.pendingTimeoutSeconds 600): ImagePullBackOff: container mmar: Back-off pulling image "r/mmar:9"'),
        ("Normal", "StepStarted", f"step train started (Job {TRAIN})"),
        ("Normal", "StepSucceeded", "step train succeeded"),
        ("Warning", "StepFailed", "step export failed: Job has reached the specified backoff limit; container mmar exited with code 1"),
    ], got
    event = kube.events[0]
    assert event["involvedObject"] == {"apiVersion": "mmar.dev/v1alpha1", "kind": "MMARJob", "name": "spleen", "namespace": "ns", "uid": "uid-1"}
    assert event["metadata"] == {"generateName": "spleen.", "namespace": "ns"} and event["source"] == {"component": "mmar-operator"}


def test_an_event_that_cannot_be_posted_fails_nothing(kube, cluster, metrics):
    body(kube, {"type": "train"})
    reconcile(kube, cluster, metrics)
    kube.start(TRAIN)
    kube.finish(TRAIN, ok=True, message=TRAIN_RESULT)
    real = kube.create_namespaced_event

    def refused(namespace, body):
        raise ApiException(status=403, reason="Forbidden")
    kube.create_namespaced_event = refused
    assert reconcile(kube, cluster, metrics)["phase"] == "Succeeded"
    kube.create_namespaced_event = real


# ----------------------------------------------------------------------- a step's Job the server refuses


def refused(status, message):
    import json

    error = ApiException(status=status, reason="Refused")
    error.body = json.dumps({"kind": "Status", "status": "Failure", "message": message, "code": status})
    return error


INVALID_SA = ('Job.batch TRAIN is invalid: spec.template.spec.serviceAccountName: Invalid value: "Bad_SA": '
              'a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters')
QUOTA = 'jobs.batch TRAIN is forbidden: exceeded quota: no-jobs, requested: count/jobs.batch=1, used: count/jobs.batch=0, limited: count/jobs.batch=0'


def test_an_invalid_job_fails_the_step_in_the_servers_words(kube, cluster, metrics, caplog):
    body(kube)
    kube.refuse_jobs = [refused(422, INVALID_SA)]
    with caplog.at_level("WARNING", logger="mmar_operator.reconcile"):
        st = reconcile(kube, cluster, metrics)
    assert st["phase"] == "Failed" and kube.jobs() == []
    step = st["steps"][0]
    assert (step["phase"], step["reason"]) == ("Failed", "JobCreateFailed")
    assert f"refused to create Job ns/{TRAIN} (422)" in step["message"] and INVALID_SA[:60] in step["message"]
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "JobCreateFailed") and "serviceAccountName" in failed["message"]
    assert [(e["type"], e["reason"]) for e in kube.events] == [("Warning", "JobCreateFailed")]
    assert "serviceAccountName" in kube.events[0]["message"]
    # one line naming the object, no traceback
    lines = [r for r in caplog.records if r.name == "mmar_operator.reconcile"]
    assert len(lines) == 1 and "ns/spleen" in lines[0].getMessage() and lines[0].exc_info is None
    # not retried: a failed MMARJob makes no more Jobs
    kube.calls.clear()
    assert reconcile(kube, cluster, metrics, now="2026-01-01T00:05:00Z") == st
    assert "create_job" not in kube.calls and len(kube.events) == 1


def test_a_forbidden_job_waits_pending_and_is_retried_until_created(kube, cluster, metrics):
    body(kube)
    kube.refuse_jobs = [refused(403, QUOTA)]
    st = reconcile(kube, cluster, metrics)
    assert st["phase"] == "Pending" and kube.jobs() == []
    assert (st["steps"][0]["phase"], st["steps"][0]["reason"]) == ("Pending", "JobCreateFailed")
    assert "exceeded quota" in st["steps"][0]["message"] and "exceeded quota" in st["message"]
    running = next(c for c in st["conditions"] if c["type"] == "Running")
    assert (running["status"], running["reason"]) == ("False", "JobCreateFailed")
    assert [(e["type"], e["reason"]) for e in kube.events] == [("Warning", "JobCreateFailed")]
    # refused again: tried again, nothing new to say (no patch, no second Event)
    kube.refuse_jobs = [refused(403, QUOTA)]
    kube.calls.clear()
    assert reconcile(kube, cluster, metrics, now="2026-01-01T00:01:00Z") == st
    assert "create_job" in kube.calls and "patch_status" not in kube.calls and len(kube.events) == 1
    # the quota is lifted: the next try creates it
    st = reconcile(kube, cluster, metrics, now="2026-01-01T00:02:00Z")
    assert [j["metadata"]["name"] for j in kube.jobs()] == [TRAIN]
    assert st["steps"][0]["phase"] == "Pending" and st["steps"][0]["reason"] != "JobCreateFailed"


def test_the_resync_backs_off_a_refused_create():
    runtime = OperatorState()
    key = ("ns", "spleen")
    waiting = {"steps": [{"phase": "Pending", "reason": "JobCreateFailed"}]}
    assert runtime.retry_due(key, 0.0)
    waits = []
    for _ in range(6):
        runtime.after_retry(key, waiting, 30.0, 1000.0)
        waits.append(runtime.refused[key][1] - 1000.0)
    assert waits == [30.0, 60.0, 120.0, 240.0, 300.0, 300.0]
    assert not runtime.retry_due(key, 1299.0) and runtime.retry_due(key, 1300.0)
    runtime.after_retry(key, {"steps": [{"phase": "Running", "reason": "JobRunning"}]}, 30.0, 1400.0)
    assert runtime.retry_due(key, 0.0) and key not in runtime.refused


# ------------------------------------------------------------------------- an edit of a step that started


def edit(kube, change):
    edited = kube.mmarjob()
    change(edited["spec"])
    edited["metadata"]["generation"] += 1
    kube.add_mmarjob(edited)


def test_an_edit_of_a_running_step_is_reported_not_applied(kube, cluster, metrics):
    body(kube, {"type": "train", "set": {"epochs": 30}}, {"type": "export"})
    reconcile(kube, cluster, metrics)
    kube.start(TRAIN)
    reconcile(kube, cluster, metrics)
    args = kube.jobs()[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "epochs=30" in " ".join(args)
    edit(kube, lambda spec: spec["steps"][1].update(precision="fp16"))  # a step not started yet: applies
    st = reconcile(kube, cluster, metrics, now="2026-01-01T00:01:00Z")
    assert all(c["type"] != "SpecChangeIgnored" for c in st["conditions"]) and kube.events[-1]["reason"] == "StepStarted"

    edit(kube, lambda spec: spec["steps"][0]["set"].update(epochs=5))
    st = reconcile(kube, cluster, metrics, now="2026-01-01T00:02:00Z")
    assert st["observedGeneration"] == 3 and st["phase"] == "Running"
    ignored = next(c for c in st["conditions"] if c["type"] == "SpecChangeIgnored")
    assert (ignored["status"], ignored["reason"]) == ("True", "StepAlreadyStarted")
    assert f"step(s) train (Job {TRAIN})" in ignored["message"] and "edits apply only to steps not yet started" in ignored["message"]
    assert kube.jobs()[0]["spec"]["template"]["spec"]["containers"][0]["args"] == args  # the Job keeps 30
    assert [(e["type"], e["reason"]) for e in kube.events[-1:]] == [("Warning", "SpecChangeIgnored")]
    posted = len(kube.events)
    assert reconcile(kube, cluster, metrics, now="2026-01-01T00:03:00Z") == st and len(kube.events) == posted  # said once

    edit(kube, lambda spec: spec["steps"][0]["set"].update(epochs=30))  # edited back: nothing ignored any more
    st = reconcile(kube, cluster, metrics, now="2026-01-01T00:04:00Z")
    assert next(c for c in st["conditions"] if c["type"] == "SpecChangeIgnored")["status"] == "False"


def test_suspend_and_ttl_edits_are_applied_to_a_running_step_not_reported(kube, cluster, metrics):
    body(kube, {"type": "train"})
    reconcile(kube, cluster, metrics)
    kube.start(TRAIN)
    edit(kube, lambda spec: spec.setdefault("runPolicy", {}).update(suspend=True, ttlSecondsAfterFinished=60, pendingTimeoutSeconds=30))
    st = reconcile(kube, cluster, metrics)
    assert st["phase"] == "Suspended" and all(c["type"] != "SpecChangeIgnored" for c in st["conditions"])


def test_after_a_failed_step_the_later_steps_are_not_run(kube, cluster, metrics):
    """The rule `mmar run` records too (mmar.job.not_run): NotRun, not Waiting forever; status.reason for -o wide."""
    from mmar import job as contract

    body(kube, {"type": "train"}, {"type": "validate"}, {"type": "export"})
    reconcile(kube, cluster, metrics)
    kube.finish(TRAIN, ok=False, message='{"command":"train","error":"out of memory"}')
    st = reconcile(kube, cluster, metrics)
    assert [s["phase"] for s in st["steps"]] == ["Failed", "NotRun", "NotRun"]
    assert all({k: s[k] for k in ("phase", "reason", "message")} == contract.not_run("train") for s in st["steps"][1:])
    assert (st["phase"], st["reason"]) == ("Failed", "StepFailed") and [j["metadata"]["name"] for j in kube.jobs()] == [TRAIN]
    assert reconcile(kube, cluster, metrics) == st


# ------------------------------------------------ a step's identity, its Job's owner (issue 32 items 1, 5)


def test_jobs_left_by_a_deleted_mmarjob_of_the_same_name_are_not_its_results(kube, cluster, metrics):
    """`kubectl delete mmarjob spleen --cascade=orphan`, then a new `spleen` (another uid): the old Job (our
    labels, no owner) is not taken as the new one's step; it is named in ForeignJobsIgnored and left alone."""
    old = render.render_step(contract.parse(manifest(uid="uid-old")), 0, CONFIG)[0]
    old["metadata"]["ownerReferences"] = []  # what the garbage collector leaves of an orphaned child
    kube.create_namespaced_job("ns", old)
    kube.finish(old["metadata"]["name"], ok=True, message=TRAIN_RESULT)
    body(kube, {"type": "train"})
    st = reconcile(kube, cluster, metrics)
    assert (st["phase"], st["steps"][0]["phase"], st["steps"][0]["jobName"]) == ("Pending", "Pending", TRAIN)
    assert st["results"] == {} and [j["metadata"]["name"] for j in kube.jobs()] == [old["metadata"]["name"], TRAIN]
    foreign = next(c for c in st["conditions"] if c["type"] == "ForeignJobsIgnored")
    assert foreign["status"] == "True" and old["metadata"]["name"] in foreign["message"]
    assert ("Warning", "ForeignJobsIgnored") in [(e["type"], e["reason"]) for e in kube.events]
    assert kube.jobs()[0]["metadata"]["ownerReferences"] == []  # left alone
    kube.calls.clear()
    reconcile(kube, cluster, metrics)  # nothing new to say: no second Event
    assert "create_event" not in kube.calls


def test_an_older_operators_jobs_are_matched_by_step_and_owner(kube, cluster, metrics):
    """After an upgrade: `spleen-0-train` (the old name) finished, `spleen-1-export` not made yet; the new
    operator records train from its Job and makes only export, under the new name."""
    body(kube)
    old = render.render_step(contract.parse(kube.mmarjob()), 0, CONFIG)[0]
    old["metadata"]["name"] = "spleen-0-train"
    del old["metadata"]["labels"][render.LABEL_UID]
    kube.create_namespaced_job("ns", old)
    kube.finish("spleen-0-train", ok=True, message=TRAIN_RESULT)
    st = reconcile(kube, cluster, metrics)
    assert [(s["phase"], s["jobName"]) for s in st["steps"]] == [("Succeeded", "spleen-0-train"), ("Pending", EXPORT)]
    assert [j["metadata"]["name"] for j in kube.jobs()] == ["spleen-0-train", EXPORT]


def test_no_step_starts_while_a_removed_steps_job_runs(kube, cluster, metrics):
    """An older CRD let a running step be removed from spec.steps: its Job still runs, so the next step waits."""
    body(kube, {"type": "train"}, {"type": "export"})
    reconcile(kube, cluster, metrics)
    kube.start(TRAIN)
    mmarjob = kube.mmarjob()
    mmarjob["spec"]["steps"] = [{"type": "export"}]
    kube.add_mmarjob(mmarjob)
    st = reconcile(kube, cluster, metrics)
    assert [j["metadata"]["name"] for j in kube.jobs()] == [TRAIN] and st["steps"][0]["phase"] == "Waiting"
    kube.finish(TRAIN, ok=True, message=TRAIN_RESULT)
    reconcile(kube, cluster, metrics)
    assert [j["metadata"]["name"] for j in kube.jobs()] == [TRAIN, EXPORT]
