# Quickstart: `make demo` (set up + run the default study), `make test` (run the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STUDY ?=
# the tests run file by file on this many pytest-xdist workers (0: in this process, one after another)
TEST_WORKERS ?= 2

.PHONY: demo test install bench-small clean

$(BIN)/permanence: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(BIN)/permanence

demo: install
	$(BIN)/permanence simulate --config params.yaml $(if $(STUDY),--study $(STUDY))

test: install
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench-small: install
	for f in sweeps/paper/f*.yaml; do $(BIN)/permanence sweep $$f --no-progress || exit 1; done

clean:
	rm -rf results mlruns .prefect
