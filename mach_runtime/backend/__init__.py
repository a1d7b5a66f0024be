"""What mach_runtime adjusts in the MLX backend it runs on (``cpu_blas``: OpenBLAS for MLX's CPU matmuls on Linux)."""
