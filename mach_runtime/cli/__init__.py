"""The command-line programs: ``mach`` and ``mach-archs`` (discovery commands import no MLX)."""
