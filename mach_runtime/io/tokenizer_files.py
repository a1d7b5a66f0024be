"""The tokenizer files a checkpoint directory needs beside its weights, checked before mlx-lm loads them."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def require_tokenizer_files(directory: Path) -> None:
    """load_moe needs the model's tokenizer beside the weights (mach check asks the same)."""
    if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointError(
            f"{directory}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); copy the tokenizer of the "
            "original model into the checkpoint directory"
        )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        f = directory / name
        if not f.exists():
            continue
        try:
            data = json.loads(f.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{f}: the tokenizer file is not valid JSON ({type(e).__name__}: {str(e)[:200]}); "
                                  "copy the original model's tokenizer files") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{f}: the tokenizer file must hold a JSON object; copy the original model's "
                                  "tokenizer files")


def load_tokenizer(directory: Path, config: dict):
    require_tokenizer_files(directory)
    from mlx_lm.utils import load_tokenizer

    try:
        return load_tokenizer(directory, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:  # transformers / tokenizers raise many types for damaged files
        if type(e).__name__.startswith("StrictDataclass"):  # transformers' typed config validation
            raise CheckpointError(f"{directory / 'config.json'}: transformers rejects a field's type ({e}); fix "
                                  "that field or use the model's original config.json") from None
        raise CheckpointError(
            f"{directory}: the tokenizer cannot be loaded ({type(e).__name__}: {str(e)[:300]}); tokenizer.json / "
            "tokenizer_config.json are damaged or do not belong to this model: copy the original model's tokenizer "
            "files") from None
