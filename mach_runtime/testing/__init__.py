"""Fixture builders for tests and benchmarks (random tiny checkpoints in every real layout)."""
