"""Checkpoint paths and Hugging Face repository ids, resolved the way mlx-lm resolves them, offline.

mlx-lm's ``load("org/name")`` treats anything that is not an existing path as a repository id and asks
``huggingface_hub.snapshot_download`` for it. mach_runtime never downloads, so it asks with
``local_files_only=True``: huggingface_hub itself finds the cache (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else
``~/.cache/huggingface/hub``), reads ``refs/<revision>`` (a branch or tag; a commit hash names its snapshot
directly) and returns ``snapshots/<commit>``. Import-light: no MLX.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError, CheckpointNotFoundError

# the files mlx-lm's loader fetches (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS): a snapshot is complete without others
ALLOW_PATTERNS = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt",
                  "*.jsonl", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


def looks_like_repo_id(text: str) -> bool:
    """``org/name`` or ``name`` as the hub spells them (no path separators beyond one ``/``, no ``..``)."""
    return bool(_REPO_ID.match(text)) and ".." not in text and not text.endswith((".", "-"))


def hub_cache_dir() -> str:
    """The Hugging Face hub cache huggingface_hub uses now (its own constant: HF_HUB_CACHE / HF_HOME)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_checkpoint(path, revision: str | None = None) -> Path:
    """A local checkpoint directory for ``path``: the path itself when it exists, else the cached snapshot of
    the repository id ``path`` at ``revision`` (default ``main``). Raises CheckpointNotFoundError naming the path
    and the cache directory looked in."""
    if path is None:
        raise CheckpointNotFoundError("no checkpoint path given; pass a local checkpoint directory or a repository "
                                      "id in the Hugging Face cache")
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"checkpoint must be a path or a repository id, got {type(path).__name__}")
    if revision is not None and not (isinstance(revision, str) and revision):
        raise CheckpointError(f"revision must be a non-empty string (a branch, tag or commit), got {revision!r}")
    text = os.fspath(path)
    p = Path(os.path.expanduser(text))
    if p.exists():
        if revision is not None:
            raise CheckpointError(f"{p}: a revision ({revision!r}) applies to repository ids in the Hugging Face "
                                  "cache, not to a local directory")
        return p
    if isinstance(path, str) and looks_like_repo_id(text):
        return _from_cache(text, revision)
    raise CheckpointNotFoundError(
        f"{p}: checkpoint path does not exist; pass a local directory holding config.json and *.safetensors or a "
        "repository id (org/name) in the Hugging Face cache (mach_runtime never downloads weights)"
    )


def _from_cache(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.file_download import repo_folder_name

    cache = hub_cache_dir()
    where = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"))
    try:
        snapshot = snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=ALLOW_PATTERNS)
    except Exception as e:  # huggingface_hub: LocalEntryNotFoundError, IncompleteSnapshotError, HFValidationError
        rev = revision or "main"
        raise CheckpointNotFoundError(
            f"{repo_id}: not a local path, and revision {rev!r} of this repository is not in the Hugging Face cache "
            f"({where}: {type(e).__name__}); download it first (e.g. `hf download {repo_id}`), set HF_HOME / "
            "HF_HUB_CACHE to the cache that holds it, or pass a local directory"
        ) from None
    return Path(snapshot)
