"""MLX model classes the engine owns: families mlx-lm lacks, or where mlx-lm differs from the HF reference."""
