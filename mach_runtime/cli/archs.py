"""``mach-archs [--json]``: the MoE architectures this engine can serve, straight from the registry.

Import-light: reads ``io/arch_registry.REGISTRY`` only (no MLX), so it runs on any host. ``--json`` prints
exactly ``registry_summary()``.
"""

from __future__ import annotations

import argparse
import json
import sys

from .pipe import quiet_on_closed_pipe

COLUMNS = (
    ("arch", "arch"),
    ("model_type", "model_type"),
    ("swiglu", "swiglu"),
    ("stacked", "stacked"),
    ("expert_bias", "expert_bias"),
    ("wrapped", "wrapped"),
    ("kv_cache_kind", "kv_cache"),
    ("specdec_kind", "specdec"),
    ("bits/group", "bits/group"),
    ("continuous_batching", "batching"),
    ("implemented", "loads"),
    ("model_module", "model_module"),
)


def _cell(row: dict, key: str) -> str:
    if key == "bits/group":
        return f"{row['bits']}/{row['group']}"
    v = row[key]
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def format_table(rows: list[dict]) -> str:
    header = [title for _, title in COLUMNS]
    body = [[_cell(r, key) for key, _ in COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@quiet_on_closed_pipe
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mach-archs", description="MoE architectures mach_runtime can serve")
    p.add_argument("--json", action="store_true", help="print registry_summary() as JSON")
    a = p.parse_args(argv)
    from ..io.arch_registry import registry_summary

    rows = registry_summary()
    if a.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(rows))
        print("\nA checkpoint whose config.json model_type is not listed cannot be loaded. "
              "'loads: no' = registered for detection and `mach check`, model not implemented yet.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
