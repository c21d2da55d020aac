# mmar: the two commands of the README, and the pieces they are made of.
#   make demo   set everything up, then convert -> train -> validate -> infer -> export on generated data
#   make test   set everything up, then run the test suite (what CI runs)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MMAR := $(VENV)/bin/mmar
STAMP := $(VENV)/.installed-stamp
DEMO ?= demo
DEMO_EPOCHS ?= 30
PYTEST_ARGS ?=

.PHONY: install demo test test-all clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on disk here (a CUDA build on GPU machines); nothing else may pull another
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[runtime,operator,test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	rm -rf $(DEMO)
	$(MMAR) demo-data $(DEMO)/data --task segmentation --cases 24 --size 32
	$(MMAR) init $(DEMO)/mmar --task segmentation --datalist $(DEMO)/data/datalist.json --epochs $(DEMO_EPOCHS)
	$(DEMO)/mmar/commands/train.sh
	$(DEMO)/mmar/commands/validate.sh
	$(DEMO)/mmar/commands/infer.sh
	@echo
	@echo "results:"
	@echo "  best model        $(DEMO)/mmar/models/model.ckpt (final: model_final.ckpt)"
	@echo "  training curves   $(DEMO)/mmar/models/training_curves.png (TensorBoard: $(PY) -m tensorboard.main --logdir $(DEMO)/mmar/models)"
	@echo "  metrics           $(DEMO)/mmar/eval/metrics.json, per case: $(DEMO)/mmar/eval/cases.csv"
	@echo "  overlays          $(DEMO)/mmar/eval/overlays/"
	@echo "  predicted masks   $(DEMO)/mmar/eval/*_seg.nii.gz"

test: install
	$(PY) -m pytest -q -m "not slow and not e2e" $(PYTEST_ARGS) tests

test-all: install
	$(PY) -m pytest -q -m "not e2e" $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
