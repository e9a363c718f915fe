# The two commands the README opens with: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint typecheck protos ts api-baseline up migrate clean

# Everything, into .venv: the client (cutout-client, clients/python), the services
# on CPU (cutout-server, the root), and the dev tools.
$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	@echo "== installing Cutout into $(VENV) (the first time takes a few minutes)"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# The client was once part of a distribution named "cutout" (a PyPI name that is not ours).
	$(BIN)/pip uninstall -q -y cutout 2>/dev/null || true
	$(BIN)/pip install --progress-bar off -e ./clients/python -e '.[dev]'
	@# rembg imports pymatting, whose numba kernels compile on first import
	@# (a minute or more on 2 cores) and are then cached: pay it once, here.
	@echo "== compiling rembg's numba kernels once (a minute or two)"
	$(BIN)/python -c "import rembg.bg"
	@echo "== installed: source $(VENV)/bin/activate puts cutout and cutout-admin on PATH"
	touch $@

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

# Debian's Chromium for tests/test_web_page.py (Playwright never downloads a browser);
# nothing to do when it is there.
/usr/bin/chromium:
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium fonts-dejavu-core

install: $(VENV)/.installed clients/ts/node_modules/.installed clients/web/dist/index.html /usr/bin/chromium

demo: install
	$(BIN)/python -m services.local.demo --out out

# Everything CI runs: lint, types, the pytest suite (services, Envoy, the TypeScript
# client, the web page in Chromium), then the container images built and run as a
# cluster (deploy/images/smoke.py).
test: install lint typecheck
	$(BIN)/pytest
	$(MAKE) smoke

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
# tests/test_protos.py fails when they are stale).
ts: install
	cd clients/ts && npm run generate

# Accept the API as it is now as the one later changes are checked against
# (`buf breaking`, in tests/test_protos.py): run when a breaking change is released on purpose.
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
