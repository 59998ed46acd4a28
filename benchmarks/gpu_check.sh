#!/usr/bin/env bash
# `make gpu-check`: `python -m benchmarks.gpu_check` (the benchmarks/gpu_check package) with its log beside its results. On a machine whose own python3
# has CUDA and no network (the lent H200), it installs the carried wheels in .whl/ (`make gpu-wheels`) into a
# scratch folder and runs from the checkout; elsewhere it sets up .venv the way `make demo` does.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site:$PWD"
    else
        export PYTHONPATH="$PWD"
    fi
    PY=python3
else
    make install
    PY=.venv/bin/python
fi
PYTHONUNBUFFERED=1 "$PY" -m benchmarks.gpu_check "$@" 2>&1 | tee benchmarks/results/gpu_check.log
