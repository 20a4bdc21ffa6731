"""Parts the benchmark scripts share (not scripts themselves: tests/test_benchmarks.py runs benchmarks/*.py)."""
