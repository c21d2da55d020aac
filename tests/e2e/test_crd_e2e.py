"""The MMARJob CRD on a real API server: what it rejects (naming the field), every CEL rule good and bad,
the examples, the server's defaults against mmar.job's, and the printer columns.

The offline tests (tests/operator/test_crd.py) evaluate the schema with jsonschema and cel-python; only a
real kube-apiserver compiles the CEL rules against the schema's declared types, prunes, defaults and
decodes strictly, so this is where the CRD is proven. Every rejection is also checked against
`mmar.job.parse` (what `mmar run` and the operator apply): the two must refuse the same things.

    PORT_BASE=27443 tests/e2e/with-cluster.sh .venv/bin/python -m pytest -q tests/e2e/test_crd_e2e.py
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from mmar import job as contract
from mmar.errors import MMARError

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "mmar.dev_mmarjobs.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
GROUP, VERSION, PLURAL = "mmar.dev", "v1alpha1", "mmarjobs"
DRY_RUN_NAMESPACE = "default"  # exists in every cluster; dry runs persist nothing


def manifest(*steps: dict[str, Any], name: str = "spleen", **spec: Any) -> dict[str, Any]:
    """A valid MMARJob (one train step unless steps are given), with `spec` keys replaced."""
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MMARJob",
        "metadata": {"name": name},
        "spec": {"mmar": {"claimName": "ws"}, "data": {"claimName": "data"}, "steps": list(steps) or [{"type": "train"}]},
    }
    body["spec"].update(spec)
    return body


def pull(**fields: Any) -> dict[str, Any]:
    return {"type": "pull", "dicomweb": {"url": "http://orthanc:8042/dicom-web", "credentialsSecret": "pacs"},
            "query": {"modality": "CT"}, "output": "images", **fields}


PUSH = {"type": "push", "dicomweb": {"url": "https://pacs.example.org/dicom-web"}}


def convert(**fields: Any) -> dict[str, Any]:
    return {"type": "convert", "input": "raw", "output": "nifti", **fields}


def server_verdict(api, body: dict[str, Any], namespace: str = DRY_RUN_NAMESPACE) -> tuple[dict | None, str]:
    """(the object as the server would store it, "") if accepted, else (None, the server's message).

    Strict field validation, as `kubectl apply` sends by default: an unknown field is an error, not pruned.
    """
    custom = api.CustomObjectsApi()
    try:
        stored = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, copy.deepcopy(body),
                                                        dry_run="All", field_validation="Strict")
        return stored, ""
    except api.ApiException as error:
        if error.status not in (400, 422):
            raise
        return None, json.loads(error.body)["message"]


def contract_error(body: dict[str, Any]) -> str | None:
    try:
        contract.parse(copy.deepcopy({**body, "metadata": {**body["metadata"], "namespace": DRY_RUN_NAMESPACE}}))
    except MMARError as error:
        return str(error)
    return None


# ------------------------------------------------------------------------------------ invalid specs
# (id, body, the field the server's message must name). Each body breaks one thing in a valid manifest.

INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("name-upper-case", manifest(name="Spleen-CT"), "metadata.name"),
    ("name-too-long", manifest(name="s" * 37), "metadata.name"),
    ("no-spec-mmar", {**manifest(), "spec": {"data": {"claimName": "d"}, "steps": [{"type": "train"}]}}, "spec.mmar"),
    ("no-steps", manifest(steps=[]), "spec.steps"),
    ("seventeen-steps", manifest(*({"type": "train", "name": f"t{i}"} for i in range(17))), "spec.steps"),
    ("unknown-spec-field", manifest(gpus=2), 'spec.gpus'),
    ("unknown-step-field", manifest({"type": "train", "epochs": 3}), "spec.steps[0].epochs"),
    ("empty-image", manifest(image=""), "spec.image"),
    ("long-image", manifest(image="r/" + "i" * 511), "spec.image"),
    ("pull-policy", manifest(imagePullPolicy="Sometimes"), "spec.imagePullPolicy"),
    ("pull-secret-without-name", manifest(imagePullSecrets=[{}]), "spec.imagePullSecrets[0].name"),
    ("pull-secrets-too-many", manifest(imagePullSecrets=[{"name": f"s{i}"} for i in range(9)]), "spec.imagePullSecrets"),
    ("service-account-not-string", manifest(serviceAccountName=7), "spec.serviceAccountName"),
    ("service-account-too-long", manifest(serviceAccountName="s" * 254), "spec.serviceAccountName"),
    ("service-account-pattern", manifest(serviceAccountName="Bad_SA"), "spec.serviceAccountName"),
    ("task", manifest(task="detection"), "spec.task"),
    ("claim-name-upper-case", manifest(data={"claimName": "Data_Set"}), "spec.data.claimName"),
    ("claim-name-missing", manifest(mmar={"path": "m"}), "spec.mmar.claimName"),
    ("mmar-path-empty", manifest(mmar={"claimName": "ws", "path": ""}), "spec.mmar.path"),
    ("mmar-path-absolute", manifest(mmar={"claimName": "ws", "path": "/etc"}), "spec.mmar.path"),
    ("mmar-path-too-long", manifest(mmar={"claimName": "ws", "path": "m/" * 257}), "spec.mmar.path"),
    ("data-path-escapes", manifest(data={"claimName": "d", "path": "a/../../b"}), "spec.data.path"),
    ("datalist-backslash", manifest(data={"claimName": "d", "datalist": "lists\\a.json"}), "spec.data.datalist"),
    ("read-only-not-bool", manifest(data={"claimName": "d", "readOnly": "yes"}), "spec.data.readOnly"),
    ("gpus-too-many", manifest(gpusPerNode=17), "spec.gpusPerNode"),
    ("gpus-not-integer", manifest(gpusPerNode=1.5), "spec.gpusPerNode"),
    ("resources-bad-quantity", manifest(resources={"limits": {"memory": "lots"}}), "spec.resources.limits.memory"),
    ("resources-unknown-key", manifest(resources={"claims": {"a": "1"}}), "spec.resources.claims"),
    ("shm-size", manifest(shmSize="2 GB"), "spec.shmSize"),
    ("node-selector-value", manifest(nodeSelector={"gpu": True}), "spec.nodeSelector.gpu"),
    ("node-selector-key", manifest(nodeSelector={"bad key!": "x"}), "spec.nodeSelector"),
    ("node-selector-key-prefix", manifest(nodeSelector={"Nvidia.COM/gpu": "x"}), "spec.nodeSelector"),
    ("node-selector-label-value", manifest(nodeSelector={"pool": "a b"}), "spec.nodeSelector.pool"),
    ("node-selector-too-many", manifest(nodeSelector={f"k{i}": "v" for i in range(65)}), "spec.nodeSelector"),
    ("toleration-operator", manifest(tolerations=[{"key": "k", "operator": "Maybe"}]), "spec.tolerations[0].operator"),
    ("toleration-effect", manifest(tolerations=[{"key": "k", "effect": "Evict"}]), "spec.tolerations[0].effect"),
    ("toleration-seconds-string", manifest(tolerations=[{"key": "k", "tolerationSeconds": "60"}]), "spec.tolerations[0].tolerationSeconds"),
    ("backoff-negative", manifest(runPolicy={"backoffLimit": -1}), "spec.runPolicy.backoffLimit"),
    ("deadline-zero", manifest(runPolicy={"activeDeadlineSeconds": 0}), "spec.runPolicy.activeDeadlineSeconds"),
    ("pending-timeout-zero", manifest(runPolicy={"pendingTimeoutSeconds": 0}), "spec.runPolicy.pendingTimeoutSeconds"),
    ("suspend-not-bool", manifest(runPolicy={"suspend": "no"}), "spec.runPolicy.suspend"),
    ("run-policy-unknown", manifest(runPolicy={"retries": 2}), "spec.runPolicy.retries"),
    ("step-type", manifest({"type": "deploy"}), "spec.steps[0].type"),
    ("step-without-type", manifest({"name": "x"}), "spec.steps[0].type"),
    ("step-name-pattern", manifest({"type": "train", "name": "Train_1"}), "spec.steps[0].name"),
    ("step-name-too-long", manifest({"type": "train", "name": "t" * 21}), "spec.steps[0].name"),
    ("step-names-repeat", manifest({"type": "train"}, {"type": "validate", "name": "train"}), "spec.steps"),
    ("nodes-zero", manifest({"type": "train", "nodes": 0}), "spec.steps[0].nodes"),
    ("nodes-on-validate", manifest({"type": "validate", "nodes": 2}), "spec.steps[0].nodes"),
    ("step-gpus-negative", manifest({"type": "train", "gpusPerNode": -1}), "spec.steps[0].gpusPerNode"),
    ("convert-without-output", manifest({"type": "convert", "input": "raw"}), "spec.steps[0]"),
    ("convert-read-only-data", manifest(convert(), data={"claimName": "d", "readOnly": True}), "spec.data.readOnly"),
    ("convert-input-absolute", manifest(convert(input="/raw")), "spec.steps[0].input"),
    ("convert-resolution-two", manifest(convert(resolution=[1, 1])), "spec.steps[0].resolution"),
    ("convert-resolution-zero", manifest(convert(resolution=[0])), "spec.steps[0].resolution[0]"),
    ("convert-ext", manifest(convert(inputExt="dcm")), "spec.steps[0].inputExt"),
    ("convert-ext-too-long", manifest(convert(outputExt="." + "n" * 16)), "spec.steps[0].outputExt"),
    ("convert-force-not-bool", manifest(convert(force="yes")), "spec.steps[0].force"),
    ("convert-options-on-train", manifest({"type": "train", "labels": True}), "spec.steps[0]"),
    ("set-on-export", manifest({"type": "export", "set": {"epochs": 1}}), "spec.steps[0].set"),
    ("set-too-many", manifest({"type": "train", "set": {f"k{i}": i for i in range(65)}}), "spec.steps[0].set"),
    ("set-not-mapping", manifest({"type": "train", "set": ["epochs=1"]}), "spec.steps[0].set"),
    ("ckpt-on-convert", manifest(convert(ckpt="m.pt")), "spec.steps[0].ckpt"),
    ("ckpt-escapes", manifest({"type": "export", "ckpt": "../other/model.pt"}), "spec.steps[0].ckpt"),
    ("model-kind", manifest({"type": "validate", "model": "tflite"}), "spec.steps[0].model"),
    ("model-on-train", manifest({"type": "train", "model": "ts"}), "spec.steps[0].model"),
    ("key-on-validate", manifest({"type": "validate", "key": "testing"}), "spec.steps[0].key"),
    ("key-too-long", manifest({"type": "infer", "key": "k" * 129}), "spec.steps[0].key"),
    ("key-empty", manifest({"type": "infer", "key": ""}), "spec.steps[0].key"),
    ("export-format", manifest({"type": "export", "formats": ["pt"]}), "spec.steps[0].formats[0]"),
    ("export-format-repeated", manifest({"type": "export", "formats": ["onnx", "onnx"]}), "spec.steps[0].formats[1]"),
    ("export-precision", manifest({"type": "export", "precision": "int8"}), "spec.steps[0].precision"),
    ("export-input-shape-short", manifest({"type": "export", "inputShape": [96, 96]}), "spec.steps[0].inputShape"),
    ("export-input-shape-zero", manifest({"type": "export", "inputShape": [1, 1, 0]}), "spec.steps[0].inputShape[2]"),
    ("export-options-on-infer", manifest({"type": "infer", "precision": "fp16"}), "spec.steps[0]"),
    ("pull-url-with-credentials", manifest(pull(dicomweb={"url": "http://ann:pw@pacs/dicom-web"})), "spec.steps[0].dicomweb.url"),
    ("pull-url-scheme", manifest(pull(dicomweb={"url": "dicom://pacs:104"})), "spec.steps[0].dicomweb.url"),
    ("pull-without-query", manifest({k: v for k, v in pull().items() if k != "query"}), "spec.steps[0]"),
    ("pull-query-empty", manifest(pull(query={})), "spec.steps[0].query"),
    ("pull-query-unknown", manifest(pull(query={"patientName": "DOE^J"})), "spec.steps[0].query.patientName"),
    ("pull-study-uid", manifest(pull(query={"studyInstanceUIDs": ["1.2.abc"]})), "spec.steps[0].query.studyInstanceUIDs[0]"),
    ("pull-modality", manifest(pull(query={"modality": "ct"})), "spec.steps[0].query.modality"),
    ("pull-study-date", manifest(pull(query={"studyDate": "2026-11-01"})), "spec.steps[0].query.studyDate"),
    ("pull-study-date-reversed", manifest(pull(query={"studyDate": "20261130-20261101"})), "spec.steps[0].query.studyDate"),
    ("pull-secret-name", manifest(pull(dicomweb={"url": "http://pacs/dicom-web", "credentialsSecret": "PACS_Creds"})), "spec.steps[0].dicomweb.credentialsSecret"),
    ("pull-dicom-output-escapes", manifest(pull(dicomOutput="../dicom")), "spec.steps[0].dicomOutput"),
    ("pull-read-only-data", manifest(pull(), data={"claimName": "d", "readOnly": True}), "spec.data.readOnly"),
    ("push-without-dicomweb", manifest({"type": "push"}), "spec.steps[0]"),
    ("dicomweb-on-export", manifest({"type": "export", "dicomweb": {"url": "http://pacs/dicom-web"}}), "spec.steps[0].dicomweb"),
    ("dicom-seg-not-bool", manifest({"type": "infer", "dicomSeg": "yes"}), "spec.steps[0].dicomSeg"),
    ("gate-on-train", manifest({"type": "train", "gate": {"metric": "val_mean_dice", "atLeast": 0.9}}), "spec.steps[0].gate"),
    ("gate-both-bounds", manifest({"type": "export", "gate": {"metric": "m", "atLeast": 0.5, "atMost": 0.9}}), "spec.steps[0].gate"),
    ("gate-without-metric", manifest({"type": "export", "gate": {"atLeast": 0.5}}), "spec.steps[0].gate.metric"),
    ("gate-bound-not-number", manifest({"type": "export", "gate": {"metric": "m", "atLeast": "high"}}), "spec.steps[0].gate.atLeast"),
    ("gate-interval-end", manifest({"type": "export", "gate": {"metric": "m", "atLeast": 0.5, "bound": "middle"}}), "spec.steps[0].gate.bound"),
]


def test_enough_distinct_invalid_cases():
    assert len({case_id for case_id, _, _ in INVALID}) == len(INVALID) >= 25


@pytest.mark.parametrize("body, field", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_server_rejects_naming_the_field(api, crd, body, field):
    stored, message = server_verdict(api, body)
    assert stored is None, f"the API server accepted it: {json.dumps(body['spec'])}"
    # the field as the server names it: `spec.x: Invalid value`, `unknown field "spec.x"`, or in a root rule's message
    assert re.search(rf'(^|[\s\[",]){re.escape(field)}(:|"|\s)', message), message
    error = contract_error(body)
    assert error, f"the API server rejects it ({message}) but mmar.job accepts it"
    named = error.split(":", 1)[0]  # mmar.job names the field first: `spec.steps[0].set: ...`
    assert named.startswith(field) or field.startswith(named), f"server: {field}; mmar.job: {error}"


# ------------------------------------------------------------------------------------------ CEL rules


def crd_schema() -> dict[str, Any]:
    return yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def iter_rules(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(schema location such as `spec.steps[].ckpt`, rule) for every x-kubernetes-validations rule."""
    for rule in schema.get("x-kubernetes-validations") or []:
        yield path or "<root>", rule
    for key, sub in (schema.get("properties") or {}).items():
        yield from iter_rules(sub, f"{path}.{key}".lstrip("."))
    if isinstance(schema.get("items"), dict):
        yield from iter_rules(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from iter_rules(schema["additionalProperties"], f"{path}{{}}")


# create-time rules; the one transition rule (over `oldSelf`: steps already present keep their places) is
# checked on updates by test_operator_identity_e2e.py
RULES = [(location, rule) for location, rule in iter_rules(crd_schema()) if "oldSelf" not in rule["rule"]]

# (schema location, a fragment of the rule's message) -> (a body the rule passes, a body only that rule fails)
CEL_CASES: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]] = {
    ("<root>", "metadata.name must be a lower-case DNS label"): (manifest(name="a" * 36), manifest(name="1spleen")),
    ("spec", "step names must be unique"): (
        manifest({"type": "train"}, {"type": "train", "name": "train-more"}), manifest({"type": "train"}, {"type": "train"})),
    ("spec", "spec.data.readOnly must be false"): (
        manifest({"type": "train"}, data={"claimName": "d", "readOnly": True}),
        manifest(convert(), {"type": "train"}, data={"claimName": "d", "readOnly": True})),
    ("spec.mmar.path", "must be relative to the claim's root"): (
        manifest(mmar={"claimName": "ws", "path": "runs/a..b"}), manifest(mmar={"claimName": "ws", "path": "runs/.."})),
    ("spec.data.path", "must be relative to the claim's root"): (
        manifest(data={"claimName": "d", "path": "sets/ct"}), manifest(data={"claimName": "d", "path": "/sets/ct"})),
    ("spec.data.datalist", "must be relative to the data root"): (
        manifest(data={"claimName": "d", "datalist": "lists/a.json"}), manifest(data={"claimName": "d", "datalist": "lists/../../x.json"})),
    ("spec.steps[]", "only train and finetune steps may run on several nodes"): (
        manifest({"type": "finetune", "nodes": 4}), manifest({"type": "export", "nodes": 2})),
    ("spec.steps[]", "a convert step needs input and output"): (
        manifest(convert()), manifest({"type": "convert", "output": "nifti"})),
    ("spec.steps[]", "are options of convert steps only"): (
        manifest(convert(labels=True, force=True, resolution=[1.5], inputExt=".dcm", outputExt=".nii.gz")),
        manifest({"type": "validate", "outputExt": ".nii"})),
    ("spec.steps[]", "set is an option of"): (
        manifest({"type": "infer", "set": {"epochs": 1, "spatial_size": [96, 96, 96], "amp": True}}), manifest({"type": "export", "set": {"epochs": 1}})),
    ("spec.steps[]", "ckpt is an option of train, finetune, validate, infer and export steps only"): (
        manifest({"type": "finetune", "ckpt": "models/best.pt"}), manifest(convert(ckpt="models/best.pt"))),
    ("spec.steps[]", "model is an option of validate and infer steps only"): (
        manifest({"type": "infer", "model": "onnx"}), manifest({"type": "export", "model": "ts"})),
    ("spec.steps[]", "key is an option of infer and pull steps only"): (
        manifest(pull(key="testing")), manifest({"type": "train", "key": "testing"})),
    ("spec.steps[]", "output is an option of convert and pull steps only"): (
        manifest(pull(output="nifti")), manifest({"type": "train", "output": "nifti"})),
    ("spec.steps[]", "a pull step needs dicomweb, query and output"): (
        manifest(pull()), manifest({k: v for k, v in pull().items() if k != "dicomweb"})),
    ("spec.steps[]", "a push step needs dicomweb"): (manifest(PUSH), manifest({"type": "push"})),
    ("spec.steps[]", "dicomweb is an option of pull and push steps only"): (
        manifest(PUSH), manifest({"type": "infer", "dicomweb": PUSH["dicomweb"]})),
    ("spec.steps[]", "query, dicomOutput and labelsFrom are options of pull steps only"): (
        manifest(pull(dicomOutput="dicom/in", labelsFrom="masks")), manifest({**PUSH, "labelsFrom": "masks"})),
    ("spec.steps[]", "dicomSeg is an option of infer steps only"): (
        manifest({"type": "infer", "dicomSeg": True}), manifest({"type": "validate", "dicomSeg": True})),
    ("spec.steps[]", "gate is an option of infer, export and push steps only"): (
        manifest({**PUSH, "gate": {"metric": "val_mean_dice", "atLeast": 0.85}}),
        manifest({"type": "validate", "gate": {"metric": "val_mean_dice", "atLeast": 0.85}})),
    ("spec.steps[].gate", "needs exactly one of atLeast, atMost"): (
        manifest({"type": "export", "gate": {"metric": "val_loss", "atMost": 0.3}}),
        manifest({"type": "export", "gate": {"metric": "val_loss"}})),
    ("spec.steps[].query.studyDate", "the range ends before it starts"): (
        manifest(pull(query={"studyDate": "20261101-20261101"})), manifest(pull(query={"studyDate": "20261102-20261101"}))),
    ("spec.steps[].query.accessionNumber", "must not contain backslashes"): (
        manifest(pull(query={"accessionNumber": "ACC-17/b"})), manifest(pull(query={"accessionNumber": "A\\17"}))),
    ("spec.steps[].query.seriesDescription", "must not contain backslashes"): (
        manifest(pull(query={"seriesDescription": "*abdomen*"})), manifest(pull(query={"seriesDescription": "T1\\T2"}))),
    ("spec.steps[].dicomOutput", "must be a relative path"): (
        manifest(pull(dicomOutput="pacs/dicom")), manifest(pull(dicomOutput="/dicom"))),
    ("spec.steps[].labelsFrom", "must be a relative path"): (
        manifest(pull(labelsFrom="pacs/masks")), manifest(pull(labelsFrom="pacs/../../masks"))),
    ("spec.steps[]", "are options of export steps only"): (
        manifest({"type": "export", "formats": ["onnx"], "precision": "fp16", "inputShape": [1, 1, 96, 96, 96]}),
        manifest({"type": "validate", "inputShape": [1, 1, 96, 96, 96]})),
    ("spec.steps[].ckpt", "must be a relative path"): (
        manifest({"type": "export", "ckpt": "models/..best.pt"}), manifest({"type": "export", "ckpt": "models\\best.pt"})),
    ("spec.steps[].input", "must be a relative path"): (manifest(convert(input="raw/ct")), manifest(convert(input="../raw"))),
    ("spec.steps[].output", "must be a relative path"): (manifest(convert(output="out/ct")), manifest(convert(output="/out"))),
    ("spec.nodeSelector", "keys must be label keys"): (
        manifest(nodeSelector={"nvidia.com/gpu.product": "A100-SXM4-80GB", "kubernetes.io/arch": "amd64", "pool": ""}),
        manifest(nodeSelector={"bad key!": "x"})),
    ("spec.steps[].resolution", "one isotropic spacing or three"): (
        manifest(convert(resolution=[0.8, 0.8, 2.5])), manifest(convert(resolution=[1.0, 2.0]))),
}


