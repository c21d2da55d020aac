"""The MMARJob spec: load a manifest, apply the defaults and validate it, from the CRD itself.

The CRD (crds/mmar.dev_mmarjobs.yaml, shipped in this package as `mmarjob.crd.yaml`) is the one source of the
schema: `apply_defaults` fills its `default`s, `validate` checks its openAPIV3Schema with jsonschema, refuses
fields it does not declare (as the API server's strict field validation does) and evaluates its CEL rules
(`x-kubernetes-validations`) in Python (`rule_check`): a rule that makes a field an option of some step types
is read from its own text, every other rule has one function in `RULES`, keyed by its text; the message and
the field path come from the CRD. A rule that compares with the object's previous state (`oldSelf`, a transition
rule) has no meaning for one manifest and is skipped. `BEYOND_THE_SCHEMA` holds the few checks no schema can
say (the `--set` overrides as the runtime reads them, a finite gate threshold).

Errors name the field (`spec.steps[1].nodes: must be <= 64`) and the failed check, never the value (a URL may
carry a password): `parse(path)` adds the manifest's file.

Imports nothing heavy at import time: the CRD, yaml and jsonschema are read on first use.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from mmar.errors import MMARError
from mmar.job.outcome import API_VERSION, KIND

CRD_FILE = "mmarjob.crd.yaml"  # package data: a copy of crds/mmar.dev_mmarjobs.yaml (tests/job/test_job_schema.py)

# What each step type means to the runtime and the operator (the CRD lists the types; these say what they do)
STEP_TYPES = ("pull", "convert", "train", "finetune", "validate", "infer", "export", "push")
TRAINING_TYPES = ("train", "finetune")  # the only steps that may span several nodes
MMAR_TYPES = ("train", "finetune", "validate", "infer", "export", "push")  # steps that read/write the MMAR
CPU_TYPES = ("pull", "convert", "push")  # steps that ask for no GPU unless they say so
GATED_TYPES = ("infer", "export", "push")  # steps that may carry a `gate`
TASKS = ("segmentation", "classification")  # spec.task, PROCESSING_TASK, `mmar init --task` (mmar.tasks)
SHOWN_ERRORS = 3  # problems named in one error; the count of the rest follows


# ------------------------------------------------------------------------------------------------ the CRD


@functools.cache
def crd() -> dict[str, Any]:
    """The MMARJob CustomResourceDefinition, as shipped in this package."""
    import yaml  # a base dependency, imported on first use to keep `import mmar.job` instant

    text = resources.files(__package__).joinpath(CRD_FILE).read_text(encoding="utf-8")
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml where built: 10x faster


def schema() -> dict[str, Any]:
    """The CRD's openAPIV3Schema (of its one version)."""
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@functools.cache
def _validator():
    import jsonschema

    return jsonschema.Draft4Validator(schema())  # OpenAPI 3.0 schemas are draft-4 flavoured


# ---------------------------------------------------------------------------------------------- load, parse


