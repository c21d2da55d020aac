"""The MMARJob manifest: the one contract between the operator and the runtime.

`parse()` reads a manifest (YAML text, a file or a dict), applies the defaults and validates it with
errors naming the field (`spec.steps[1].nodes: ...`). `step_argv()` turns one step into the runtime's
argv. The operator puts that argv into a pod; `mmar run JOB.yaml` runs it in a subprocess: one function,
two callers, so a step means the same thing on a cluster and on a laptop.

Imports nothing heavy (no torch, no kubernetes): the operator image installs this without the runtime.

The defaults and rules here mirror the CRD's openAPIV3Schema and CEL rules in crds/ (the API server
applies those on a cluster; `mmar run` has no API server, so it applies these). tests/operator checks the
two agree.

Inside a pod the MMAR claim is mounted at WORKSPACE_ROOT and the data claim at DATA_ROOT; every path in a
step's argv is under one of the two, so `mmar run` maps each claim to a local folder by swapping prefixes.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from mmar import results
from mmar.errors import MMARError
from mmar.job.outcome import (API_VERSION, GATE_NOT_MET, GROUP, KIND, NOT_RUN, PLURAL, PREVIOUS_STEP_FAILED, VERSION,  # noqa: F401
                              job_outcome, not_run, now_iso, skipped_by_gate)


WORKSPACE_ROOT = "/workspace"  # the MMAR claim, mounted whole
DATA_ROOT = "/data"  # the data claim, mounted whole
MASTER_PORT = 29500  # torchrun's static rendezvous port (the PyTorch default)

STEP_TYPES = ("pull", "convert", "train", "finetune", "validate", "infer", "export", "push")
TRAINING_TYPES = ("train", "finetune")  # the only steps that may span several nodes
MMAR_TYPES = ("train", "finetune", "validate", "infer", "export", "push")  # steps that read/write the MMAR
DATA_WRITING_TYPES = ("pull", "convert")  # steps that write into the data claim
CPU_TYPES = ("pull", "convert", "push")  # steps that ask for no GPU unless they say so
GATED_TYPES = ("infer", "export", "push")  # steps that may carry a `gate`
SET_TYPES = ("train", "finetune", "validate", "infer")  # steps taking `--set KEY=VALUE`
TASKS = ("segmentation", "classification")
MODEL_KINDS = ("ckpt", "ts", "onnx", "trt")
EXPORT_FORMATS = ("torchscript", "onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")

# Which optional fields each step type accepts (anything else is an error naming the field).
STEP_FIELDS: dict[str, set[str]] = {
    "pull": {"dicomweb", "query", "dicomOutput", "output", "key", "labelsFrom"},
    "convert": {"input", "output", "resolution", "inputExt", "outputExt", "force", "labels"},
    "train": {"set", "ckpt"},
    "finetune": {"set", "ckpt"},
    "validate": {"set", "ckpt", "model"},
    "infer": {"set", "ckpt", "model", "key", "dicomSeg", "gate"},
    "export": {"ckpt", "formats", "precision", "inputShape", "gate"},
    "push": {"dicomweb", "gate"},
}
COMMON_STEP_FIELDS = {"name", "type", "nodes", "gpusPerNode", "resources"}

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # a DNS-1035 label (Service names need one)
CLAIM_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")  # a DNS-1123 subdomain
# a label key (nodeSelector): an optional DNS-1123 subdomain and '/', then a name of at most 63 characters
LABEL_KEY_RE = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_KEY_MAX = 317  # 253 + '/' + 63
LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_VALUE_MAX = 63
NODE_SELECTOR_MAX = 64
STEP_NAME_MAX = 20
JOB_NAME_MAX = 36  # child "<job>-<index>-<step>" plus an indexed pod's "-<rank>" stays a 63-character DNS label
QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
EXT_RE = re.compile(r"^\.[A-Za-z0-9.]+$")
# the CRD's maxLength / maxItems / maxProperties bounds (they also bound the cost of its CEL rules)
PATH_MAX = 512
IMAGE_MAX = 512
KEY_MAX = 128
EXT_MAX = 16
K8S_NAME_MAX = 253
SET_MAX = 64
PULL_SECRETS_MAX = 8
TOLERATIONS_MAX = 16
TOLERATION_FIELDS = {"key": str, "operator": str, "value": str, "effect": str, "tolerationSeconds": int}
TOLERATION_OPERATORS = ("Exists", "Equal")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# DICOMweb (pull/push): the server, and the query that picks what a pull retrieves
URL_RE = re.compile(r"^https?://[^\s/@?#]+(/[^\s?#]*)?$")  # no userinfo: credentials never live in a spec
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # a DICOM UI value: digits and dots, at most 64 characters
UID_MAX = 64
UIDS_MAX = 100
MODALITY_RE = re.compile(r"^[A-Z0-9]{1,16}$")
DATE_RANGE_RE = re.compile(r"^[0-9]{8}(-[0-9]{8})?$")
QUERY_TEXT_MAX = 64  # DICOM LO: AccessionNumber (SH, 16) and SeriesDescription (LO, 64) fit
QUERY_FIELDS = ("studyInstanceUIDs", "modality", "studyDate", "accessionNumber", "seriesDescription")
DICOMWEB_FIELDS = ("url", "credentialsSecret")
DEFAULT_DICOM_OUTPUT = "dicom"  # where a pull step keeps the retrieved DICOM files (under the data path)
# The Secret a dicomweb.credentialsSecret names: its keys -> the environment variables the runtime reads
# (HTTP basic with username + password, or a bearer token). Never in argv, spec, status, events or logs.
CREDENTIAL_ENV = {"username": "MMAR_DICOMWEB_USERNAME", "password": "MMAR_DICOMWEB_PASSWORD",
                  "token": "MMAR_DICOMWEB_TOKEN"}
# gate: run a step only if the MMAR's last validation reaches a threshold
GATE_METRIC_RE = re.compile(r"^[A-Za-z0-9_.:/-]+$")
GATE_BOUNDS = {"atLeast": ">=", "atMost": "<="}
# `bound`: compare the threshold with an end of the 95 % interval `mmar validate` writes (eval/metrics.json
# `intervals`), not the point estimate, so a push never rests on a lucky estimate (docs/model-selection.md)
GATE_INTERVAL_ENDS = ("lower", "upper")
DEFAULTS: dict[str, Any] = {
    "imagePullPolicy": "IfNotPresent",
    "gpusPerNode": 1,
    "shmSize": "2Gi",
    "runPolicy": {"backoffLimit": 0, "suspend": False},
}
MMAR_DEFAULTS = {"path": "mmar"}
DATA_DEFAULTS = {"path": "", "datalist": "datalist.json", "readOnly": False}
STEP_DEFAULTS = {"nodes": 1}


def load(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A manifest as a dict: from a dict, a path to a YAML/JSON file, or YAML text."""
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    import yaml  # pyyaml is a base dependency; imported here to keep `import mmar.job` instant

    where = "manifest"
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml", ".json"))):
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