def _case_for(location: str, rule: dict[str, Any]) -> tuple[dict, dict]:
    matches = [case for (where, fragment), case in CEL_CASES.items() if where == location and fragment in rule["message"]]
    assert len(matches) == 1, f"CEL rule at {location} ({rule['message']!r}) needs exactly one good/bad case in CEL_CASES, has {len(matches)}"
    return matches[0]


def test_every_cel_case_names_a_rule():
    """No stale cases: each one still matches a rule of the CRD (and the CRD has rules to match)."""
    assert len(RULES) >= len(CEL_CASES) > 0
    for where, fragment in CEL_CASES:
        assert any(location == where and fragment in rule["message"] for location, rule in RULES), (where, fragment)


@pytest.mark.parametrize("location, rule", RULES, ids=[f"{loc}:{r['message'][:40]}" for loc, r in RULES])
def test_cel_rule_good_and_bad(api, crd, location, rule):
    good, bad = _case_for(location, rule)
    stored, message = server_verdict(api, good)
    assert stored is not None, f"good case refused: {message}"
    assert contract_error(good) is None
    stored, message = server_verdict(api, bad)
    assert stored is None, f"bad case accepted by the API server: {json.dumps(bad['spec'])}"
    assert rule["message"] in message, message
    # only this rule fails (the bad case is minimal)
    assert message.count("Invalid value") == 1, message
    assert contract_error(bad), f"the API server rejects it ({message}) but mmar.job accepts it"