def load(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A manifest as a dict: from a dict, a path to a YAML/JSON file, or YAML text."""
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    import yaml

    where = "manifest"
    if _is_path(source):
        path = Path(source)
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise MMARError(f"{path}: cannot read the MMARJob manifest ({error.strerror or error})") from None
    else:
        text = str(source)
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as error:
        raise MMARError(f"{where}: not valid YAML ({error})") from None
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
    if len(jobs) != 1:
        found = ", ".join(str(d.get("kind")) for d in documents if isinstance(d, dict)) or "nothing"
        raise MMARError(f"{where}: expected exactly one document of kind {KIND}, found {found}")
    return jobs[0]


def _is_path(source: Any) -> bool:
    return isinstance(source, Path) or (isinstance(source, str) and "\n" not in source
                                        and source.endswith((".yaml", ".yml", ".json")))


def parse(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Load, default and validate a manifest; returns a new dict (the input is never modified). An invalid
    manifest read from a file raises MMARError naming the file, then the fields."""
    job = load(source)
    apply_defaults(job)
    try:
        validate(job)
    except MMARError as error:
        if _is_path(source):
            raise MMARError(f"{source}: {error}") from None
        raise
    return job


def apply_defaults(job: dict[str, Any]) -> dict[str, Any]:
    """Fill in the schema's defaults in place (what the API server does from the CRD on a cluster), and the one
    default a schema cannot say: a step's name is its type."""
    _defaults(schema(), job)
    spec = job.get("spec")
    for step in (spec.get("steps") if isinstance(spec, dict) else None) or []:
        if isinstance(step, dict) and isinstance(step.get("type"), str):
            step.setdefault("name", step["type"])
    return job


def _defaults(node: Mapping[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        for key, sub in (node.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _defaults(sub, value[key])
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for item in value:
            _defaults(node["items"], item)


# ---------------------------------------------------------------------------------------------- validate


def validate(job: Any) -> None:
    """Raise MMARError naming the fields at fault; `job` must have had its defaults applied."""
    problems = list(problems_of(job))
    if problems:
        shown = "; ".join(f"{path}: {message}" if path else message for path, message in problems[:SHOWN_ERRORS])
        more = len(problems) - SHOWN_ERRORS
        raise MMARError(shown + (f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else ""))


def problems_of(job: Any) -> Iterator[tuple[str, str]]:
    """(field path, message) of each problem: the API's identity, then the schema and its undeclared fields,
    then (once those hold, as on the API server) the CEL rules, then the checks beyond the schema."""
    if not isinstance(job, dict):
        yield "manifest", "must be a mapping"
        return
    if job.get("apiVersion") != API_VERSION:
        yield "apiVersion", f"must be {API_VERSION}"
    if job.get("kind") != KIND:
        yield "kind", f"must be {KIND}"
    meta = job.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        yield "metadata.name", "is required"
        return
    body = {key: value for key, value in job.items() if key != "status"}  # the status has its own subresource
    problems = _problems(schema(), body, (), _validator())
    yield from problems
    if not problems:
        for check in BEYOND_THE_SCHEMA:
            yield from check(body)


def check_part(value: Any, where: str, *keys: str) -> None:
    """Validate one part of a manifest (e.g. a gate: keys "spec", "steps", "[]", "gate") as `validate` does the
    whole, raising MMARError with paths under `where`."""
    import jsonschema

    node = schema()
    for key in keys:
        node = node["items"] if key == "[]" else node["properties"][key]
    problems = _problems(node, value, (where,), jsonschema.Draft4Validator(node))
    if problems:
        raise MMARError("; ".join(f"{path}: {message}" for path, message in problems[:SHOWN_ERRORS]))


def _problems(node: Mapping[str, Any], value: Any, where: tuple, validator: Any) -> list[tuple[str, str]]:
    """The schema's problems with `value` (its checks, then its undeclared fields) or, when it has none, its
    CEL rules' (the API server evaluates those only on a value of the declared shape)."""
    found = sorted(validator.iter_errors(value), key=lambda e: [str(p) for p in e.absolute_path])
    problems = [(_path((*where, *e.absolute_path), e), _schema_message(e)) for e in found]
    problems += _undeclared(node, value, where)
    return problems or list(_rule_failures(node, value, where))


def _path(parts: Any, error: Any = None) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    if error is not None and error.validator == "required":
        missing = next(k for k in error.validator_value if error.message.startswith(repr(k)))
        text += f".{missing}" if text else missing
    return text


# the schema's patterns in words (an unnamed pattern is shown as it is)
PATTERN_WORDS = {
    r"^[a-z]([-a-z0-9]*[a-z0-9])?$": "must be a lower-case DNS label starting with a letter",
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$":
        "must be a lower-case DNS-1123 subdomain (the name of a PersistentVolumeClaim, Secret or ServiceAccount)",
    r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$": "must be a Kubernetes quantity such as 500m, 2, 8Gi",
    r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$":
        "must be a label value: letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
    r"^\.[A-Za-z0-9.]+$": "must be a file extension such as .dcm or .nii.gz",
    r"^https?://[^\s/@?#]+(/[^\s?#]*)?$": "must be an http:// or https:// URL without query or fragment",
    r"^[0-9]+(\.[0-9]+)*$": "must be a DICOM UID (digits and dots)",
    r"^[A-Z0-9]{1,16}$": "must be a DICOM modality code such as CT or MR",
    r"^[0-9]{8}(-[0-9]{8})?$": "must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD",
    r"^[A-Za-z0-9_.:/-]+$": "must be a metric name of eval/metrics.json (letters, digits, _ . : / -), such as val_mean_dice",
}
TYPE_WORDS = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
              "object": "a mapping", "array": "a list"}


def _schema_message(error: Any) -> str:
    """The failed check of a jsonschema error in words, without the value."""
    kind, bound = error.validator, error.validator_value
    if kind == "required":
        return "is required"
    if kind == "type":
        return f"must be {' or '.join(TYPE_WORDS.get(t, t) for t in ([bound] if isinstance(bound, str) else bound))}"
    if kind == "anyOf":
        return "must be " + " or ".join(TYPE_WORDS.get(b.get("type"), str(b)) for b in bound)
    if kind == "enum":
        return f"must be one of {', '.join(map(str, bound))}"
    if kind == "minimum":
        return f"must be {'>' if error.schema.get('exclusiveMinimum') else '>='} {bound}"
    if kind == "maximum":
        return f"must be {'<' if error.schema.get('exclusiveMaximum') else '<='} {bound}"
    if kind == "minLength":
        return "must be a non-empty string" if bound == 1 else f"must be at least {bound} characters"
    if kind == "maxLength":
        return f"must be at most {bound} characters"
    if kind == "minItems":
        return f"must list at least {bound} item{'s' if bound != 1 else ''}"
    if kind == "maxItems":
        return f"must list at most {bound} item{'s' if bound != 1 else ''}"
    if kind == "minProperties":
        return f"must have at least {bound} of {', '.join(error.schema.get('properties') or {}) or 'its keys'}"
    if kind == "maxProperties":
        return f"must have at most {bound} entries"
    if kind == "pattern":
        words = PATTERN_WORDS.get(bound, f"must match {bound}")
        if "://" in bound and isinstance(error.instance, str) and "@" in error.instance.split("//", 1)[-1].split("/", 1)[0]:
            words = "credentials never go in the URL: put them in a Secret and name it in credentialsSecret"
        return words
    return f"fails the schema's {kind} check"


def _undeclared(node: Mapping[str, Any], value: Any, where: tuple) -> Iterator[tuple[str, str]]:
    """Fields the schema does not declare (the API server's strict field validation refuses them), and
    repeats in a `x-kubernetes-list-type: set` list."""
    if isinstance(value, dict) and isinstance(node.get("properties"), dict):
        known = node["properties"]
        if not node.get("x-kubernetes-preserve-unknown-fields") and not node.get("additionalProperties"):
            for key in value:
                if key not in known:
                    yield _path((*where, key)), f"unknown field (allowed: {', '.join(known)})"
        for key, sub in known.items():
            if key in value:
                yield from _undeclared(sub, value[key], (*where, key))
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        if node.get("x-kubernetes-list-type") == "set" and len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
            yield _path(where), "lists an item twice"
        for i, item in enumerate(value):
            yield from _undeclared(node["items"], item, (*where, i))


# ------------------------------------------------------------------------------------------------ CEL rules


def _rule_failures(node: Mapping[str, Any], value: Any, where: tuple) -> Iterator[tuple[str, str]]:
    for rule in node.get("x-kubernetes-validations") or []:
        text = rule["rule"]
        if "oldSelf" in text:  # a transition rule: it compares with a previous version, there is none here
            continue
        check = rule_check(text)
        try:
            ok = check(value)
        except (KeyError, TypeError, AttributeError, ValueError):
            ok = False
        if not ok:
            path = _path(where) + (rule.get("fieldPath") or "")
            yield path.lstrip("."), rule.get("message", text)
    if isinstance(value, dict):
        for key, sub in value.items():
            if key in (node.get("properties") or {}):
                yield from _rule_failures(node["properties"][key], sub, (*where, key))
            elif isinstance(node.get("additionalProperties"), dict):
                yield from _rule_failures(node["additionalProperties"], sub, (*where, key))
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            yield from _rule_failures(node["items"], item, (*where, i))


# `!has(self.FIELD) || self.type in ['a', 'b']` (or `== 'a'`): an option of those step types only. The CRD's rule
# says which; read from it, a new step option needs no Python here.
OPTION_RULE_RE = re.compile(r"^!has\(self\.(\w+)\) \|\| self\.type (?:== '(\w+)'|in \[((?:'\w+'(?:, )?)+)\])$")


def rule_check(text: str) -> Callable[[Any], bool]:
    """The Python of one of the CRD's CEL rules: an option rule read from its text, else its entry in RULES."""
    option = OPTION_RULE_RE.match(text)
    if option:
        field, one, several = option.groups()
        types = (one,) if one else tuple(re.findall(r"'(\w+)'", several))
        return lambda step: field not in step or step["type"] in types
    if text not in RULES:
        raise MMARError(f"mmar.job.spec.RULES has no Python for the CRD's rule {text!r}: add it")
    return RULES[text]


def _options_of(kind: str, *fields: str) -> Callable[[Mapping[str, Any]], bool]:
    """`self.type == KIND || !(has(self.A) || ...)`: options of KIND steps only."""
    return lambda step: step["type"] == kind or not any(f in step for f in fields)


def _needs(kind: str, *fields: str) -> Callable[[Mapping[str, Any]], bool]:
    """`self.type != KIND || (has(self.A) && ...)`: a KIND step needs these."""
    return lambda step: step["type"] != kind or all(f in step for f in fields)


def _name(step: Mapping[str, Any]) -> str:
    return step.get("name", step["type"])


RELATIVE_RE = re.compile(r"(^|/)[.][.](/|$)")
LABEL_KEY_RE = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# The CRD's CEL rules (x-kubernetes-validations) other than the option rules (`rule_check`), each as Python:
# {the rule's text: a check of `self`}. Their messages and field paths are the CRD's. tests/job/test_job_schema.py checks every rule has one here and
# that each agrees with cel-python on good and bad inputs.
RULES: dict[str, Callable[[Any], bool]] = {
    "self.metadata.name.size() <= 36 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')":
        lambda job: len(job["metadata"]["name"]) <= 36 and bool(NAME_RE.search(job["metadata"]["name"])),
    "self.steps.all(s, self.steps.exists_one(t, (has(t.name) ? t.name : t.type) == (has(s.name) ? s.name : s.type)))":
        lambda spec: all(sum(_name(t) == _name(s) for t in spec["steps"]) == 1 for s in spec["steps"]),
    "!self.data.readOnly || !self.steps.exists(s, s.type in ['convert', 'pull'])":
        lambda spec: not spec["data"].get("readOnly") or not any(s["type"] in ("convert", "pull") for s in spec["steps"]),
    "!self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)') && !self.contains('\\\\')":
        lambda path: not path.startswith("/") and not RELATIVE_RE.search(path) and "\\" not in path,
    "self.all(k, k.size() <= 317 && k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'))":
        lambda selector: all(len(k) <= 317 and LABEL_KEY_RE.search(k) for k in selector),
    "self.nodes == 1 || self.type in ['train', 'finetune']": lambda step: step.get("nodes", 1) == 1 or step["type"] in TRAINING_TYPES,
    "self.type != 'convert' || (has(self.input) && has(self.output))": _needs("convert", "input", "output"),
    "self.type == 'convert' || !(has(self.input) || has(self.resolution) || has(self.inputExt) || has(self.outputExt) || has(self.force) || has(self.labels))":
        _options_of("convert", "input", "resolution", "inputExt", "outputExt", "force", "labels"),
    "self.type != 'pull' || (has(self.dicomweb) && has(self.query) && has(self.output))": _needs("pull", "dicomweb", "query", "output"),
    "self.type != 'push' || has(self.dicomweb)": _needs("push", "dicomweb"),
    "self.type == 'pull' || !(has(self.query) || has(self.dicomOutput) || has(self.labelsFrom))":
        _options_of("pull", "query", "dicomOutput", "labelsFrom"),
    "self.type == 'export' || !(has(self.formats) || has(self.precision) || has(self.inputShape))":
        _options_of("export", "formats", "precision", "inputShape"),
    "self.size() != 2": lambda items: len(items) != 2,
    "self.size() != 17 || self.substring(0, 8) <= self.substring(9, 17)": lambda date: len(date) != 17 or date[0:8] <= date[9:17],
    "!self.contains('\\\\')": lambda text: "\\" not in text,
    "has(self.atLeast) != has(self.atMost)": lambda gate: ("atLeast" in gate) != ("atMost" in gate),
}


# ---------------------------------------------------------------------------------------- beyond the schema


def _set_overrides(job: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """A step's `set:` as its `--set` items will read them, checked now rather than when the step starts after
    the others (the CRD keeps `set` whole: no CEL rule can read its keys)."""
    from mmar.archive import check_set_item  # stdlib-only at import, as this module

    for index, step in enumerate(job["spec"]["steps"]):
        where = f"spec.steps[{index}].set"
        overrides = step.get("set")
        if overrides is None:
            continue
        if not all(isinstance(k, str) and k and "=" not in k for k in overrides):
            yield where, "must be a mapping of config or environment key to value, e.g. {epochs: 5}"
            continue
        for key, value in overrides.items():
            try:
                check_set_item(f"{key}={value_text(value)}", f"{where}.{key}")
            except MMARError as error:
                yield "", str(error)


def _finite_gates(job: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """A gate's threshold is a finite number (YAML can write .nan and .inf; JSON, the API server's, cannot)."""
    for index, step in enumerate(job["spec"]["steps"]):
        for bound in ("atLeast", "atMost"):
            value = (step.get("gate") or {}).get(bound)
            if isinstance(value, float) and not math.isfinite(value):
                yield f"spec.steps[{index}].gate.{bound}", "must be a finite number"


BEYOND_THE_SCHEMA: tuple[Callable[[Mapping[str, Any]], Iterator[tuple[str, str]]], ...] = (_set_overrides, _finite_gates)


def value_text(value: Any) -> str:
    """A `--set` value as text: strings as they are, everything else as JSON (true, 0.001, [96, 96, 96])."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


# ------------------------------------------------------------------------------------------------ accessors


def name_of(job: Mapping[str, Any]) -> str:
    return job["metadata"]["name"]


def steps_of(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    return job["spec"]["steps"]
