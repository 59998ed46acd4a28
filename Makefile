# `make demo`, `make test`, `make app` and `make gpu-check` do all set-up on a fresh machine: they create .venv when
# missing and install the project with its extras, then run the main job, the test suite, the demo page or the GPU check.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test app gpu-check gpu-table gpu-wheels install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,examples,transformers,hub,app,wandb]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/train_cris_masksd.py --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -n 2

# The demo page on http://127.0.0.1:7860: the model `make demo` exported, else the shipped tiny CLIP (untrained decoder).
app: $(STAMP)
	$(PY) examples/app.py $(if $(wildcard runs/demo/export/config.json),--model runs/demo/export)

# The one prepared GPU check (python -m benchmarks.gpu_check): under 8 minutes on one H100/H200; the log beside its results.
# On the lent GPU machine (no network, its own python3 with torch) it runs there directly, with the wheels
# that `make gpu-wheels` saved in .whl/ here (carry .whl); anywhere else it uses .venv like demo and test.
gpu-check:
	bash benchmarks/gpu_check.sh

# The powered table on one GPU (benchmarks/powered.py: 120 tiny runs, 16 at a time, resumable; starts no run after 7 min).
gpu-table:
	bash benchmarks/on_gpu.sh benchmarks.powered --run --device cuda --jobs 16 --budget 420

# Wheels the GPU machine lacks (open_clip and what it needs beyond that image), for Python 3.12, into .whl/.
gpu-wheels:
	python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
		open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
