# Two commands do all set-up on a fresh machine (Python >= 3.10 with venv: PyTorch 2.13 needs it):
#   make demo   reconstruct the bundled sample with the default prior
#   make test   run the test suite
# Both create .venv and install the project into it on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= $(abspath ../shared/data)
# the PyTorch the project is tested with; a torch 2.13.0 already in the venv (any build) is kept
TORCH ?= torch==2.13.0

.PHONY: demo test bench install lint

$(BIN)/metashaperecon: pyproject.toml
	@[ "$(TORCH)" != "torch==2.13.0" ] || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { \
	  echo "make: $(PYTHON) is Python `$(PYTHON) -c 'import platform; print(platform.python_version())'`;" \
	    "torch 2.13.0 needs 3.10 or later: PYTHON=python3.11 make ..., or name an older torch, TORCH=torch==2.8.0"; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,train]"
	touch $@

install: $(BIN)/metashaperecon

demo: install
	$(BIN)/metashaperecon demo

test: install
	METASHAPERECON_DATA="$(DATA)" $(BIN)/python -m pytest

bench: install
	$(BIN)/python -m MetaShapeReconLib.bench

lint: install
	$(BIN)/ruff check MetaShapeRecon training Testing