def test_set_keys_are_checked_by_the_contract_only(api, crd):
    """The one known difference: `set` is kept whole (x-kubernetes-preserve-unknown-fields), so no CEL rule
    can read its keys; the server stores an `a=b` key and the operator fails the job naming the field."""
    body = manifest({"type": "train", "set": {"lr=0.1": 1}})
    stored, message = server_verdict(api, body)
    assert stored is not None, message
    assert contract_error(body).startswith("spec.steps[0].set:")


# -------------------------------------------------------------------------- examples, defaults, columns


@pytest.fixture(scope="module")
def example_namespaces(api, crd) -> Iterator[None]:
    """The namespaces the examples name (created for the test when missing, deleted after)."""
    core = api.CoreV1Api()
    wanted = {(contract.load(p).get("metadata") or {}).get("namespace") or DRY_RUN_NAMESPACE for p in EXAMPLES}

    def existing() -> dict[str, str]:
        return {ns.metadata.name: ns.status.phase for ns in core.list_namespace().items}

    # a namespace an earlier run deleted may still be terminating: nothing can be created in it
    deadline = time.monotonic() + 60
    while any(existing().get(name) == "Terminating" for name in wanted) and time.monotonic() < deadline:
        time.sleep(0.5)
    made = sorted(wanted - set(existing()))
    for name in made:
        core.create_namespace({"metadata": {"name": name}})
    yield
    for name in made:
        core.delete_namespace(name)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_accepted_with_the_contracts_defaults(api, example_namespaces, path):
    body = contract.load(path)
    namespace = body["metadata"].get("namespace") or DRY_RUN_NAMESPACE
    stored, message = server_verdict(api, body, namespace)
    assert stored is not None, f"{path.name}: {message}"
    by_contract = contract.apply_defaults(copy.deepcopy(body))["spec"]
    # the one default a schema cannot express (it depends on another field): a step's name is its type
    for given, step in zip(body["spec"]["steps"], by_contract["steps"]):
        if "name" not in given:
            del step["name"]
    assert stored["spec"] == by_contract
    contract.parse(stored)


