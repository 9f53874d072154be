# cifar-job: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/cifar-job
# The torch build to install. These pins are the tested ones; any newer release works too:
#   make install TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= runs/demo

.PHONY: help install demo test test-fast lint cluster cluster-stop clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## Create .venv with torch, the project and its test tools

demo: install ## Train, test, predict and plot on synthetic data, offline, on CPU (~1 min)
	rm -rf $(DEMO_DIR)
	$(CLI) train --dataset synthetic --synthetic-size 5000 --val-size 500 \
	  --arch resnet18 --stem imagenet --max-epochs 3 --batch-size 128 --lr 0.05 \
	  --num-workers 2 --run-dir $(DEMO_DIR)
	$(CLI) test --ckpt $(DEMO_DIR)/last.ckpt
	$(PY) -c "from cifar_job.data import CLASSES, make_synthetic; from PIL import Image; \
	  x, y = make_synthetic(1, seed=42, split='test'); \
	  Image.fromarray(x[0].permute(1, 2, 0).numpy()).save('$(DEMO_DIR)/sample.png'); \
	  print('sample.png is a', CLASSES[int(y[0])])"
	$(CLI) predict --ckpt $(DEMO_DIR)/last.ckpt $(DEMO_DIR)/sample.png
	$(CLI) plot $(DEMO_DIR)

test: install lint cluster ## Lint, start the test cluster, run the whole test suite
	$(PY) -m pytest

test-fast: install ## Only the tests that train nothing (seconds)
	$(PY) -m pytest -m "not slow"

lint: install ## ruff (lint, format) and shellcheck
	$(VENV)/bin/ruff check cifar_job tests bench
	$(VENV)/bin/ruff format --check cifar_job tests bench
	$(VENV)/bin/shellcheck -x slurm/*.sh tests/cluster/*.sh

cluster: ## Start the 2-node Slurm cluster the slurm tests use (needs root and apt)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then tests/cluster/start.sh; \
	else echo "cluster: needs root and apt-get; the slurm tests will be skipped"; fi

cluster-stop: ## Stop that cluster
	tests/cluster/stop.sh

clean: ## Remove the venv, caches and runs/
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
