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
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' cifar_job/__init__.py)
IMAGE ?= cifar-job
# make image WHEELS=1: build from ./wheels only (make wheels first), with no network.
WHEELS ?= 0
# The image's Python, for `make wheels`: 3.12 on the default CUDA base (Ubuntu 24.04).
WHEELS_PYTHON ?= 3.12
DOCKER_BUILD_ARGS ?=
# pip matches --platform tags exactly: every glibc from 2.5 to 2.39, plus the legacy names.
WHEEL_PLATFORMS := $(foreach n,$(shell seq 5 39),--platform manylinux_2_$(n)_x86_64) \
  $(foreach g,2014 2010 1,--platform manylinux$(g)_x86_64)

.PHONY: help install demo test docs docs-build docs-options test-fast test-containers test-containers-fresh wipe bench bench-smoke lint cluster cluster-stop dist wheels image clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

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
	$(PY) -c "from cifar_job.dataset import CLASSES, make_synthetic; from PIL import Image; \
	  x, y = make_synthetic(1, seed=42, split='test'); \
	  Image.fromarray(x[0].permute(1, 2, 0).numpy()).save('$(DEMO_DIR)/sample.png'); \
	  print('sample.png is a', CLASSES[int(y[0])])"
	$(CLI) predict --ckpt $(DEMO_DIR)/last.ckpt $(DEMO_DIR)/sample.png
	$(CLI) plot $(DEMO_DIR)

test: install lint docs-build cluster ## Lint, build the manual, start the test cluster, run the whole test suite
	$(PY) -m pytest

# Not --quiet: it hides the warnings that --strict counts, and a broken link then passes.
docs: install ## Serve the manual (docs/) on http://127.0.0.1:8000
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

docs-build: install ## Build the manual with mkdocs --strict: a broken link, anchor or page fails
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir $$(mktemp -d)

docs-options: install ## Rewrite the generated tables of docs/: options (TrainConfig), stop rules (stops.RULES)
	$(PY) -m cifar_job.config docs/options.md
	$(PY) -m cifar_job.stops docs/stops.md

test-fast: install ## Only the tests that train nothing (seconds)
	$(PY) -m pytest -m "not slow"

lint: install ## ruff (lint, format) and shellcheck
	$(VENV)/bin/ruff check cifar_job tests bench
	$(VENV)/bin/ruff format --check cifar_job tests bench
	$(VENV)/bin/shellcheck -x slurm/*.sh tests/cluster/*.sh tests/docker/*.sh .ci/run
	$(VENV)/bin/hadolint --config .hadolint.yaml docker/Dockerfile

test-containers: install cluster ## Build the image; run it in Docker, and in pyxis/enroot on the cluster (~10 min)
	$(PY) -m pytest -m container --run-containers -s

test-containers-fresh: wipe ## The same from nothing, as on a new machine: no images, caches or cluster state
	$(MAKE) test-containers

bench: install ## Every benchmark, one at a time; then fails naming each that failed (~20 min on 2 cores)
	$(PY) bench/run.py

bench-smoke: install ## Each benchmark in its quick mode: checks the scripts, not figures (~2 min)
	$(PY) bench/run.py --smoke --jobs 2

dist: install ## Build the project wheel and its requirements.txt (for the image: with the mlflow client) into dist/
	rm -rf dist && $(PY) -m pip wheel --quiet --no-deps --wheel-dir dist .
	$(PY) -c 'import sys, zipfile, email; w = zipfile.ZipFile(sys.argv[1]); \
	  meta = next(n for n in w.namelist() if n.endswith(".dist-info/METADATA")); \
	  deps = email.message_from_bytes(w.read(meta)).get_all("Requires-Dist"); \
	  print(*(d.split(";")[0] for d in deps if "extra ==" not in d or "extra == \"mlflow\"" in d), sep="\n")' dist/cifar_job-*.whl \
	  > dist/requirements.txt

wheels: dist ## Fill wheels/ with every wheel the image needs, for air-gapped builds
	mkdir -p wheels
	$(PY) -m pip download --quiet --dest wheels --only-binary=:all: \
	  --python-version $(WHEELS_PYTHON) $(WHEEL_PLATFORMS) \
	  $(TORCH_SPEC) -r dist/requirements.txt

image: dist ## Build the image cifar-job:<version> and cifar-job:latest
	mkdir -p wheels
	docker build -f docker/Dockerfile -t $(IMAGE):$(VERSION) -t $(IMAGE):latest \
	  --build-arg VERSION=$(VERSION) --build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
	  --build-arg WHEELS=$(WHEELS) $(DOCKER_BUILD_ARGS) .

cluster: ## Start the Slurm cluster the slurm tests use (2 nodes and a spare) (needs root and apt)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then tests/cluster/start.sh; \
	else echo "cluster: needs root and apt-get; the slurm tests will be skipped"; fi

cluster-stop: ## Stop that cluster
	tests/cluster/stop.sh

wipe: ## Stop the test cluster and Docker engine and delete their state, images and caches
	tests/cluster/wipe.sh

clean: ## Remove the venv, caches, runs/, dist/ and wheels/
	rm -rf $(VENV) runs dist wheels site .pytest_cache .ruff_cache *.egg-info
