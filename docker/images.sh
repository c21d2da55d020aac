#!/usr/bin/env bash
# Build both images (runtime, operator) tagged with the project version, then smoke-test them:
#   operator  runs as non-root, cannot import torch, renders examples/demo-job.yaml (--render)
#   runtime   runs as non-root, and runs examples/demo-job.yaml (DEMO_EPOCHS epochs) inside the
#             container against a host folder mounted at /out; every step must succeed, and the
#             results are checked from the host afterwards
# Both check their OCI labels' values (version, revision, base.name).
#
# `make images` runs this. Environment:
#   CONTAINER_ENGINE  docker or podman (default: docker when its daemon answers, else podman)
#   MMAR_VERSION      the tag and the version label (default: pyproject.toml's version)
#   RUNTIME_IMAGE, OPERATOR_IMAGE   repositories (default mmar, mmar-operator)
#   PYTHON_IMAGE      the base (default: the Dockerfile's, the official Python image)
#   IMAGE_BUILD_ARGS  more build options, split at spaces, e.g. "--build-arg TORCH_VARIANT=cpu"
#   IMAGES_TMP        where the demo's folder goes (default /var/tmp)
#   DEMO_EPOCHS, DEMO_CASES   the demo job's epochs (default 2) and generated cases (default 12)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '%s images: %s\n' "$(date -u +%T)" "$*" >&2; }
fail() { echo "images: FAILED: $*" >&2; exit 1; }

engine="${CONTAINER_ENGINE:-}"
if [[ -z "$engine" ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
  elif command -v podman >/dev/null; then engine=podman
  else fail "no container engine: install Docker, or podman (with buildah), or set CONTAINER_ENGINE"; fi
fi
case "$engine" in docker|podman) ;; *) fail "CONTAINER_ENGINE must be docker or podman, not '$engine'" ;; esac

version="${MMAR_VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)}"
[[ -n "$version" ]] || fail "pyproject.toml: no project version"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
runtime_tag="${RUNTIME_IMAGE:-mmar}:$version"
operator_tag="${OPERATOR_IMAGE:-mmar-operator}:$version"
base="${PYTHON_IMAGE:-$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)}"
read -r -a extra_args <<<"${IMAGE_BUILD_ARGS:-}"

# The labels that change from build to build, set again on top of the built image from a Containerfile
# that spells their values out. Buildah reuses a cached `LABEL ...="${REVISION}"` step when only the build
# argument's value changed (containers/buildah#5501), and drops `--label` for a `--target` that is not the
# last stage (buildah 1.28): a rebuild with unchanged files kept the previous commit's revision. A step
# with the values written out is keyed by them, with either engine. It adds no layer.
stamp() {  # TAG
  local folder
  folder="$(mktemp -d)"
  printf 'FROM %s\nLABEL "org.opencontainers.image.version"="%s" "org.opencontainers.image.revision"="%s" "org.opencontainers.image.created"="%s" "org.opencontainers.image.base.name"="%s"\n' \
    "$1" "$version" "$revision" "$created" "$base" >"$folder/Containerfile"
  "$engine" build -q -t "$1" -f "$folder/Containerfile" "$folder" >/dev/null || { rm -rf "$folder"; fail "labelling $1"; }
  rm -rf "$folder"
}

build() {  # TARGET TAG
  local args=(build --target "$1" -t "$2" --build-arg "VERSION=$version" --build-arg "REVISION=$revision"
              --build-arg "CREATED=$created" --build-arg "PYTHON_IMAGE=$base")
  # podman: keep intermediate layers as cache, and remove the containers of a failed step
  [[ "$engine" == podman ]] && args+=(--layers --force-rm)
  local start=$SECONDS
  log "$engine build --target $1 -t $2 ${extra_args[*]}"
  "$engine" "${args[@]}" "${extra_args[@]}" . || fail "building $2 (target $1)"
  stamp "$2"
  log "built $2 in $((SECONDS - start)) s, $(( $("$engine" image inspect --format '{{.Size}}' "$2") / 1000000 )) MB"
}

# Containers for checks: removed on exit, no network (nothing here may need one).
run() { "$engine" run --rm --network none "$@"; }
label() { "$engine" image inspect --format "{{ index .Config.Labels \"$2\" }}" "$1"; }

check_labels() {  # IMAGE
  local key want got
  for key in version revision base.name; do
    case "$key" in version) want="$version" ;; revision) want="$revision" ;; base.name) want="$base" ;; esac
    got="$(label "$1" "org.opencontainers.image.$key")"
    [[ -n "$got" && "$got" == "$want" ]] || fail "$1: label org.opencontainers.image.$key is '$got', not '$want'"
  done
}