def parse(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Load, default and validate a manifest; returns a new dict (the input is never modified)."""
    job = load(source)
    apply_defaults(job)
    validate(job)
    return job


def apply_defaults(job: dict[str, Any]) -> dict[str, Any]:
    """Fill in the schema's defaults in place (what the API server does from the CRD on a cluster)."""
    spec = job.get("spec")
    if not isinstance(spec, dict):
        return job  # validate() names the problem
    for key, value in DEFAULTS.items():
        if isinstance(value, dict):
            target = spec.setdefault(key, {})
            if isinstance(target, dict):
                for sub, default in value.items():
                    target.setdefault(sub, default)
        else:
            spec.setdefault(key, value)
    for key, defaults in (("mmar", MMAR_DEFAULTS), ("data", DATA_DEFAULTS)):
        if isinstance(spec.get(key), dict):
            for sub, default in defaults.items():
                spec[key].setdefault(sub, default)
    for step in spec.get("steps") or []:
        if isinstance(step, dict):
            for sub, default in STEP_DEFAULTS.items():
                step.setdefault(sub, default)
            if isinstance(step.get("type"), str):
                step.setdefault("name", step["type"])
    return job


# ---------------------------------------------------------------------------------------------- checks


def _fail(field: str, message: str) -> None:
    raise MMARError(f"{field}: {message}")


def _check_int(value: Any, field: str, minimum: int | None = None, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        _fail(field, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        _fail(field, f"must be <= {maximum}, got {value}")


def _check_str(value: Any, field: str, choices: tuple[str, ...] | None = None) -> None:
    if not isinstance(value, str) or not value:
        _fail(field, f"must be a non-empty string, got {value!r}")
    if choices is not None and value not in choices:
        _fail(field, f"must be one of {', '.join(choices)}; got {value!r}")


def _check_length(value: str, field: str, maximum: int) -> None:
    if len(value) > maximum:
        _fail(field, f"must be at most {maximum} characters, got {len(value)}")


def _check_relative(value: Any, field: str, allow_empty: bool = False) -> None:
    """A path relative to a claim's root that cannot escape it (no absolute path, no `..`)."""
    if not isinstance(value, str) or (not value and not allow_empty):
        _fail(field, f"must be a relative path, got {value!r}")
    _check_length(value, field, PATH_MAX)
    if value.startswith("/") or ".." in PurePosixPath(value).parts or "\\" in value:
        _fail(field, f"must be a path relative to the claim's root without '..', got {value!r}")


def _check_quantity(value: Any, field: str) -> None:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and QUANTITY_RE.match(value))):
        _fail(field, f"must be a Kubernetes quantity such as 2Gi or 500m, got {value!r}")


def _check_resources(value: Any, field: str) -> None:
    if not isinstance(value, dict):
        _fail(field, "must be a mapping with `requests` and/or `limits`")
    for key, amounts in value.items():
        if key not in ("requests", "limits"):
            _fail(f"{field}.{key}", "unknown field (expected requests or limits)")
        if not isinstance(amounts, dict):
            _fail(f"{field}.{key}", "must be a mapping of resource name to quantity")
        for name, amount in amounts.items():
            _check_quantity(amount, f"{field}.{key}.{name}")


def _check_claim(value: Any, field: str, defaults: dict[str, Any]) -> None:
    if not isinstance(value, dict):
        _fail(field, "is required: a mapping with claimName (a PersistentVolumeClaim) and path")
    known = {"claimName", *defaults}
    for key in value:
        if key not in known:
            _fail(f"{field}.{key}", f"unknown field (expected one of {', '.join(sorted(known))})")
    _check_str(value.get("claimName"), f"{field}.claimName")
    if not CLAIM_RE.match(value["claimName"]) or len(value["claimName"]) > K8S_NAME_MAX:
        _fail(f"{field}.claimName", f"must be a valid PersistentVolumeClaim name, got {value['claimName']!r}")


def _check_pull_secrets(value: Any, field: str) -> None:
    if not isinstance(value, list) or len(value) > PULL_SECRETS_MAX:
        _fail(field, f"must be a list of at most {PULL_SECRETS_MAX} mappings with a name")
    for index, secret in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(secret, dict):
            _fail(where, "must be a mapping with a name")
        for key in secret:
            if key != "name":
                _fail(f"{where}.{key}", "unknown field (expected name)")
        if not isinstance(secret.get("name"), str):
            _fail(f"{where}.name", "is required: the name of a Secret")
        _check_length(secret["name"], f"{where}.name", K8S_NAME_MAX)


def _check_tolerations(value: Any, field: str) -> None:
    if not isinstance(value, list) or len(value) > TOLERATIONS_MAX:
        _fail(field, f"must be a list of at most {TOLERATIONS_MAX} tolerations")
    for index, toleration in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(toleration, dict):
            _fail(where, "must be a mapping (key, operator, value, effect, tolerationSeconds)")
        for key, item in toleration.items():
            if key not in TOLERATION_FIELDS:
                _fail(f"{where}.{key}", f"unknown field (expected one of {', '.join(TOLERATION_FIELDS)})")
            if TOLERATION_FIELDS[key] is int:
                _check_int(item, f"{where}.{key}")
            elif not isinstance(item, str):
                _fail(f"{where}.{key}", f"must be a string, got {item!r}")
        if "operator" in toleration:
            _check_str(toleration["operator"], f"{where}.operator", TOLERATION_OPERATORS)
        if "effect" in toleration:
            _check_str(toleration["effect"], f"{where}.effect", TOLERATION_EFFECTS)


def _check_node_selector(selector: Any, where: str) -> None:
    """Node labels as the Job's pod template takes them (else the Job create fails with 422)."""
    if not isinstance(selector, dict):
        _fail(where, "must be a mapping of label key to string value")
    if len(selector) > NODE_SELECTOR_MAX:
        _fail(where, f"at most {NODE_SELECTOR_MAX} labels, got {len(selector)}")
    for key, value in selector.items():
        if not isinstance(key, str) or len(key) > LABEL_KEY_MAX or not LABEL_KEY_RE.match(key):
            _fail(where, f"keys must be label keys: an optional DNS subdomain and '/', then a name of at most 63 letters, "
                         f"digits, '-', '_' or '.', starting and ending with a letter or digit; got {key!r}")
        if not isinstance(value, str):
            _fail(f"{where}.{key}", f"must be a string, got {value!r}")
        if len(value) > LABEL_VALUE_MAX or not LABEL_VALUE_RE.match(value):
            _fail(f"{where}.{key}", f"must be a label value: at most {LABEL_VALUE_MAX} letters, digits, '-', '_' or '.', "
                                    f"starting and ending with a letter or digit; got {value!r}")


def validate(job: dict[str, Any]) -> None:
    """Raise MMARError naming the first field at fault; `job` must have had its defaults applied."""
    if not isinstance(job, dict):
        _fail("manifest", "must be a mapping")
    if job.get("apiVersion") != API_VERSION:
        _fail("apiVersion", f"must be {API_VERSION}, got {job.get('apiVersion')!r}")
    if job.get("kind") != KIND:
        _fail("kind", f"must be {KIND}, got {job.get('kind')!r}")
    meta = job.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        _fail("metadata.name", "is required")
    if not NAME_RE.match(meta["name"]) or len(meta["name"]) > JOB_NAME_MAX:
        _fail("metadata.name", f"must be a lower-case DNS label starting with a letter, at most {JOB_NAME_MAX} characters; got {meta['name']!r}")
    spec = job.get("spec")
    if not isinstance(spec, dict):
        _fail("spec", "is required")

    known = {"image", "imagePullPolicy", "imagePullSecrets", "serviceAccountName", "task", "mmar", "data",
             "gpusPerNode", "resources", "shmSize", "nodeSelector", "tolerations", "steps", "runPolicy"}
    for key in spec:
        if key not in known:
            _fail(f"spec.{key}", "unknown field")
    if "image" in spec:
        _check_str(spec["image"], "spec.image")
        _check_length(spec["image"], "spec.image", IMAGE_MAX)
    if "serviceAccountName" in spec:
        if not isinstance(spec["serviceAccountName"], str):
            _fail("spec.serviceAccountName", f"must be a string, got {spec['serviceAccountName']!r}")
        _check_length(spec["serviceAccountName"], "spec.serviceAccountName", K8S_NAME_MAX)
        if not CLAIM_RE.match(spec["serviceAccountName"]):
            _fail("spec.serviceAccountName", f"must be a ServiceAccount name (a lower-case DNS-1123 subdomain), got {spec['serviceAccountName']!r}")
    _check_str(spec["imagePullPolicy"], "spec.imagePullPolicy", PULL_POLICIES)
    if "task" in spec:
        _check_str(spec["task"], "spec.task", TASKS)
    _check_claim(spec.get("mmar"), "spec.mmar", MMAR_DEFAULTS)
    _check_relative(spec["mmar"]["path"], "spec.mmar.path")
    _check_claim(spec.get("data"), "spec.data", DATA_DEFAULTS)
    _check_relative(spec["data"]["path"], "spec.data.path", allow_empty=True)
    _check_relative(spec["data"]["datalist"], "spec.data.datalist")
    if not isinstance(spec["data"]["readOnly"], bool):
        _fail("spec.data.readOnly", "must be true or false")
    _check_int(spec["gpusPerNode"], "spec.gpusPerNode", 0, 16)
    _check_quantity(spec["shmSize"], "spec.shmSize")
    if "resources" in spec:
        _check_resources(spec["resources"], "spec.resources")
    if "nodeSelector" in spec:
        _check_node_selector(spec["nodeSelector"], "spec.nodeSelector")
    if "tolerations" in spec:
        _check_tolerations(spec["tolerations"], "spec.tolerations")
    if "imagePullSecrets" in spec:
        _check_pull_secrets(spec["imagePullSecrets"], "spec.imagePullSecrets")

    policy = spec["runPolicy"]
    if not isinstance(policy, dict):
        _fail("spec.runPolicy", "must be a mapping")
    for key in policy:
        if key not in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "suspend", "pendingTimeoutSeconds"):
            _fail(f"spec.runPolicy.{key}", "unknown field")
    _check_int(policy["backoffLimit"], "spec.runPolicy.backoffLimit", 0, 100)
    if "activeDeadlineSeconds" in policy:
        _check_int(policy["activeDeadlineSeconds"], "spec.runPolicy.activeDeadlineSeconds", 1)
    if "ttlSecondsAfterFinished" in policy:
        _check_int(policy["ttlSecondsAfterFinished"], "spec.runPolicy.ttlSecondsAfterFinished", 0)
    if "pendingTimeoutSeconds" in policy:  # the operator's: how long a step's pod may fail to start
        _check_int(policy["pendingTimeoutSeconds"], "spec.runPolicy.pendingTimeoutSeconds", 1)
    if not isinstance(policy["suspend"], bool):
        _fail("spec.runPolicy.suspend", "must be true or false")

    steps = spec.get("steps")
    if not isinstance(steps, list) or not steps:
        _fail("spec.steps", f"must list at least one step ({', '.join(STEP_TYPES)})")
    if len(steps) > 16:
        _fail("spec.steps", "at most 16 steps")
    seen: set[str] = set()
    for index, step in enumerate(steps):
        _validate_step(step, f"spec.steps[{index}]")
        if step["name"] in seen:
            _fail(f"spec.steps[{index}].name", f"{step['name']!r} is used by an earlier step; step names must be unique")
        seen.add(step["name"])
    writer = next((s for s in steps if s["type"] in DATA_WRITING_TYPES), None)
    if spec["data"]["readOnly"] and writer is not None:
        _fail("spec.data.readOnly", f"a {writer['type']} step writes into the data claim; it cannot be mounted read-only")


