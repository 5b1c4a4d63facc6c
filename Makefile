# nanoVLM-scale: every target depends on .venv, so on a fresh machine `make test` alone does all the set-up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= toolkit/configs/tiny.yaml
ARGS ?=
SRC ?=
OUT ?=
PYTEST_ARGS ?=

.PHONY: install test test-slow test-torch lint format demo shard-data train bench test-multinode docs clean

install: $(STAMP)

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
# lmms-eval (train.lmms_tasks and its tests) with --no-deps: its declared requirements pull torchvision for another
# torch and ~5 GB of CUDA wheels; what it really imports is setup.py's `lmms` extra, which dev includes
# (together about 100 MB and a minute on a 2-core machine).
$(STAMP): setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps lmms-eval==0.7.3
	touch $(STAMP)

# `slow` tests (long multi-rank runs) are left to `make test-slow`, which .ci/run runs after this.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# The suite under another torch, by default the GPU machines' 2.11 (its CUDA wheel imports and runs on a CPU-only
# host), in a venv of its own: run it before a GPU session, whose one call cannot afford an API that torch lacks.
# About 4 GB of wheels; not part of `make test`.
TORCH ?= 2.11.0
TVENV := .venv-torch-$(TORCH)
$(TVENV)/.installed: setup.py
	$(PY) -m venv $(TVENV)
	$(TVENV)/bin/pip install --quiet --upgrade pip
	$(TVENV)/bin/pip install --quiet torch==$(TORCH)
	$(TVENV)/bin/pip install --quiet -e '.[dev]'
	$(TVENV)/bin/pip install --quiet --no-deps lmms-eval==0.7.3
	touch $@

test-torch: $(TVENV)/.installed
	$(TVENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check toolkit tests
	$(BIN)/ruff format --check toolkit tests

format: $(STAMP)
	$(BIN)/ruff format toolkit tests
	$(BIN)/ruff check --fix toolkit tests

# Shapes-VQA end to end: synth data, train the tiny preset (CUDA when present), accuracy before/after.
demo: $(STAMP)
	$(BIN)/python -m toolkit.demo $(ARGS)

shard-data: $(STAMP)
	@test -n "$(SRC)" -a -n "$(OUT)" || { echo "usage: make shard-data SRC=<dataset> OUT=<folder> [ARGS=...]"; exit 2; }
	$(BIN)/python -m toolkit shard-data "$(SRC)" "$(OUT)" $(ARGS)

train: $(STAMP)
	$(BIN)/python -m toolkit train --config $(CONFIG) $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m toolkit bench packing
	$(BIN)/python -m toolkit bench pipeline
	$(BIN)/python -m toolkit bench pipeline --photos
	$(BIN)/python -m toolkit bench overhead
	$(BIN)/python -m toolkit bench overhead --backend ddp
	$(BIN)/python -m toolkit bench overhead --backend deepspeed
	$(BIN)/python -m toolkit bench overhead --backend fsdp
	$(BIN)/python -m toolkit bench comm
	$(BIN)/python -m toolkit bench memory
	$(BIN)/python -m toolkit bench balance
	$(BIN)/python -m toolkit bench shard-data
	$(BIN)/python -m toolkit bench checkpoint
	$(BIN)/python -m toolkit bench loss
	$(BIN)/python -m toolkit bench gpu

# Two hosts in network namespaces on this machine, `deepspeed --hostfile` across them (needs root).
test-multinode: $(STAMP)
	PYTHON=$(abspath $(BIN))/python bash launch/test_multinode.sh

docs: $(STAMP)
	$(BIN)/python -m toolkit.docs README.md

clean:
	rm -rf $(VENV) .venv-torch-* *.egg-info .pytest_cache .ruff_cache
