"""Benchmarks of the stages against plain TRL and against the machine's own matmul peak (bench/README.md)."""