def _check_dicomweb(value: Any, field: str) -> None:
    if not isinstance(value, dict):
        _fail(field, "must be a mapping with url (and credentialsSecret)")
    for key in value:
        if key not in DICOMWEB_FIELDS:
            _fail(f"{field}.{key}", f"unknown field (allowed: {', '.join(DICOMWEB_FIELDS)})")
    url = value.get("url")
    if not isinstance(url, str):
        _fail(f"{field}.url", "is required: the DICOMweb service root, e.g. http://orthanc:8042/dicom-web")
    _check_length(url, f"{field}.url", PATH_MAX)
    if not URL_RE.match(url):
        hint = ("credentials never go in the URL: put them in a Secret and name it in credentialsSecret"
                if "@" in url.split("//", 1)[-1].split("/", 1)[0] else "must be an http:// or https:// URL without query or fragment")
        _fail(f"{field}.url", f"{hint}; got {_redact_url(url)!r}")
    if "credentialsSecret" in value:
        secret = value["credentialsSecret"]
        if not (isinstance(secret, str) and CLAIM_RE.match(secret) and len(secret) <= K8S_NAME_MAX):
            _fail(f"{field}.credentialsSecret", f"must be the name of a Secret in the MMARJob's namespace (a DNS subdomain); got {secret!r}")


