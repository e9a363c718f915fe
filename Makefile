# The two commands the README opens with: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint typecheck protos up migrate clean

# Everything, into .venv: the services (CPU), the client, and the dev tools.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@# rembg imports pymatting, whose numba kernels compile on first import
	@# (a minute or more on 2 cores) and are then cached: pay it once, here.
	$(BIN)/python -c "import rembg.bg"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m services.local.demo --out out

test: install lint typecheck
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint

typecheck: install
	$(BIN)/mypy

# Regenerate clients/python/cutout/v1 from protos/ (tests fail when it is stale).
protos: install
	$(BIN)/python protos/generate.py

up: install
	$(BIN)/cutout up

# Create or update the data_records schema at $CUTOUT_MYSQL_URL.
migrate: install
	$(BIN)/python -m services.scheduler.migrate

clean:
	rm -rf $(VENV) var out samples .mypy_cache .ruff_cache .pytest_cache

# Container images (docs/images.md): cutout, cutout-gpu and cutout-models.
# `IMAGE_REPO=registry.example.org/team make images push` names them for a
# registry and pushes them; `make smoke` runs them as a cluster (needs podman:
# deploy/images/setup-host.sh).
.PHONY: images push smoke
images:
	deploy/images/build.sh build

push:
	deploy/images/build.sh push

smoke: install images
	$(BIN)/python deploy/images/smoke.py
