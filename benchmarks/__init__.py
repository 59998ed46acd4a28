"""Scripts that print tables and write benchmarks/results/: run each as a module from the repository root,
``python -m benchmarks.<name> --help``. Not part of the wheel."""
