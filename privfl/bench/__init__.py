"""Benchmarks behind `privfl bench`."""
