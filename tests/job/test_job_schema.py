"""mmar.job.spec validates manifests from the CRD itself: the package's copy is the CRD, every CEL rule has its
Python (and the two agree, checked with cel-python), transition rules are left out, and no error echoes a
value."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

import test_job
import test_job_pacs_gate
from mmar import job as contract
from mmar.errors import MMARError
from mmar.job import spec

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "mmar.dev_mmarjobs.yaml"


def test_the_package_ships_the_crd():
    """The runtime and operator images install the package, not the repository: it carries the CRD as package
    data (a copy: a symlink out of runtime/ would dangle in the images' build context)."""
    shipped = Path(spec.__file__).with_name(spec.CRD_FILE).read_text()
    assert shipped == CRD.read_text(), f"cp {CRD.relative_to(ROOT)} runtime/mmar/job/{spec.CRD_FILE}"


def _rules(node, where=()):
    for rule in node.get("x-kubernetes-validations") or []:
        yield where, rule
    for key, sub in (node.get("properties") or {}).items():
        yield from _rules(sub, (*where, key))
    if isinstance(node.get("items"), dict):
        yield from _rules(node["items"], (*where, "[]"))
    if isinstance(node.get("additionalProperties"), dict):
        yield from _rules(node["additionalProperties"], (*where, "{}"))


def _texts():
    return {rule["rule"] for _, rule in _rules(spec.schema()) if "oldSelf" not in rule["rule"]}


def test_every_cel_rule_has_its_python_and_no_other():
    """An option rule (`!has(self.F) || self.type in [...]`) is read from its text; every other has its entry."""
    options = {text for text in _texts() if spec.OPTION_RULE_RE.match(text)}
    assert len(options) >= 7  # one per option of some step types only (output, set, ckpt, ...)
    assert _texts() - options == set(spec.RULES)
    assert all(callable(spec.rule_check(text)) for text in _texts())


def _values_at(value, where):
    """Every value of a manifest at a rule's place in the schema."""
    if not where:
        yield value
        return
    head, rest = where[0], where[1:]
    if head == "[]" and isinstance(value, list):
        for item in value:
            yield from _values_at(item, rest)
    elif head == "{}" and isinstance(value, dict):
        for item in value.values():
            yield from _values_at(item, rest)
    elif isinstance(value, dict) and head in value:
        yield from _values_at(value[head], rest)


def _samples():
    bodies = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "examples").glob("*.yaml"))]
    for mutate, _ in test_job.BAD:
        body = test_job.manifest()
        mutate(body)
        bodies.append(body)
    bodies += [test_job_pacs_gate.manifest(step) for step, _ in test_job_pacs_gate.BAD]
    bodies.append(test_job_pacs_gate.manifest(test_job_pacs_gate.PULL, test_job_pacs_gate.PUSH))
    bodies += RULE_BREAKERS
    for body in bodies:
        yield spec.apply_defaults(copy.deepcopy(body))


def test_the_python_of_each_rule_agrees_with_cel():
    celpy = pytest.importorskip("celpy")

    def substring(text, start, end=None):  # the Kubernetes strings extension, which cel-python lacks
        return celpy.celtypes.StringType(str(text)[int(start):] if end is None else str(text)[int(start):int(end)])

    env = celpy.Environment()
    checked = set()
    for where, rule in _rules(spec.schema()):
        if "oldSelf" in rule["rule"]:
            continue
        program = env.program(env.compile(rule["rule"]), functions={"substring": substring})
        for body in _samples():
            for value in _values_at(body, where):
                try:
                    by_cel = program.evaluate({"self": celpy.json_to_cel(value)})
                except Exception:  # noqa: BLE001 - an ill-typed value: the schema refuses it before any rule
                    continue
                if isinstance(by_cel, Exception):
                    continue
                try:
                    by_python = spec.rule_check(rule["rule"])(value)
                except (KeyError, TypeError, AttributeError, ValueError):
                    continue
                assert bool(by_python) == bool(by_cel), (rule["message"], value)
                checked.add((rule["rule"], bool(by_cel)))
    passing = {text for text, ok in checked if ok}
    failing = {text for text, ok in checked if not ok}
    assert passing == _texts(), "a rule never seen to pass"
    assert failing == _texts(), "a rule never seen to fail"


def test_a_transition_rule_is_left_out(monkeypatch):
    schema = copy.deepcopy(spec.schema())
    schema["properties"]["spec"]["properties"]["steps"]["x-kubernetes-validations"] = [
        {"rule": "oldSelf.all(o, o in self)", "message": "steps are never removed"}]
    monkeypatch.setattr(spec, "schema", lambda: schema)
    contract.parse(test_job.manifest())


