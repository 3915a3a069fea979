"""`treadle bench …`: benchmarks that time treadle against a baseline in the same run and print the ratio."""

from treadle.bench.runner import run_benchmark

__all__ = ["run_benchmark"]
