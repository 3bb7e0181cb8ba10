"""Benchmark scripts: run each as ``python benchmarks/<name>.py``; results go to results/."""
