# `make tour` and `make test` each do the whole set-up on a fresh machine: a virtual
# environment in .venv, the pinned dependencies (constraints.txt), losskit itself and its
# compiled part (losskit._native: about two minutes with the machine's C++ compiler, then cached
# until its sources, torch or Python change).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: tour test fuzz docs install native clean gpu-check

install: $(STAMP) native

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

native: $(STAMP)
	$(BIN)/python -m losskit._native

tour: install
	$(BIN)/losskit tour

# LOSSKIT_NATIVE=require: a missing compiled part fails the suite instead of leaving every
# loss on its Python form unnoticed (tests/test_native.py compares the two). One pytest
# process per core (pytest-xdist); an idle one takes tests from the other's queue, so that
# the long files (the torch.compile cases, the ahead-of-time Triton compiles) end together.
# The processes share inductor's on-disk cache of compiled graphs.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(1, len(os.sched_getaffinity(0))))")
test: install
	LOSSKIT_NATIVE=require $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

# The differential fuzz against torch at full size: 2000 examples per loss (FUZZ_EXAMPLES),
# tens of thousands of calls. The seed is printed; `make fuzz SEED=...` replays a run.
fuzz: install
	@seed=$${SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; \
	echo "fuzz seed: $$seed (replay with: make fuzz SEED=$$seed)"; \
	$(BIN)/python -m pytest tests/test_fuzz.py -p no:cacheprovider --hypothesis-profile=fuzz \
		--hypothesis-seed=$$seed --hypothesis-show-statistics

# On a machine with an NVIDIA GPU: the GPU tests, the accuracy table and the CUDA benchmarks
# in under 8 minutes (benchmarks/gpu_check.py); CSVs to benchmarks/results. GPU_PYTHON=python3
# runs it with a Python that already has torch with CUDA (losskit from src, no venv made).
GPU_PYTHON ?= $(BIN)/python
gpu-check: $(if $(filter $(BIN)/python,$(GPU_PYTHON)),$(STAMP))
	PYTHONPATH=$(CURDIR)/src$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# The documentation site in build/site: pages generated from losskit.catalog, formulas
# rendered at build time (offline), warnings as errors, then every loss's section and every
# internal link checked.
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/python docs/generate.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/python docs/check_site.py

clean:
	rm -rf $(VENV) build src/*.egg-info src/losskit/_native/build losskit-tour losskit-explain .pytest_cache
