# The few verbs people type. `make serve` and `make test` work on a fresh clone: they build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROTOS := proto/sluice/v1/inference.proto proto/sluice/kserve/v2/model_config.proto \
	proto/sluice/kserve/v2/grpc_service.proto

.PHONY: serve test check lint typecheck proto proto-check bench clean

# The Node.js client test needs its two npm packages; without npm it skips and says why.
NPM := $(shell command -v npm 2>/dev/null)
NODE_DEPS := $(if $(NPM),tests/node/node_modules/.installed)

# The test plugins are installed as a wheel (not editable): a change to their code must reinstall them.
$(BIN)/.installed: pyproject.toml tests/plugin_package/pyproject.toml $(wildcard tests/plugin_package/src/*/*.py)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# A venv made before the distribution was renamed holds the old editable `sluice` too: drop it.
	$(BIN)/python -m pip uninstall --quiet -y sluice 2>/dev/null || true
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]" ./tests/plugin_package
	touch $@

serve: $(BIN)/.installed  ## Serve the bundled example repository on 127.0.0.1:8001 (metrics on :8002).
	$(BIN)/sluice serve

test: $(BIN)/.installed $(NODE_DEPS) tests/kserve/.venv/.installed  ## Run the whole test suite.
	$(BIN)/python -m pytest

tests/node/node_modules/.installed: tests/node/package.json tests/node/package-lock.json
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
	touch $@

# Triton's client for the KServe tests, in a virtualenv of its own: it needs protobuf<7, Sluice protobuf>=7.
tests/kserve/.venv/.installed: tests/kserve/requirements.txt
	$(PYTHON) -m venv tests/kserve/.venv
	tests/kserve/.venv/bin/python -m pip install --quiet -r tests/kserve/requirements.txt
	touch $@

check: lint typecheck proto-check  ## What CI checks besides the tests.

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/.installed
	$(BIN)/mypy batcher server clients

proto: $(BIN)/.installed  ## Regenerate the committed Python code from proto/.
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto \
		--python_out=proto --mypy_out=proto --grpc_python_out=proto --mypy_grpc_out=proto $(PROTOS)

proto-check: proto  ## Fails when the committed generated code differs from what proto/ generates.
	git diff --exit-code -- proto/ || (echo "generated code is stale: run 'make proto' and commit" && exit 1)

bench: $(BIN)/.installed  ## See benchmarks/README.md.
	@cat benchmarks/README.md

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache tests/node/node_modules tests/kserve/.venv