@pytest.mark.parametrize("field, body", [
    ("dicomweb.url", test_job_pacs_gate.manifest({**test_job_pacs_gate.PULL, "dicomweb": {"url": "https://ann:hunter2@pacs/x?q=1"}})),
    ("dicomweb.url", test_job_pacs_gate.manifest({**test_job_pacs_gate.PUSH, "dicomweb": {"url": "ftp://ann:hunter2@pacs"}})),
    ("image", test_job.manifest(image="https://ann:hunter2@registry/" + "x" * 600)),
    ("key", test_job.manifest({"type": "infer", "key": "hunter2" * 40})),
])
def test_errors_never_echo_a_value(field, body):
    with pytest.raises(MMARError) as error:
        contract.parse(body)
    assert field in str(error.value) and "hunter2" not in str(error.value)


def test_several_problems_are_named_at_once():
    body = test_job.manifest({"type": "train", "nodes": 0}, gpusPerNode=99, imagePullPolicy="Sometimes", shmSize="lots")
    with pytest.raises(MMARError) as error:
        contract.parse(body)
    text = str(error.value)
    assert "spec.gpusPerNode: must be <= 16" in text and text.endswith("(and 1 more problem)")


def test_status_is_not_validated_as_the_spec():
    """The operator parses MMARJobs read back from the API server: the status subresource is its own."""
    body = test_job.manifest()
    body["status"] = {"results": {"gate": {"value": None}}, "phase": "Running"}
    contract.parse(body)


PULL, PUSH = test_job_pacs_gate.PULL, test_job_pacs_gate.PUSH
# each breaks one rule of a step (the samples above break the rest)
RULE_BREAKERS = [
    test_job.manifest({"type": "train", "input": "a"}),
    test_job.manifest({"type": "train", "output": "b"}),
    test_job.manifest({"type": "export", "dicomweb": PUSH["dicomweb"]}),
    test_job.manifest({**PUSH, "labelsFrom": "labels"}),
    test_job.manifest({"type": "export", "set": {"epochs": 1}}),
    test_job.manifest({"type": "convert", "input": "a", "output": "b", "ckpt": "m.pt"}),
    test_job.manifest({"type": "train", "model": "onnx"}),
    test_job.manifest({"type": "validate", "key": "testing"}),
    test_job.manifest({"type": "export", "ckpt": "../other/model.pt"}),
    test_job.manifest(nodeSelector={"bad key!": "x"}),
    test_job_pacs_gate.manifest({**PULL, "query": {"seriesDescription": "T1\\x"}}),
    test_job.manifest({"type": "train", "name": "a"}, {"type": "validate", "name": "a"}),
    {**test_job.manifest(), "metadata": {"name": "Spleen_CT"}},
]


def test_a_new_step_option_needs_no_python(monkeypatch):
    """A field the CRD declares with its option rule is refused in other steps by that rule alone."""
    schema = copy.deepcopy(spec.schema())
    items = schema["properties"]["spec"]["properties"]["steps"]["items"]
    items["properties"]["overlays"] = {"type": "boolean"}
    items["x-kubernetes-validations"].append({"rule": "!has(self.overlays) || self.type in ['validate', 'infer']",
                                              "message": "overlays is an option of validate and infer steps only",
                                              "fieldPath": ".overlays"})
    monkeypatch.setattr(spec, "schema", lambda: schema)
    contract.parse(test_job.manifest({"type": "infer", "overlays": True}))
    with pytest.raises(MMARError, match=r"spec.steps\[0\].overlays: overlays is an option of validate and infer steps only"):
        contract.parse(test_job.manifest({"type": "train", "overlays": True}))


def test_the_type_lists_are_the_crds():
    """What each step type means (mmar.job.spec) is said for exactly the types the CRD lists."""
    properties = spec.schema()["properties"]["spec"]["properties"]
    assert tuple(properties["steps"]["items"]["properties"]["type"]["enum"]) == spec.STEP_TYPES
    assert tuple(properties["task"]["enum"]) == spec.TASKS
    for kinds in (spec.TRAINING_TYPES, spec.MMAR_TYPES, spec.CPU_TYPES, spec.GATED_TYPES):
        assert set(kinds) <= set(spec.STEP_TYPES)
    (gate_rule,) = [t for t in _texts() if t.startswith("!has(self.gate) ||")]  # the steps `mmar --gate` accepts
    assert set(re.findall(r"'(\w+)'", gate_rule)) == set(spec.GATED_TYPES)
