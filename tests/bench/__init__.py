"""Benchmarks for `make bench`: each bench_*.py module has main() that prints figures and ratios to a peer."""
