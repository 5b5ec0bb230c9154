"""Benchmarks: scripts that time our code next to a reference and write BENCHMARKS.md."""
