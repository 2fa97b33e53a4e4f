"""Benchmarks of inferq against in-process baselines; results go to bench/RESULTS.md."""