def _redact_url(url: str) -> str:
    """A URL fit for an error message: any userinfo replaced, so a password typed into a spec is never echoed."""
    scheme, sep, rest = url.partition("//")
    host, slash, path = rest.partition("/")
    if "@" in host:
        host = "***@" + host.rsplit("@", 1)[1]
    return f"{scheme}{sep}{host}{slash}{path}"


def _check_query(value: Any, field: str) -> None:
    if not isinstance(value, dict) or not value:
        _fail(field, f"must be a mapping with at least one of {', '.join(QUERY_FIELDS)}")
    for key in value:
        if key not in QUERY_FIELDS:
            _fail(f"{field}.{key}", f"unknown field (allowed: {', '.join(QUERY_FIELDS)})")
    if "studyInstanceUIDs" in value:
        uids = value["studyInstanceUIDs"]
        if not isinstance(uids, list) or not 1 <= len(uids) <= UIDS_MAX:
            _fail(f"{field}.studyInstanceUIDs", f"must be a list of 1 to {UIDS_MAX} StudyInstanceUIDs")
        for i, uid in enumerate(uids):
            if not (isinstance(uid, str) and UID_RE.match(uid) and len(uid) <= UID_MAX):
                _fail(f"{field}.studyInstanceUIDs[{i}]", f"must be a DICOM UID (digits and dots, at most {UID_MAX} characters); got {uid!r}")
        if len(set(uids)) != len(uids):
            _fail(f"{field}.studyInstanceUIDs", "lists a UID twice")
    if "modality" in value and not (isinstance(value["modality"], str) and MODALITY_RE.match(value["modality"])):
        _fail(f"{field}.modality", f"must be a DICOM modality code such as CT or MR; got {value['modality']!r}")
    if "studyDate" in value:
        date = value["studyDate"]
        if not (isinstance(date, str) and DATE_RANGE_RE.match(date)):
            _fail(f"{field}.studyDate", f"must be YYYYMMDD or a range YYYYMMDD-YYYYMMDD; got {date!r}")
        first, _, last = date.partition("-")
        if last and last < first:
            _fail(f"{field}.studyDate", f"the range ends before it starts: {date!r}")
    for key in ("accessionNumber", "seriesDescription"):
        if key in value:
            text = value[key]
            if not (isinstance(text, str) and text.strip() and "\\" not in text):
                _fail(f"{field}.{key}", f"must be a non-empty string without backslashes; got {text!r}")
            _check_length(text, f"{field}.{key}", QUERY_TEXT_MAX)


