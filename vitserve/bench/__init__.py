"""Benchmarks: the named workloads of DESIGN.md through the runner and the baselines."""
