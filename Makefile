# Two commands do everything, installs included:
#   make lab    opens the course in JupyterLab
#   make test   runs the whole test suite
# TORCH picks the torch to install; CI pins the local CPU build with TORCH=torch==2.13.0.
# For a CUDA build, install torch into .venv first (see README) and it is kept.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.sdlearn-installed

.PHONY: lab test install demo clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
