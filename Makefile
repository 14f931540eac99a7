# `make help` lists the targets. Everything runs from a virtual environment in .venv
# that `make setup` creates (idempotent: it reinstalls only when pyproject or the lock change).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; on a GPU machine: make setup TORCH=torch==2.13.0 TORCH_INDEX=<your CUDA wheel index>
TORCH ?= torch==2.13.0
export TORCH_INDEX

.PHONY: help setup services image run test test-unit test-integration test-gpu lint lock bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv and install flywheel with pinned dependencies

$(VENV)/.installed: pyproject.toml requirements.lock requirements-dev.lock
	python3 -m venv $(VENV)
	PYTHON=$(PY) TORCH_SPEC="$(TORCH)" containers/install.sh deps
	PYTHON=$(PY) containers/install.sh dev
	PYTHON=$(PY) containers/install.sh package -e ".[dev]"
	touch $@

run: setup  ## the retraining DAG on this machine (configs/local.yaml)
	$(VENV)/bin/flywheel run

# PostgreSQL's server binaries for the tests that run Optuna (and the pod-isolation test) on a
# real database; the fixtures start and stop their own cluster. Installed once, as root.
services:  ## install the test services' binaries (Debian's postgresql) when missing
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "note: postgresql is not installed; its tests will skip (apt-get install postgresql)"; fi; }

# The CPU component image, built with podman from a Debian base made here (no registry is
# reachable); the container test tier runs every pipeline task in it. Minutes the first time.
image:  ## build the CPU component image here (podman; installs podman, runc, debootstrap as root)
	scripts/image.sh

test: setup services image  ## unit + integration tiers (the gpu tier skips itself without a device)
	$(VENV)/bin/pytest -m "" --durations=40 tests  # -m "": every tier; gpu tests skip without CUDA

test-unit: setup  ## unit tier only (seconds)
	$(VENV)/bin/pytest tests/unit

test-integration: setup  ## integration tier only (local Ray, kfp.local, tiny models; minutes)
	$(VENV)/bin/pytest -m integration tests

test-gpu: setup  ## gpu tier (needs CUDA)
	$(VENV)/bin/pytest -m gpu tests

lint: setup  ## ruff lint + format check, mypy on flywheel/
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

lock: setup  ## re-pin requirements.lock (runtime, the image) and requirements-dev.lock from .venv
	$(PY) scripts/lock.py

clean:  ## remove local state and build outputs (keeps .venv)
	rm -rf .flywheel build local_outputs