check_non_root() {  # IMAGE
  local uid
  uid="$(run --entrypoint id "$1" -u)"
  [[ "$uid" == 1000 ]] || fail "$1 runs as uid $uid, not 1000"
}

smoke_operator() {
  log "smoke test $operator_tag"
  check_labels "$operator_tag"
  check_non_root "$operator_tag"
  run --entrypoint python "$operator_tag" -c \
    "import importlib.util as u, sys, mmar_operator; sys.exit(u.find_spec('torch') is not None)" \
    || fail "$operator_tag: torch is importable (or mmar_operator is not)"
  local rendered
  rendered="$(run -v "$PWD/examples:/examples:ro" "$operator_tag" --render /examples/demo-job.yaml)" \
    || fail "$operator_tag: --render examples/demo-job.yaml"
  grep -q '^kind: Job$' <<<"$rendered" || fail "$operator_tag: --render printed no Job"
  log "operator: uid 1000, no torch, --render: $(grep -c '^kind: Job$' <<<"$rendered") Jobs"
}

smoke_runtime() {
  log "smoke test $runtime_tag"
  check_labels "$runtime_tag"
  check_non_root "$runtime_tag"
  local variant
  variant="$(label "$runtime_tag" dev.mmar.torch-variant)"
  run --entrypoint python "$runtime_tag" -c \
    "import sys, torch, monai, onnxruntime; print('torch', torch.__version__, 'monai', monai.__version__); \
sys.exit(('+cpu' in torch.__version__) != ('$variant' == 'cpu'))" \
    || fail "$runtime_tag: torch/monai/onnxruntime do not import, or torch is not the $variant build"

  # The demo job as `make demo` runs it, inside the container: the claims map to folders under /out,
  # a host folder that the image's user (uid 1000) can write to.
  local epochs="${DEMO_EPOCHS:-2}" out start=$SECONDS
  mkdir -p "${IMAGES_TMP:-/var/tmp}"
  out="$(mktemp -d "${IMAGES_TMP:-/var/tmp}/mmar-image-demo.XXXXXX")"
  chmod 0777 "$out"
  run -v "$PWD/examples:/examples:ro" -v "$out:/out" --entrypoint python "$runtime_tag" -c "
import yaml
job = yaml.safe_load(open('/examples/demo-job.yaml'))
(train,) = [s for s in job['spec']['steps'] if s['type'] == 'train']
train.setdefault('set', {})['epochs'] = $epochs
yaml.safe_dump(job, open('/out/demo-job.yaml', 'w'), sort_keys=False)
" || fail "writing the $epochs-epoch copy of examples/demo-job.yaml"
  run -v "$out:/out" "$runtime_tag" demo-data /out/data --task segmentation --cases "${DEMO_CASES:-12}" --size 32 \
    --raw >/dev/null \
    || fail "$runtime_tag: mmar demo-data"
  run -v "$out:/out" "$runtime_tag" run /out/demo-job.yaml \
    --volume demo-data=/out/data --volume demo-workspace=/out/workspace \
    || fail "$runtime_tag: mmar run examples/demo-job.yaml ($epochs epochs); output in $out"

  # From the host: the status says every step succeeded, and the results are there and readable.
  python3 - "$out/workspace" <<'PY' || fail "demo results in $out"
import json, sys
from pathlib import Path
workspace = Path(sys.argv[1])
status = json.loads((workspace / "demo.status.json").read_text())
phases = {s["name"]: s["phase"] for s in status["steps"]}
assert status["phase"] == "Succeeded" and set(phases.values()) == {"Succeeded"}, phases
mmar = workspace / "seg-demo"
for name in ("models/model.ckpt", "models/model.ts", "models/model.onnx", "eval/metrics.json"):
    assert (mmar / name).stat().st_size > 0, name
metrics = json.loads((mmar / "eval" / "metrics.json").read_text())
print(f"demo job: {len(phases)} of {len(phases)} steps succeeded; eval/metrics.json: {sorted(metrics)[:4]}")
PY
  log "runtime: uid 1000, torch $variant, demo job ($epochs epochs) in $((SECONDS - start)) s; results in $out"
}

start=$SECONDS
build operator "$operator_tag"
build runtime "$runtime_tag"
smoke_operator
smoke_runtime
log "done in $((SECONDS - start)) s: $runtime_tag, $operator_tag"
