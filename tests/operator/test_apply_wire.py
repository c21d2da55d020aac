"""apply.Cluster through the real `kubernetes` client, only the HTTP transport stubbed: the request each
call sends (method, path, content type, body) is what the API server expects, and every rendered object
survives the typed client's validation and serialization unchanged."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client

from mmar import job as contract
from mmar_operator import render
from mmar_operator.apply import Cluster
from mmar_operator.config import Config
from operator_helpers import EXAMPLES, manifest


class Response:
    def __init__(self, status: int, data: dict):
        self.status, self.reason, self.data = status, "OK" if status < 400 else "Error", json.dumps(data).encode()
        self.headers = {"content-type": "application/json"}
        self.response = self  # what `_preload_content=False` hands back: urllib3's response, `.data` the body

    def getheaders(self):
        return self.headers

    def getheader(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def read(self):
        return self.data

    def release_conn(self):
        pass


class Transport:
    """Records requests; answers creates with the body, patches and reads with the stored object."""

    def __init__(self):
        self.requests: list[tuple[str, str, str | None, object]] = []
        self.store: dict[str, dict] = {}
        self.errors: dict[tuple[str, str], int] = {}  # (method, path) -> HTTP status to answer
        self.version = 0

    def __call__(self, method, url, headers=None, body=None, post_params=None, _request_timeout=None, **_):
        self.requests.append((method, url, (headers or {}).get("Content-Type"), body))
        path = urlparse(url).path
        if (method, path) in self.errors:
            status = self.errors[(method, path)]
            return Response(status, {"kind": "Status", "code": status, "message": "stubbed"})
        if method == "POST":
            self.version += 1  # as the API server: every write gets a new resourceVersion
            body = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.version)}}
            self.store[f"{path}/{body['metadata']['name']}"] = body
            return Response(201, body)
        if method == "GET" and path in self.store:
            return Response(200, self.store[path])
        if method == "GET":
            return Response(200, {"items": list(self.store.values()), "metadata": {}})
        return Response(200, self.store.get(path, {"metadata": {"name": path.rsplit("/", 1)[-1]}}))


@pytest.fixture
def wire():
    api_client = client.ApiClient(client.Configuration(host="https://k8s.example:6443"))
    transport = Transport()
    api_client.rest_client.request = transport
    cluster = Cluster(client.BatchV1Api(api_client), client.CoreV1Api(api_client), client.CustomObjectsApi(api_client), sleep=lambda s: None)
    return cluster, transport


def all_objects():
    bodies = [manifest({"type": "train", "nodes": 2, "resources": {"requests": {"cpu": 4, "memory": "8Gi"}}}, task="segmentation")]
    for path in EXAMPLES:
        body = contract.load(path)
        body["metadata"].update(uid="u-1", namespace="ns")
        bodies.append(body)
    config = Config(default_resources={"requests": {"cpu": 2}})
    for body in bodies:
        job = contract.parse(body)
        for index in range(len(job["spec"]["steps"])):
            yield from render.render_step(job, index, config)


def test_rendered_objects_go_over_the_wire_unchanged(wire):
    cluster, transport = wire
    for obj in all_objects():
        live = cluster.ensure(obj)
        method, url, _, sent = transport.requests[-1]
        plural = "jobs" if obj["kind"] == "Job" else "services"
        prefix = "/apis/batch/v1" if obj["kind"] == "Job" else "/api/v1"
        assert (method, urlparse(url).path) == ("POST", f"{prefix}/namespaces/{obj['metadata']['namespace']}/{plural}")
        assert sent == obj  # nothing dropped, renamed or retyped by the client
        live["metadata"].pop("resourceVersion")
        assert live == obj  # and read back as the same plain data


def test_patches_are_merge_patches(wire):
    cluster, transport = wire
    job = next(o for o in all_objects() if o["kind"] == "Job")
    cluster.ensure(job)
    cluster.set_suspend("ns", job["metadata"]["name"], True)
    cluster.patch_status("ns", "spleen", {"phase": "Running", "completionTime": None})
    patches = [r for r in transport.requests if r[0] == "PATCH"]
    assert [urlparse(u).path for _, u, _, _ in patches] == [f"/apis/batch/v1/namespaces/ns/jobs/{job['metadata']['name']}",
                                                            "/apis/mmar.dev/v1alpha1/namespaces/ns/mmarjobs/spleen/status"]
    assert {ct for _, _, ct, _ in patches} == {"application/merge-patch+json"}
    assert patches[0][3] == {"spec": {"suspend": True}}
    assert patches[1][3] == {"status": {"phase": "Running", "completionTime": None}}


def test_lists_select_by_label(wire):
    cluster, transport = wire
    cluster.jobs_of("ns", "spleen")
    cluster.pods_of("ns", "spleen-0-train")
    queries = [(urlparse(u).path, parse_qs(urlparse(u).query)) for _, u, _, _ in transport.requests]
    assert queries == [("/apis/batch/v1/namespaces/ns/jobs", {"labelSelector": ["mmar.dev/mmarjob=spleen"]}),
                       ("/api/v1/namespaces/ns/pods", {"labelSelector": ["job-name=spleen-0-train"]})]


def test_http_errors_are_classified(wire):
    cluster, transport = wire
    transport.errors[("GET", "/apis/mmar.dev/v1alpha1/namespaces/ns/mmarjobs/gone")] = 404
    assert cluster.get_mmarjob("ns", "gone") is None
    transport.errors[("PATCH", "/apis/mmar.dev/v1alpha1/namespaces/ns/mmarjobs/gone/status")] = 404
    cluster.patch_status("ns", "gone", {"phase": "Running"})  # deleted meanwhile: ignored
    # a replayed create: 409, then the existing object (ours) is read and adopted as is
    job = next(o for o in all_objects() if o["kind"] == "Job")
    cluster.ensure(job)
    transport.errors[("POST", "/apis/batch/v1/namespaces/ns/jobs")] = 409
    assert cluster.ensure(job) == {**job, "metadata": {**job["metadata"], "resourceVersion": "1"}}
    assert [r[0] for r in transport.requests[-2:]] == ["POST", "GET"]
    # transient: 503 is retried until the attempts run out
    transport.errors[("GET", "/apis/batch/v1/namespaces/ns/jobs")] = 503
    before = len(transport.requests)
    with pytest.raises(client.ApiException) as info:
        cluster.jobs_of("ns", "spleen")
    assert info.value.status == 503 and len(transport.requests) - before == cluster.attempts


def test_responses_are_plain_json_not_models(wire, monkeypatch):
    """The typed client's model layer is skipped for responses (built only to be turned back into dicts)."""
    cluster, _ = wire

    def no_models(*args, **kwargs):
        raise AssertionError("a response went through the model layer")

    monkeypatch.setattr(client.ApiClient, "response_deserialize", no_models)
    assert cluster.raw_json
    job = next(o for o in all_objects() if o["kind"] == "Job")
    assert cluster.ensure(job)["metadata"]["name"] == job["metadata"]["name"]
    assert [j["metadata"]["name"] for j in cluster.jobs_of("ns", "spleen")] == [job["metadata"]["name"]]
    assert cluster.get_mmarjob("ns", "missing") is not None  # the stub answers any GET


