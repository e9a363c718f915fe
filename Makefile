# The two commands the README opens with: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install lock demo test test-fast lint typecheck protos ts api-baseline up migrate clean

# Everything, into .venv, at exactly the versions requirements/dev.lock names (with
# their sha256 hashes): the client (cutout-client, clients/python), the services on
# CPU (cutout-server, the root) and the dev tools. uv, itself pinned and hashed in
# requirements/uv.lock, syncs the venv to the lock: anything not in it is removed,
# and nothing else (no machine-wide pip config, no newer release) picks a version.
# `make lock` changes the lock on purpose (docs/dependencies.md).
UV := $(BIN)/uv
$(VENV)/.installed: requirements/dev.lock requirements/uv.lock pyproject.toml clients/python/pyproject.toml
	@echo "== installing Cutout into $(VENV) from requirements/dev.lock"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --isolated --disable-pip-version-check --no-deps \
		--require-hashes -r requirements/uv.lock
	$(UV) pip sync -q --python $(BIN)/python --require-hashes requirements/dev.lock
	@# Our own two distributions, editable; every dependency is already there.
	$(UV) pip install -q --python $(BIN)/python --no-deps --no-build-isolation \
		-e ./clients/python -e .
	$(UV) pip check --python $(BIN)/python
	@# rembg imports pymatting, whose numba kernels compile on first import
	@# (a minute or more on 2 cores) and are then cached: pay it once, here.
	@echo "== compiling rembg's numba kernels once (a minute or two)"
	$(BIN)/python -c "import rembg.bg"
	@echo "== installed: source $(VENV)/bin/activate puts cutout and cutout-admin on PATH"
	touch $@

# Resolve the dependencies again, newest versions within pyproject's ranges, into
# requirements/*.lock (dev: this venv and CI; cpu, gpu: the images, held to dev's
# versions). Review the diff of the locks as the upgrade it is, then `make install`.
LOCK_FLAGS := --universal --python-version 3.11 --generate-hashes -q \
	--no-emit-package cutout-server --no-emit-package cutout-client
lock: $(VENV)/.installed
	$(UV) pip compile requirements/uv.in $(LOCK_FLAGS) --upgrade -o requirements/uv.lock
	$(UV) pip compile requirements/dev.in $(LOCK_FLAGS) --upgrade -o requirements/dev.lock
	$(UV) pip compile requirements/cpu.in $(LOCK_FLAGS) -c requirements/dev.lock -o requirements/cpu.lock
	$(UV) pip compile requirements/gpu.in $(LOCK_FLAGS) -c requirements/dev.lock -o requirements/gpu.lock

# The TypeScript client's dependencies and tools (clients/ts), exactly as its
# package-lock.json pins them; again only when the lock file changes.
clients/ts/node_modules/.installed: clients/ts/package-lock.json
	@command -v npm >/dev/null || { echo "npm not found: install Node.js 20 or later with npm"; exit 1; }
	cd clients/ts && npm ci --no-audit --no-fund
	touch $@

# The web page (clients/web): its npm packages, then dist/ bundled with the TS client.
clients/web/node_modules/.installed: clients/web/package-lock.json clients/ts/node_modules/.installed
	cd clients/web && npm ci --no-audit --no-fund
	touch $@

clients/web/dist/index.html: clients/web/node_modules/.installed $(wildcard clients/web/*.* clients/web/src/* clients/ts/src/*.ts)
	cd clients/web && npm run build

# Debian's Chromium for tests/cluster/test_web_page.py (Playwright never downloads a browser);
# nothing to do when it is there.
/usr/bin/chromium:
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium fonts-dejavu-core

install: $(VENV)/.installed clients/ts/node_modules/.installed clients/web/dist/index.html /usr/bin/chromium

demo: install
	$(BIN)/python -m services.local.demo --out out

# Everything CI runs: lint, types, the pytest suite in its three tiers (tests/unit,
# tests/store, tests/cluster: services, Envoy, the TypeScript client, the web page in
# Chromium), then the container images built and run as a cluster (deploy/images/smoke.py).
# pytest runs on TEST_WORKERS pytest-xdist workers, each taking a whole file at a time
# (--dist loadfile: a module's own cluster is started once); every port the tests open is a
# free one, so files run side by side. One worker more than CPUs: cluster tests spend much
# of their time waiting (restarts, timeouts, services stopping), and the extra worker fills
# those waits (2 CPUs: 15.6 min with 2 workers, 12.7 with 3, 12.5 with 4; about 23 CPU-minutes).
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
test: install lint typecheck
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile
	$(MAKE) smoke

# The quick loop while editing: the unit and store tiers (nothing but redis-server and
# MariaDB is started), less the tests marked real_model (the real IS-Net model: minutes
# of CPU), which `make test` runs. One tier or file: .venv/bin/pytest tests/unit (or a path).
test-fast: install
	$(BIN)/pytest -m "not real_model" tests/unit tests/store

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint

typecheck: install
	$(BIN)/mypy

# Regenerate clients/python/cutout/v1 (public) and services/internal/v1 (internal)
# from protos/ (tests fail when either is stale).
protos: install
	$(BIN)/python protos/generate.py

# Regenerate the TypeScript stubs clients/ts/src/gen from protos/cutout/v1 (buf.gen.ts.yaml;
# tests/cluster/test_protos.py fails when they are stale).
ts: install
	cd clients/ts && npm run generate

# Accept the API as it is now as the one later changes are checked against
# (`buf breaking`, in tests/cluster/test_protos.py): run when a breaking change is released on purpose.
api-baseline:
	tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -czf protos/api-baseline.tar.gz \
		buf.yaml $$(find protos third_party -name '*.proto' | sort)

up: install
	$(BIN)/cutout-admin up

# Create or update the data_records schema at $CUTOUT_MYSQL_URL.
migrate: install
	$(BIN)/python -m services.scheduler.migrate

clean:
	rm -rf $(VENV) var out samples .mypy_cache .ruff_cache .pytest_cache
	rm -rf clients/ts/node_modules clients/ts/dist clients/web/node_modules clients/web/dist clients/web/dist-test

# Container images (docs/images.md): cutout, cutout-gpu and cutout-models.
# `IMAGE_REPO=registry.example.org/team make images push` names them for a
# registry and pushes them; `make smoke` runs them as a cluster (needs podman:
# deploy/images/setup-host.sh).
.PHONY: images push smoke
images:
	deploy/images/setup-host.sh
	deploy/images/build.sh build

push:
	deploy/images/build.sh push

smoke: install images
	$(BIN)/python deploy/images/smoke.py
