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

.PHONY: lab test demo install equivalence execute clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

# One picture from the command line with TinySD, saved A1111-style under outputs/txt2img-images/.
demo: $(STAMP)
	$(PY) -m sdlearn "a large red circle in the middle on a blue background" --sampler "DPM++ 2M Karras" --seed 1

# Unit and equivalence tests, then every course notebook and exercise solution under nbval
# (outputs compared cell by cell; cells marked NBVAL_IGNORE_OUTPUT hold images or timings).
NOTEBOOKS = $(wildcard notebooks/*.ipynb)
SOLUTIONS = $(wildcard exercises/solutions/*.ipynb)

test: $(STAMP)
	$(PY) exercises/make_exercises.py --check
	# One thread: two threads on a shared 2-core machine spin against each other (a 50x slowdown was seen).
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS) tests --nbval $(SOLUTIONS) $(NOTEBOOKS)

# Re-execute every course notebook and exercise solution in a fresh kernel, in place, two at a time (after a change
# to sdlearn or a retrained TinySD; then read the outputs before committing them).
execute: $(STAMP)
	printf '%s\n' $(NOTEBOOKS) $(SOLUTIONS) | OMP_NUM_THREADS=1 xargs -P 2 -I NB \
		$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.record_timing=False NB

clean-venv:
	rm -rf $(VENV)

# The equivalence figures quoted in README: each comparison with diffusers/transformers prints its max |diff|.
equivalence: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -s tests/test_clip.py tests/test_vae.py tests/test_unet.py \
		tests/test_pipeline.py tests/test_samplers.py | grep -iE "max ?(abs|\|diff|\|Δ)"
