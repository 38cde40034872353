"""Benchmarks (`make bench`): speed targets live here as printed ratios, never in timed tests."""
