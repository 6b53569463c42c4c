# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
SESSIONS ?=
ARGS ?=
# llama.cpp's backend: cpu (default) | vulkan | cuda | metal. The venv remembers it; asking for
# another one (`make setup GPU=vulkan`) sets up again, with a wheel built for that backend.
VENV_GPU := $(shell cat $(VENV)/.gpu 2>/dev/null || echo cpu)
GPU ?= $(VENV_GPU)
ifneq ($(GPU),$(VENV_GPU))
.PHONY: $(STAMP)
endif

.PHONY: setup demo test bench fuzz lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) GPU=$(GPU) bash scripts/setup.sh
	touch $@

demo: setup
	$(BIN)/bkd-edge demo $(if $(SESSIONS),--sessions $(SESSIONS)) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

bench: setup
	$(BIN)/python scripts/bench_runtime.py $(if $(SESSIONS),--sessions $(SESSIONS)) $(ARGS)

# Not in `make test`: hypothesis-made hostile sessions files, stdin requests and server answers for
# FUZZ_SECONDS; fails on a traceback or a file written outside the case's OUT.
FUZZ_SECONDS ?= 60
fuzz: setup
	$(BIN)/python scripts/fuzz.py --seconds $(FUZZ_SECONDS) $(ARGS)

lint: setup
	$(BIN)/ruff check bundlekd_edge tests scripts
	$(BIN)/ruff format --check bundlekd_edge tests scripts

clean:
	rm -rf $(VENV) demo-out bench-out .pytest_cache dist
