"""Benchmark helpers (baseline re-implementation of the reference notebook)."""
