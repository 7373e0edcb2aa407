"""Spoon Feed's plumbing, one concept per module; the research core is spoonfeed_helpers.py, which imports it."""
