# Two commands, from a fresh clone:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test bench clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed   ## set up and build the demo cache
	$(BIN)/doit build-cache FLIGHT=examples/flights/demo.json

test: $(VENV)/.installed   ## set up and run every test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

bench: $(VENV)/.installed  ## print the benchmark tables
	$(BIN)/python bench/bench_noop.py
	$(BIN)/python bench/bench_describe.py

clean-venv:
	rm -rf $(VENV)
