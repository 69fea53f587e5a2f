"""Benchmarks that print figures (speed, memory); run them as ``python -m scripts.benchmarks.<name>``."""