def _check_gate(value: Any, field: str) -> None:
    if not isinstance(value, dict):
        _fail(field, "must be a mapping such as {metric: val_mean_dice, atLeast: 0.85}")
    for key in value:
        if key not in ("metric", *GATE_BOUNDS, "bound"):
            _fail(f"{field}.{key}", "unknown field (allowed: metric, atLeast, atMost, bound)")
    if "bound" in value and value["bound"] not in GATE_INTERVAL_ENDS:
        _fail(f"{field}.bound", f"must be one of {', '.join(GATE_INTERVAL_ENDS)} (an end of the metric's 95 % interval); "
                                f"got {value['bound']!r}")
    metric = value.get("metric")
    if not (isinstance(metric, str) and GATE_METRIC_RE.match(metric) and len(metric) <= KEY_MAX):
        _fail(f"{field}.metric", f"is required: the name of a metric in the MMAR's eval/metrics.json, such as val_mean_dice; got {metric!r}")
    bounds = [key for key in GATE_BOUNDS if key in value]
    if len(bounds) != 1:
        _fail(field, "needs exactly one of atLeast, atMost")
    bound = value[bounds[0]]
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or bound != bound or bound in (float("inf"), float("-inf")):
        _fail(f"{field}.{bounds[0]}", f"must be a number; got {bound!r}")


