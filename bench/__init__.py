"""Benchmarks against the reference implementation (TRL); run as `python -m bench.<name>`, not by pytest."""
