# `make demo`, `make test` and `make gpu-check` do all set-up on a fresh machine: they create .venv when
# missing and install the project with its extras, then run the main job, the test suite or the GPU check.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test gpu-check install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,examples]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/train_cris_masksd.py

test: $(STAMP)
	$(PY) -m pytest -q -n 2

# The one prepared GPU check (benchmarks/gpu_check.py): under 8 minutes on one H200; the log beside its results.
gpu-check: $(STAMP)
	mkdir -p benchmarks/results
	bash -o pipefail -c 'PYTHONUNBUFFERED=1 $(PY) benchmarks/gpu_check.py 2>&1 | tee benchmarks/results/gpu_check.log'

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
