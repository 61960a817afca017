# Two commands, from a fresh clone:  `make demo`  and  `make test`.
# Every install comes from uv.lock (`uv sync --locked`): a fresh clone gets
# exactly the versions CI tested. `make upgrade` moves the lock on purpose;
# `make test-latest` tries the newest release of everything, unlocked.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# uv itself, bootstrapped into a private venv when the machine has none
UV     ?= $(shell command -v uv 2>/dev/null || echo .uv/bin/uv)
EXTRAS  = --extra geotiff --extra s3 --extra dask
export UV_PROJECT_ENVIRONMENT = $(VENV)

.PHONY: demo test bench lint upgrade test-latest companion-bundle clean-venv

.uv/bin/uv:
	$(PYTHON) -m venv .uv
	.uv/bin/pip install -q uv

# --inexact: the demo's install never removes what `make test` added
$(VENV)/.installed-demo: pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --inexact --python $(PYTHON) --no-default-groups -q
	touch $@

# tests and lint share one install (uv sync is exact: two sets would undo each other)
$(VENV)/.installed-dev: pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --python $(PYTHON) $(EXTRAS) --group test --group lint -q
	touch $@

demo: $(VENV)/.installed-demo   ## set up and build the demo cache
	$(BIN)/doit build-cache FLIGHT=examples/flights/demo.json

test: $(VENV)/.installed-dev    ## set up and run every test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

bench: $(VENV)/.installed-dev   ## print the benchmark tables
	$(BIN)/python bench/bench_noop.py
	$(BIN)/python bench/bench_describe.py

SOURCES = cachebuild targets tests bench dodo.py
lint: $(VENV)/.installed-dev   ## format, lint, types and import contracts (CI runs it before the tests)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/mypy
	$(BIN)/lint-imports

upgrade: | $(UV)                ## refresh uv.lock to the newest releases (review the diff)
	$(UV) lock --upgrade

# The whole suite in a throwaway venv against the newest release of every
# dependency (no lock), so a deprecation shows up here before it breaks main.
LATEST = .venv-latest
test-latest: | $(UV)            ## run every test against the newest releases, unlocked
	rm -rf $(LATEST)
	$(UV) venv -q --python $(PYTHON) $(LATEST)
	VIRTUAL_ENV=$(LATEST) $(UV) pip install -q --upgrade -e ".[geotiff,s3,dask]" --group test
	$(LATEST)/bin/python -c "import importlib.metadata as m; print('test-latest:', ', '.join(f'{d}=={m.version(d)}' for d in ['cryptography','numpy','faiss-cpu','onnxruntime','doit','httpx','paramiko','pillow','rasterio','boto3','dask','moto','hypothesis','pytest']))"
	$(LATEST)/bin/python -m pytest -q -n 2 --dist loadfile -p no:cacheprovider
	rm -rf $(LATEST)

# What a companion installs from (docs/companion.md): the wheel, and uv.lock
# exported as hash-pinned requirements for pip on the Jetson's own Python.
companion-bundle: | $(UV)      ## wheel + locked requirements for the companion, in dist/companion/
	rm -rf dist/companion
	$(UV) build -q --wheel --out-dir dist/companion
	$(UV) export -q --locked --no-dev --no-emit-project --format requirements-txt \
	    -o dist/companion/requirements.txt

clean-venv:
	rm -rf $(VENV) $(LATEST) .uv