def test_server_defaults_match_the_contract_for_a_bare_manifest(api, crd):
    body = manifest({"type": "convert", "input": "a", "output": "b"}, {"type": "train", "nodes": 2}, {"type": "export"})
    stored, message = server_verdict(api, body)
    assert stored is not None, message
    by_contract = contract.apply_defaults(copy.deepcopy(body))["spec"]
    for step in by_contract["steps"]:
        del step["name"]
    assert stored["spec"] == by_contract


def test_printer_columns(kubectl, make_namespace):
    namespace = make_namespace("crd-columns")
    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest(name="cols")))
    gate = {"metric": "val_mean_dice", "atLeast": 0.85, "value": 0.81, "passed": False,
            "message": "val_mean_dice 0.81 < 0.85 (eval/metrics.json)"}
    kubectl("patch", "mmarjob", "cols", "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(
        {"status": {"phase": "Running", "currentStep": "train", "reason": "StepRunning", "message": "step train is running",
                    "results": {"epochs": 12, "bestMetric": 0.875, "gate": gate}}}))
    stored = json.loads(kubectl("get", "mmarjob", "cols", "-n", namespace, "-o", "json").stdout)
    assert stored["status"]["results"]["gate"] == gate  # typed in the schema: kept whole, nothing pruned
    for resource in ("mmarjobs", "mmarj", "mmar"):  # plural, short name, category
        plain = kubectl("get", resource, "-n", namespace).stdout.splitlines()
        assert plain[0].split() == ["NAME", "PHASE", "STEP", "EPOCHS", "BEST", "GATE", "AGE"], plain
        assert "StepRunning" not in plain[1]
        lines = kubectl("get", resource, "-n", namespace, "-o", "wide").stdout.splitlines()
        header, row = lines[0].split(), lines[1].split()
        assert header == ["NAME", "PHASE", "STEP", "EPOCHS", "BEST", "GATE", "AGE", "REASON", "MESSAGE"], lines
        assert lines[1].rstrip().endswith("StepRunning   step train is running"), lines
        assert row[:5] == ["cols", "Running", "train", "12", "0.875"], lines
        assert gate["message"] in lines[1], lines
