"""Benchmarks: guest-visible pause and total time, against every alternative."""
