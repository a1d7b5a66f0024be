"""Offline analysis of what the runtime records (routing traces); pure Python, no MLX."""
