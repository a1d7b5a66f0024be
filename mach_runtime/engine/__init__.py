"""Decoding over a loaded model: generation, batching, sampling, compiled blocks, hooks, speculative decoding."""
