"""The MMARJob CRD offline: a valid, structural CRD; the examples pass its own schema and CEL rules; every CEL
rule is exercised with a good and a bad input (cel-python); its defaults and rules agree with mmar.job.

cel-python evaluates the rules on JSON, untyped: it cannot see what only a real API server does (a rule that
fails to compile against the schema's declared types, such as `has(self.set)` on a field the type-checker
cannot see, strict decoding, the server's own defaulting). tests/e2e/test_crd_e2e.py checks all of that on
a real kube-apiserver; these run in every `make test`, without a cluster."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from mmar import job as contract
from mmar.errors import MMARError
from operator_helpers import (EXAMPLES, is_transition_rule, transition_failures, K8S_VERSIONS, apply_schema_defaults, cel_failures, crd_schema, iter_rules, load_crd,
                              manifest, schema_errors)

LOGICAL = ("allOf", "anyOf", "oneOf", "not")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_crd_is_a_valid_customresourcedefinition(version):
    kubernetes_validate.validate(load_crd(), version, strict=True)


def structural_problems(schema: dict, path: str = "", inside_junctor: bool = False) -> list[str]:
    """The rules of a structural schema (Kubernetes docs, "Specifying a structural schema")."""
    problems = []
    exempt = schema.get("x-kubernetes-int-or-string") or schema.get("x-kubernetes-preserve-unknown-fields")
    if not inside_junctor and not schema.get("type") and not exempt:
        problems.append(f"{path or '.'}: no type")
    if inside_junctor:
        for key in ("type", "description", "default", "additionalProperties", "nullable"):
            if key in schema:
                problems.append(f"{path}: {key} inside a logical junctor")
    for junctor in LOGICAL:
        branches = schema.get(junctor)
        if branches is None:
            continue
        if not (schema.get("x-kubernetes-int-or-string") and junctor == "anyOf" and branches == [{"type": "integer"}, {"type": "string"}]):
            for i, branch in enumerate(branches if isinstance(branches, list) else [branches]):
                problems += structural_problems(branch, f"{path}.{junctor}[{i}]", True)
    if schema.get("type") == "object" and schema.get("properties") and schema.get("additionalProperties") not in (None, False):
        problems.append(f"{path}: both properties and additionalProperties")
    for key, sub in (schema.get("properties") or {}).items():
        problems += structural_problems(sub, f"{path}.{key}", inside_junctor)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            problems += structural_problems(schema[key], f"{path}{'[]' if key == 'items' else '{}'}", inside_junctor)
    return problems


def test_crd_schema_is_structural():
    schema = crd_schema()
    assert structural_problems(schema) == []
    assert schema["properties"]["metadata"] == {"type": "object"}  # only name/generateName may be restricted (by CEL)


def test_structural_check_is_not_vacuous():
    assert structural_problems({"type": "object", "properties": {"a": {"description": "x"}}}) == [".a: no type"]
    assert structural_problems({"type": "object", "properties": {"a": {"type": "string", "anyOf": [{"type": "string"}]}}}) == [".a.anyOf[0]: type inside a logical junctor"]


def test_crd_names_columns_and_status():
    crd = load_crd()
    assert crd["metadata"]["name"] == "mmarjobs.mmar.dev"
    names = crd["spec"]["names"]
    assert (crd["spec"]["group"], names["kind"], names["plural"], names["shortNames"]) == ("mmar.dev", "MMARJob", "mmarjobs", ["mmarj"])
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Step", "Epochs", "Best", "Gate", "Age", "Reason", "Message"]
    assert [c.get("priority", 0) for c in version["additionalPrinterColumns"]] == [0] * 6 + [1, 1]  # -o wide only
    assert version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["phase"]["enum"] == ["Pending", "Running", "Succeeded", "Failed", "Suspended"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_the_crd_schema_and_rules(path):
    assert schema_errors(contract.load(path)) == []


def test_claim_names_follow_kubernetes():
    for name in ("data", "1data", "nfs.shared-datasets"):
        assert schema_errors(manifest(data={"claimName": name})) == []
        contract.parse(manifest(data={"claimName": name}))


def test_defaults_match_the_contract():
    """The API server defaults from the CRD; `mmar run` from mmar.job: the results must be the same."""
    body = manifest({"type": "train"}, {"type": "export", "name": "exp"}, uid=None)
    by_crd = apply_schema_defaults(crd_schema(), copy.deepcopy(body))
    by_job = contract.apply_defaults(copy.deepcopy(body))
    # the one default a schema cannot express (it depends on another field): a step's name is its type
    for step in by_job["spec"]["steps"]:
        if step["name"] == step["type"]:
            del step["name"]
    assert by_crd == by_job


# --------------------------------------------------------------------------------------- CEL rules
# (message fragment, a good body, a bad body): each bad body breaks exactly that rule.

def steps(*items):
    return manifest(*items)


PULL = {"type": "pull", "dicomweb": {"url": "http://orthanc:8042/dicom-web", "credentialsSecret": "pacs"},
        "query": {"modality": "CT"}, "output": "images"}
PUSH = {"type": "push", "dicomweb": {"url": "https://pacs.example.org/dicom-web"}}

CEL_CASES = [
    ("metadata.name must be a lower-case DNS label",
     manifest(), {**manifest(), "metadata": {"name": "Spleen_CT"}}),
    ("step names must be unique",
     steps({"type": "train"}, {"type": "train", "name": "train-more"}), steps({"type": "train"}, {"type": "validate", "name": "train"})),
    ("spec.data.readOnly must be false",
     manifest({"type": "train"}, data={"claimName": "d", "readOnly": True}),
     manifest({"type": "convert", "input": "a", "output": "b"}, data={"claimName": "d", "readOnly": True})),
    ("only train and finetune steps may run on several nodes",
     steps({"type": "finetune", "nodes": 4}), steps({"type": "export", "nodes": 2})),
    ("a convert step needs input and output",
     steps({"type": "convert", "input": "a", "output": "b"}), steps({"type": "convert", "input": "a"})),
    ("are options of convert steps only",
     steps({"type": "convert", "input": "a", "output": "b", "labels": True}), steps({"type": "train", "labels": True})),
    ("set is an option of train, finetune, validate and infer steps only",
     steps({"type": "infer", "set": {"epochs": 1}}), steps({"type": "export", "set": {"epochs": 1}})),
    ("ckpt is an option of train, finetune, validate, infer and export steps only",
     steps({"type": "export", "ckpt": "models/m.pt"}), steps({"type": "convert", "input": "a", "output": "b", "ckpt": "m.pt"})),
    ("model is an option of validate and infer steps only",
     steps({"type": "validate", "model": "onnx"}), steps({"type": "train", "model": "onnx"})),
    ("key is an option of infer and pull steps only",
     steps({"type": "infer", "key": "testing"}), steps({"type": "validate", "key": "testing"})),
    ("output is an option of convert and pull steps only",
     steps(PULL), steps({"type": "train", "output": "b"})),
    ("a pull step needs dicomweb, query and output",
     steps(PULL), steps({k: v for k, v in PULL.items() if k != "query"})),
    ("a push step needs dicomweb",
     steps(PUSH), steps({"type": "push"})),
    ("dicomweb is an option of pull and push steps only",
     steps(PUSH), steps({"type": "export", "dicomweb": PUSH["dicomweb"]})),
    ("query, dicomOutput and labelsFrom are options of pull steps only",
     steps({**PULL, "labelsFrom": "labels"}), steps({**PUSH, "labelsFrom": "labels"})),
    ("dicomSeg is an option of infer steps only",
     steps({"type": "infer", "dicomSeg": True}), steps({"type": "validate", "dicomSeg": True})),
    ("gate is an option of infer, export and push steps only",
     steps({"type": "export", "gate": {"metric": "val_mean_dice", "atLeast": 0.8}}), steps({"type": "train", "gate": {"metric": "val_mean_dice", "atLeast": 0.8}})),
    ("needs exactly one of atLeast, atMost",
     steps({**PUSH, "gate": {"metric": "val_loss", "atMost": 0.2}}), steps({**PUSH, "gate": {"metric": "val_loss", "atMost": 0.2, "atLeast": 0.1}})),
    ("the range ends before it starts",
     steps({**PULL, "query": {"studyDate": "20240101-20241231"}}), steps({**PULL, "query": {"studyDate": "20241231-20240101"}})),
    ("must not contain backslashes",
     steps({**PULL, "query": {"seriesDescription": "T1*"}}), steps({**PULL, "query": {"seriesDescription": "T1\\x"}})),
    ("are options of export steps only",
     steps({"type": "export", "precision": "fp16"}), steps({"type": "train", "precision": "fp16"})),
    ("must be a relative path without '..'",
     steps({"type": "export", "ckpt": "models/a..b.pt"}), steps({"type": "export", "ckpt": "../other/model.pt"})),
    ("one isotropic spacing or three",
     steps({"type": "convert", "input": "a", "output": "b", "resolution": [1.5]}), steps({"type": "convert", "input": "a", "output": "b", "resolution": [1, 1]})),
    ("must be relative to the claim's root, without '..'",
     manifest(mmar={"claimName": "ws", "path": "runs/x"}), manifest(mmar={"claimName": "ws", "path": "/abs"})),
    ("keys must be label keys",
     manifest(nodeSelector={"nvidia.com/gpu.product": "A100-SXM4-80GB", "pool": ""}), manifest(nodeSelector={"bad key!": "x"})),
    ("must be relative to the data root, without '..'",
     manifest(data={"claimName": "d", "datalist": "lists/a.json"}), manifest(data={"claimName": "d", "datalist": "lists/../../x.json"})),
]


def _cel(body):
    schema = crd_schema()
    return cel_failures(schema, apply_schema_defaults(schema, copy.deepcopy(body)))


@pytest.mark.parametrize("fragment, good, bad", CEL_CASES, ids=[c[0][:40] for c in CEL_CASES])
def test_cel_rule_good_and_bad(fragment, good, bad):
    assert _cel(good) == []
    failures = _cel(bad)
    assert failures and all(fragment in f for f in failures), failures


def test_every_cel_rule_is_exercised():
    messages = {rule["message"] for _, rule in iter_rules(crd_schema()) if not is_transition_rule(rule)}
    covered = {m for m in messages if any(fragment in m for fragment, _, _ in CEL_CASES)}
    assert covered == messages


@pytest.mark.parametrize("fragment, good, bad", CEL_CASES, ids=[c[0][:40] for c in CEL_CASES])
def test_contract_agrees_with_the_crd(fragment, good, bad):
    """What the API server rejects, `mmar run` rejects too (and accepts what it accepts)."""
    contract.parse(good)
    with pytest.raises(MMARError):
        contract.parse(bad)


SCHEMA_BAD = [
    steps({"type": "deploy"}),
    steps({"type": "train", "nodes": 0}),
    steps({"type": "validate", "model": "tflite"}),
    steps({"type": "export", "formats": ["pt"]}),
    steps({"type": "export", "inputShape": [1, 2]}),
    manifest(gpusPerNode=17),
    manifest(imagePullPolicy="Sometimes"),
    manifest(shmSize="lots"),
    manifest(runPolicy={"backoffLimit": -1}),
    manifest(task="detection"),
    manifest(data={"claimName": "Data_Set"}),
    manifest(image=""),
    manifest(serviceAccountName="Bad_SA"),
    manifest(nodeSelector={"pool": "not a value"}),
    {**manifest(), "spec": {"data": {"claimName": "d"}, "steps": [{"type": "train"}]}},
]


@pytest.mark.parametrize("body", SCHEMA_BAD, ids=range(len(SCHEMA_BAD)))
def test_schema_and_contract_both_reject(body):
    assert schema_errors(body)
    with pytest.raises(MMARError):
        contract.parse(body)


STEPS_SCHEMA = crd_schema()["properties"]["spec"]["properties"]["steps"]
A, B, C = {"type": "train"}, {"type": "validate"}, {"type": "convert", "name": "extra", "input": "raw", "output": "x"}


@pytest.mark.parametrize("old, new, ok", [
    ([A, B], [A, B, C], True),  # appended
    ([A, B], [A, {**B, "set": {"epochs": 3}}], True),  # a step edited in place (a started one: SpecChangeIgnored)
    ([A, B], [{**A, "name": "train"}, B], True),  # the name it had by default, now written out
    ([A, B], [C, A, B], False),  # inserted before steps already there (issue 32 item 1)
    ([A, B], [A, C, B], False),
    ([A, B], [B, A], False),  # reordered
    ([A, B], [A], False),  # removed
    ([A, B], [{**A, "name": "train2"}, B], False),  # renamed
])
def test_steps_already_present_keep_their_names_and_places(old, new, ok):
    """The transition rule on spec.steps (checked on updates by the API server; the e2e suite checks it there)."""
    failures = transition_failures(STEPS_SCHEMA, old, new)
    assert failures == [] if ok else failures and "add new steps at the end only" in failures[0]
