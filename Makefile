# `make tour` and `make test` each do the whole set-up on a fresh machine: a virtual
# environment in .venv, the pinned dependencies (constraints.txt) and losskit itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: tour test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

tour: $(STAMP)
	$(BIN)/losskit tour

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info losskit-tour .pytest_cache
