"""Benchmarks for `optax_constraints` (not part of the package): `python benchmarks/run.py`."""