def test_the_echo_of_our_own_create_is_recognised_once(wire):
    cluster, transport = wire
    job = next(o for o in all_objects() if o["kind"] == "Job")
    name = job["metadata"]["name"]
    version = cluster.ensure(job)["metadata"]["resourceVersion"]
    assert not cluster.is_own_create("ns", name, "999")  # a later change of the Job: news
    assert not cluster.is_own_create("other", name, version)
    assert cluster.is_own_create("ns", name, version)
    assert not cluster.is_own_create("ns", name, version)  # once: a replay is reconciled again
    # an adopted Job (409) was not written by this create: its events are all news
    transport.errors[("POST", "/apis/batch/v1/namespaces/ns/jobs")] = 409
    adopted = cluster.ensure(job)
    assert not cluster.is_own_create("ns", name, adopted["metadata"]["resourceVersion"])
    # a Job deleted before its echo came leaves nothing behind
    del transport.errors[("POST", "/apis/batch/v1/namespaces/ns/jobs")]
    version = cluster.ensure(job)["metadata"]["resourceVersion"]
    cluster.forget_job("ns", name)
    assert not cluster.is_own_create("ns", name, version)


def test_from_kubeconfig_keeps_a_connection_per_worker(tmp_path, monkeypatch):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://k8s.example:6443"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    # the client reads $KUBECONFIG once, at import
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    monkeypatch.setenv("MMAR_OPERATOR_WORKERS", "48")
    cluster = Cluster.from_kubeconfig()
    api_client = cluster.batch.api_client
    assert cluster.core.api_client is api_client and cluster.custom.api_client is api_client  # one pool
    assert api_client.configuration.host == "https://k8s.example:6443"
    assert api_client.rest_client.pool_manager.connection_pool_kw["maxsize"] == 48
    assert cluster.raw_json
