"""Gleam's benchmarks: `python -m bench` (or `make bench`) runs every workload against a
real etcd, each beside its plain alternative, and writes bench/RESULTS.md."""
