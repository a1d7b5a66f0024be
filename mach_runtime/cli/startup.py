"""What the command-line programs do before anything imports transformers: keep torch out of the process.

transformers 5 imports torch whenever it is installed (``transformers.configuration_utils`` ->
``modeling_rope_utils`` -> ``import torch``: there is no switch to turn that off), and mlx-lm reaches it through
its tokenizer loader. ``mach`` and ``mach-serve`` use transformers for tokenizers, chat templates and configs
only — MLX computes, nothing of ours or mlx-lm's touches torch — yet importing torch cost each start about
4-5 s of CPU on the 2-core dev machine (user time of ``mach generate`` on the demo model: 8.6-9.1 s with it,
4.1-4.2 s without). A ``None`` entry in ``sys.modules`` is Python's documented way to make a module unimportable:
``importlib.util.find_spec("torch")`` then answers None, transformers' ``is_torch_available()`` is False and its
torch-only paths stay off. ``MACH_IMPORT_TORCH=1`` (config.py) lets torch in; the library (``import mach_runtime``)
never does this, only the programs' entry points.
"""

from __future__ import annotations

import sys


def keep_torch_out() -> bool:
    """Makes ``import torch`` fail in this process unless ``MACH_IMPORT_TORCH`` says otherwise or torch is already
    loaded; returns whether torch is kept out."""
    from ..config import resolve_import_torch

    if "torch" in sys.modules or resolve_import_torch():
        return False
    sys.modules["torch"] = None
    return True