def _validate_step(step: Any, field: str) -> None:
    if not isinstance(step, dict):
        _fail(field, "must be a mapping")
    _check_str(step.get("type"), f"{field}.type", STEP_TYPES)
    kind = step["type"]
    allowed = COMMON_STEP_FIELDS | STEP_FIELDS[kind]
    for key in step:
        if key not in allowed:
            owners = [t for t, fields in STEP_FIELDS.items() if key in fields]
            hint = f"only for {', '.join(owners)} steps" if owners else "unknown field"
            _fail(f"{field}.{key}", f"not allowed in a {kind} step ({hint})")
    name = step["name"]
    if not isinstance(name, str) or not NAME_RE.match(name) or len(name) > STEP_NAME_MAX:
        _fail(f"{field}.name", f"must be a lower-case DNS label starting with a letter, at most {STEP_NAME_MAX} characters; got {name!r}")
    _check_int(step["nodes"], f"{field}.nodes", 1, 64)
    if step["nodes"] > 1 and kind not in TRAINING_TYPES:
        _fail(f"{field}.nodes", f"only train and finetune steps may run on several nodes, not {kind}")
    if "gpusPerNode" in step:
        _check_int(step["gpusPerNode"], f"{field}.gpusPerNode", 0, 16)
    if "resources" in step:
        _check_resources(step["resources"], f"{field}.resources")
    if kind == "convert":
        for key in ("input", "output"):
            if key not in step:
                _fail(f"{field}.{key}", "is required for a convert step (a folder relative to the data path)")
            _check_relative(step[key], f"{field}.{key}")
        if "resolution" in step:
            res = step["resolution"]
            if not (isinstance(res, list) and len(res) in (1, 3) and all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in res)):
                _fail(f"{field}.resolution", f"must be a list of 1 or 3 positive numbers (mm), got {res!r}")
        for key in ("inputExt", "outputExt"):
            if key in step and not (isinstance(step[key], str) and EXT_RE.match(step[key]) and len(step[key]) <= EXT_MAX):
                _fail(f"{field}.{key}", f"must be a file extension such as .dcm or .nii.gz, got {step[key]!r}")
        for key in ("force", "labels"):
            if key in step and not isinstance(step[key], bool):
                _fail(f"{field}.{key}", "must be true or false")
    if kind == "pull":
        for key in ("dicomweb", "query", "output"):
            if key not in step:
                _fail(f"{field}.{key}", {"dicomweb": "is required for a pull step (url, credentialsSecret)",
                                         "query": "is required for a pull step (studyInstanceUIDs, or attributes such as modality, studyDate)",
                                         "output": "is required for a pull step (the NIfTI folder, relative to the data path)"}[key])
        _check_query(step["query"], f"{field}.query")
        _check_relative(step["output"], f"{field}.output")
        for key in ("dicomOutput", "labelsFrom"):
            if key in step:
                _check_relative(step[key], f"{field}.{key}")
    if kind == "push" and "dicomweb" not in step:
        _fail(f"{field}.dicomweb", "is required for a push step (url, credentialsSecret)")
    if "dicomweb" in step:
        _check_dicomweb(step["dicomweb"], f"{field}.dicomweb")
    if "dicomSeg" in step and not isinstance(step["dicomSeg"], bool):
        _fail(f"{field}.dicomSeg", "must be true or false")
    if "gate" in step:
        _check_gate(step["gate"], f"{field}.gate")
    if "set" in step:
        overrides = step["set"]
        if not isinstance(overrides, dict) or not all(isinstance(k, str) and k and "=" not in k for k in overrides):
            _fail(f"{field}.set", "must be a mapping of config or environment key to value, e.g. {epochs: 5}")
        if len(overrides) > SET_MAX:
            _fail(f"{field}.set", f"at most {SET_MAX} overrides, got {len(overrides)}")
        # checked as the step's `--set` will read them, now rather than when the step starts after the others
        from mmar.archive import check_set_item  # stdlib-only at import, as this module

        for key, value in overrides.items():
            check_set_item(f"{key}={_value(value)}", f"{field}.set.{key}")
    if "ckpt" in step:
        _check_relative(step["ckpt"], f"{field}.ckpt")
    if "model" in step:
        _check_str(step["model"], f"{field}.model", MODEL_KINDS)
    if "key" in step:
        _check_str(step["key"], f"{field}.key")
        _check_length(step["key"], f"{field}.key", KEY_MAX)
    if "formats" in step:
        formats = step["formats"]
        if not isinstance(formats, list) or not formats or any(f not in EXPORT_FORMATS for f in formats) or len(set(formats)) != len(formats):
            _fail(f"{field}.formats", f"must be a non-empty list without repeats drawn from {', '.join(EXPORT_FORMATS)}; got {formats!r}")
    if "precision" in step:
        _check_str(step["precision"], f"{field}.precision", PRECISIONS)
    if "inputShape" in step:
        shape = step["inputShape"]
        if not (isinstance(shape, list) and 3 <= len(shape) <= 5 and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
            _fail(f"{field}.inputShape", f"must be 3 to 5 positive integers such as [1, 1, 96, 96, 96], got {shape!r}")


# ------------------------------------------------------------------------------------------ accessors


def name_of(job: Mapping[str, Any]) -> str:
    return job["metadata"]["name"]


def steps_of(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    return job["spec"]["steps"]


def mmar_dir(job: Mapping[str, Any]) -> str:
    """The MMAR folder as the pod sees it."""
    return _join(WORKSPACE_ROOT, job["spec"]["mmar"]["path"])


def data_dir(job: Mapping[str, Any]) -> str:
    """The data root (datalist paths and convert folders are relative to it) as the pod sees it."""
    return _join(DATA_ROOT, job["spec"]["data"]["path"])


def datalist_path(job: Mapping[str, Any]) -> str:
    return _join(data_dir(job), job["spec"]["data"]["datalist"])


def gpus_of(job: Mapping[str, Any], index: int) -> int:
    """GPUs per node for a step: its own value, else the job's; pull, convert and push never ask for a GPU by
    default (they move and convert files)."""
    step = steps_of(job)[index]
    if "gpusPerNode" in step:
        return step["gpusPerNode"]
    return 0 if step["type"] in CPU_TYPES else job["spec"]["gpusPerNode"]


def resources_of(job: Mapping[str, Any], index: int) -> dict[str, Any]:
    step = steps_of(job)[index]
    return copy.deepcopy(step.get("resources", job["spec"].get("resources", {})))


def uses_mmar(step: Mapping[str, Any]) -> bool:
    return step["type"] in MMAR_TYPES


def _join(root: str, relative: str) -> str:
    return str(PurePosixPath(root) / relative) if relative else root


def _value(value: Any) -> str:
    """A `--set` value as text: strings as they are, everything else as JSON (true, 0.001, [96, 96, 96])."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


# ------------------------------------------------------------------------------------------------ argv


def init_argv(job: Mapping[str, Any], index: int) -> list[str] | None:
    """`mmar init ... --exist-ok` to run before step `index`, or None.

    Only when `spec.task` asks for scaffolding, and only before the first step that uses the MMAR: an
    existing MMAR is left untouched, so re-running a job never overwrites a tuned config.
    """
    task = job["spec"].get("task")
    steps = steps_of(job)
    first = next((i for i, s in enumerate(steps) if uses_mmar(s)), None)
    if task is None or first != index:
        return None
    return ["mmar", "init", mmar_dir(job), "--task", task, "--datalist", datalist_path(job), "--exist-ok"]


def step_argv(job: Mapping[str, Any], index: int) -> list[str]:
    """The runtime argv of step `index` (paths as the pod sees them).

    Training on several GPUs or nodes is wrapped in torchrun; on several nodes the node rank and master
    address are Kubernetes `$(VAR)` references to the PET_* variables the operator sets in each pod (the
    convention of Kubeflow's PyTorchJob/TrainJob), expanded by the kubelet.
    """
    argv = _step_argv(job, index)
    gate = steps_of(job)[index].get("gate")
    if gate:  # a global option of the runtime CLI, before the command: `mmar --gate METRIC>=X infer ...`
        argv = [argv[0], "--gate", gate_text(gate), *argv[1:]]
    return argv


def _step_argv(job: Mapping[str, Any], index: int) -> list[str]:
    step = steps_of(job)[index]
    kind = step["type"]
    root = mmar_dir(job)
    if kind == "pull":
        data = data_dir(job)
        argv = ["mmar", "pull", "--url", step["dicomweb"]["url"],
                "--dicom-dir", _join(data, step.get("dicomOutput", DEFAULT_DICOM_OUTPUT)),
                "--output", _join(data, step["output"]), "--datalist", datalist_path(job)]
        if "key" in step:
            argv += ["--key", step["key"]]
        if "labelsFrom" in step:
            argv += ["--labels", _join(data, step["labelsFrom"])]
        query = step["query"]
        for uid in query.get("studyInstanceUIDs", []):
            argv += ["--study-uid", uid]
        for key, flag in (("modality", "--modality"), ("studyDate", "--study-date"), ("accessionNumber", "--accession"),
                          ("seriesDescription", "--series-description")):
            if key in query:
                argv += [flag, query[key]]
        return argv
    if kind == "push":
        return ["mmar", "push", root, "--url", step["dicomweb"]["url"]]
    if kind == "convert":
        argv = ["mmar", "convert", "-d", _join(data_dir(job), step["input"]), "-o", _join(data_dir(job), step["output"])]
        if "resolution" in step:
            argv += ["-r", *(_value(r) for r in step["resolution"])]
        if "inputExt" in step:
            argv += ["-s", step["inputExt"]]
        if "outputExt" in step:
            argv += ["-e", step["outputExt"]]
        if step.get("force"):
            argv.append("-f")
        if step.get("labels"):
            argv.append("-l")
        return argv
    if kind == "export":
        argv = ["mmar", "export", root]
        if "ckpt" in step:
            argv += ["--ckpt", _join(root, step["ckpt"])]
        if "formats" in step:
            argv += ["--formats", ",".join(step["formats"])]
        if "precision" in step:
            argv += ["--precision", step["precision"]]
        if "inputShape" in step:
            argv += ["--input-shape", ",".join(str(s) for s in step["inputShape"])]
        return argv

    command = "train" if kind in TRAINING_TYPES else kind
    argv = [command, root]
    if kind == "finetune":
        argv.append("--finetune")
    if "ckpt" in step:
        argv += ["--ckpt", _join(root, step["ckpt"])]
    if "model" in step:
        argv += ["--model", step["model"]]
    if "key" in step:
        argv += ["--key", step["key"]]
    if step.get("dicomSeg"):
        argv.append("--dicom-seg")
    # The manifest says where the data is, whatever the MMAR's environment.json was scaffolded with;
    # the step's own overrides come after so they win.
    overrides = {"DATASET_JSON": datalist_path(job), **step.get("set", {})}
    argv += ["--set", *(f"{k}={_value(v)}" for k, v in overrides.items())]
    argv += ["--file_root", data_dir(job)]

    nodes, gpus = step["nodes"], gpus_of(job, index)
    if kind in TRAINING_TYPES and nodes > 1:
        return ["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={max(gpus, 1)}",
                "--node_rank=$(PET_NODE_RANK)", "--master_addr=$(PET_MASTER_ADDR)",
                "--master_port=$(PET_MASTER_PORT)", "-m", "mmar", *argv]
    if kind in TRAINING_TYPES and gpus > 1:
        return ["torchrun", "--standalone", "--nnodes=1", f"--nproc_per_node={gpus}", "-m", "mmar", *argv]
    return ["mmar", *argv]


def credentials_secret(job: Mapping[str, Any], index: int) -> str | None:
    """The Secret whose keys (CREDENTIAL_ENV) become the step's DICOMweb credentials, or None."""
    return (steps_of(job)[index].get("dicomweb") or {}).get("credentialsSecret")


# ------------------------------------------------------------------------------------------------ gate
#
# `gate: {metric: val_mean_dice, atLeast: 0.85}` on an infer, export or push step: the step runs only if the
# MMAR's last validation (its eval/metrics.json) reaches the threshold. The runtime decides, in the step's own
# pod or process (`mmar --gate 'val_mean_dice>=0.85' infer ...`), because only it can read the MMAR's files;
# below the threshold it writes a skip as its result and exits 0. The operator and `mmar run` read that
# result the same way (`skipped_by_gate`): the step and every later one are Skipped, the job Succeeded with
# reason GateNotMet: a gated push never sends what a later or earlier step should not have made.


def gate_text(gate: Mapping[str, Any]) -> str:
    """The gate as the runtime's `--gate` value: `val_mean_dice>=0.85` / `val_loss<=0.2`, with `bound: lower`
    `val_mean_dice.lower>=0.85` (the runtime's name for an end of the interval: mmar.gate)."""
    (bound,) = [key for key in GATE_BOUNDS if key in gate]
    metric = f"{gate['metric']}.{gate['bound']}" if gate.get("bound") else gate["metric"]
    return f"{metric}{GATE_BOUNDS[bound]}{_value(gate[bound])}"


def parse_gate_text(text: str) -> dict[str, Any]:
    """`--gate` text back into the spec's mapping; MMARError naming `--gate` when it is not one."""
    for bound, operator in GATE_BOUNDS.items():
        metric, sep, number = text.partition(operator)
        if sep:
            try:
                value = float(number)
            except ValueError:
                break
            gate = {"metric": metric.strip(), bound: int(value) if value.is_integer() and "." not in number else value}
            try:
                _check_gate(gate, "--gate")
            except MMARError:
                break
            return gate
    raise MMARError(f"--gate: expected METRIC>=NUMBER or METRIC<=NUMBER, quoted (e.g. --gate 'val_mean_dice>=0.85': "
                    f"unquoted, the shell reads > as a redirect), got {text!r}")


def gate_decision(gate: Mapping[str, Any], metrics: Mapping[str, Any] | None, source: str = "eval/metrics.json",
                  stale: str | None = None) -> dict[str, Any]:
    """Whether `metrics` (the MMAR's last validation, or None when there is none) let a gated step run.

    Returns the record kept in the step's result and the job's `status.results.gate`: metric, the bound,
    value (None when missing or not a number), passed, and a message that says why. `stale` says why the
    validation no longer speaks for the model (it was retrained since): then the gate does not pass.
    Pure: the one rule every caller uses.
    """
    (bound,) = [key for key in GATE_BOUNDS if key in gate]
    metric, threshold = gate["metric"], gate[bound]
    record: dict[str, Any] = {"metric": metric, bound: threshold, "value": None, "passed": False}
    wanted = f"{GATE_BOUNDS[bound]} {_value(threshold)}"
    if metrics is None:
        record["message"] = f"no validation result ({source} is missing): run a validate step first; {metric} {wanted} required"
        return record
    if metric not in metrics:
        known = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise MMARError(f"gate.metric: {metric!r} is not in {source} (its metrics: {', '.join(known) or 'none'})")
    value = metrics[metric]
    # NaN and +-Infinity (a bare `Infinity` in a hand-edited metrics.json) are undefined: never a pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        record["message"] = f"{metric} is undefined in {source} ({value!r}); {wanted} required"
        return record
    record["value"] = value
    passed = value >= threshold if bound == "atLeast" else value <= threshold
    relation = (">=" if passed else "<") if bound == "atLeast" else ("<=" if passed else ">")
    record["message"] = f"{metric} {value:.4g} {relation} {_value(threshold)} ({source})"
    if passed and stale:
        passed = False
        record["message"] += f", but {stale}"
    record["passed"] = passed
    return record


# ---------------------------------------------------------------------------------------------- results


def parse_result(message: str | None) -> dict[str, Any] | None:
    """A step's termination message as a dict, or None (none, or a crash's log tail): `mmar.results.decode`."""
    return results.decode(message)


def merge_results(summary: Mapping[str, Any], step_type: str, result: Mapping[str, Any] | None) -> dict[str, Any]:
    """The job's summary (`status.results`) with one succeeded step's result folded in: `mmar.results.fold`."""
    return results.fold(summary, step_type, result)
