"""What mach_runtime adjusts in, and needs of, the MLX backend it runs on: ``cpu_blas`` (OpenBLAS for MLX's CPU
matmuls on Linux), ``elf_slots``, ``mlx_streams`` (releasing a thread's streams before exit) and ``dtypes`` (dtype
names)."""
