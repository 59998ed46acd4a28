#!/usr/bin/env bash
# `make gpu-check`: benchmarks/gpu_check.py with its log beside its results (benchmarks/on_gpu.sh sets up Python).
exec bash "$(dirname "$0")/on_gpu.sh" benchmarks.gpu_check "$@"
