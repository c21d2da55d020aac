# mmar: the two commands of the README, and the pieces they are made of.
#   make demo   set everything up, then convert -> train -> validate -> infer -> export on generated data
#   make test   set everything up, then run the test suite (what CI runs)
#   make images build both container images and smoke-test them (docs/deploy.md, "Images")

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MMAR := $(VENV)/bin/mmar
STAMP := $(VENV)/.installed-stamp
DEMO ?= demo
DEMO_EPOCHS ?= 30
PYTEST_ARGS ?=

.PHONY: install tools demo test test-slow test-all test-e2e test-cluster images clean

$(STAMP): pyproject.toml docker/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on disk here (a CUDA build on GPU machines); nothing else may pull another
	$(PY) -m pip install -q torch==2.13.0
	# the exact versions the images ship (docker/constraints.txt), so that CI tests what is deployed
	$(PY) -m pip install -q -c docker/constraints.txt -e ".[runtime,operator,test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	rm -rf $(DEMO)
	$(MMAR) demo-data $(DEMO)/data --task segmentation --cases 24 --size 32 --raw
	# the same MMARJob manifest the operator runs on a cluster, run here: claims map to local folders
	$(MMAR) run examples/demo-job.yaml --volume demo-data=$(DEMO)/data --volume demo-workspace=$(DEMO)/workspace
	@echo
	@echo "results (MMAR: $(DEMO)/workspace/seg-demo):"
	@echo "  best model        $(DEMO)/workspace/seg-demo/models/model.ckpt (final: model_final.ckpt)"
	@echo "  training curves   $(DEMO)/workspace/seg-demo/models/training_curves.png (TensorBoard: $(PY) -m tensorboard.main --logdir $(DEMO)/workspace/seg-demo/models)"
	@echo "  metrics           $(DEMO)/workspace/seg-demo/eval/metrics.json, per case: eval/cases.csv, overlays: eval/overlays/"
	@echo "  predicted masks   $(DEMO)/workspace/seg-demo/eval/predictions/imagesTr/*_seg.nii.gz (each at its image's path relative to the data root)"
	@echo "  exported models   $(DEMO)/workspace/seg-demo/models/model.ts, model.onnx (export.json: parity vs PyTorch)"
	@echo "  job status        $(DEMO)/workspace/demo.status.json"

test: install
	$(PY) -m pytest -q -m "not slow and not e2e and not cluster" $(PYTEST_ARGS) tests

test-slow: install
	$(PY) -m pytest -q -m "slow and not e2e and not cluster" $(PYTEST_ARGS) tests

# against KUBECONFIG's cluster, or else a real control plane (etcd + kube-apiserver + controller-manager)
# started for the run and stopped afterwards: see docs/operator.md, "End-to-end tests"
test-e2e: install tools
	tests/e2e/with-cluster.sh $(PY) -m pytest -q -m e2e $(PYTEST_ARGS) tests/e2e

# MMARJobs in real pods: the chart's operator pod and the runtime image's containers on a real node, started
# here (control-plane up + node up, as root; the images of `make images` / .ci/images.sh loaded into it) and
# stopped afterwards, or KUBECONFIG's cluster (images MMAR_RUNTIME_IMAGE / MMAR_OPERATOR_IMAGE on its nodes).
# MMAR_CLUSTER_REQUIRED=1: a missing root, node or image fails instead of skipping. docs/deploy.md
test-cluster: install tools
	tests/cluster/with-node.sh $(PY) -m pytest -q -s -m cluster $(PYTEST_ARGS) tests/cluster

tools:
	bash .ci/tools.sh

# Container images, tagged with pyproject's version, built with Docker or else podman (CONTAINER_ENGINE),
# then smoke-tested (the demo job runs inside the runtime image). E.g. the CPU build without TensorRT:
#   make images IMAGE_BUILD_ARGS="--build-arg TORCH_VARIANT=cpu"
CONTAINER_ENGINE ?=
RUNTIME_IMAGE ?= mmar
OPERATOR_IMAGE ?= mmar-operator
PYTHON_IMAGE ?=
IMAGE_BUILD_ARGS ?=
IMAGES_TMP ?= /var/tmp

images:
	CONTAINER_ENGINE="$(CONTAINER_ENGINE)" RUNTIME_IMAGE="$(RUNTIME_IMAGE)" OPERATOR_IMAGE="$(OPERATOR_IMAGE)" \
	PYTHON_IMAGE="$(PYTHON_IMAGE)" IMAGE_BUILD_ARGS="$(IMAGE_BUILD_ARGS)" IMAGES_TMP="$(IMAGES_TMP)" \
	bash docker/images.sh

test-all: install
	$(PY) -m pytest -q -m "not e2e and not cluster" $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
