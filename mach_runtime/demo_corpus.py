"""The demo model's corpus: the Python standard library's own ``.py`` sources, listed deterministically.

Every Python install carries this corpus, so the demo model can be re-trained and evaluated offline anywhere.
Files are listed in sorted order of their path relative to the stdlib directory; a file belongs to the
held-out split when the first byte of the SHA-1 of that relative path is below ``HELDOUT_BYTE`` (about 3 % of
the files). The split depends only on a file's name, so it is stable across Python versions: a file that
exists in two versions falls on the same side in both.

Imports nothing heavy (no MLX, no tokenizers): the CLI and the training scripts share it.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# top-level stdlib entries left out: installed third-party packages, codec tables, the pydoc topic dump
EXCLUDED_TOP = ("site-packages", "dist-packages", "encodings", "pydoc_data", "__pycache__")
HELDOUT_BYTE = 8  # sha1(relpath)[0] < 8  →  held out (8/256 ≈ 3 % of files)
DOC_SEPARATOR = "<|endoftext|>"  # between files in the packed token stream


@dataclass(frozen=True)
class CorpusFile:
    relpath: str  # posix path relative to the stdlib directory
    path: Path

    def read(self) -> str:
        return self.path.read_text("utf-8")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str) -> bool:
    return hashlib.sha1(relpath.encode("utf-8")).digest()[0] < HELDOUT_BYTE


def corpus_files(split: str = "train", root: Path | None = None) -> list[CorpusFile]:
    """Sorted UTF-8 ``.py`` files of the stdlib for ``split`` ("train", "heldout" or "all")."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, got {split!r}")
    root = Path(root) if root is not None else stdlib_dir()
    out = []
    for p in sorted(root.rglob("*.py"), key=lambda q: q.relative_to(root).as_posix()):
        rel = p.relative_to(root).as_posix()
        if rel.split("/", 1)[0] in EXCLUDED_TOP or "__pycache__" in rel:
            continue
        if split != "all" and is_heldout(rel) != (split == "heldout"):
            continue
        try:
            p.read_text("utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of test files are deliberately not UTF-8
        out.append(CorpusFile(rel, p))
    return out


def heldout_prompts(tokenizer, n: int, prompt_tokens: int, skip: int = 256, min_after: int = 256) -> list[tuple[str, list[int]]]:
    """``n`` held-out prompts as (relpath, token ids): tokens [skip, skip + prompt_tokens) of ``n`` evenly spaced
    held-out files among those with at least ``min_after`` tokens after the prompt. The distribution the demo
    draft's acceptance is reported on (docs/model_card.md) and the P3 benchmark decodes from."""
    files = [(f.relpath, tokenizer.encode(f.read())) for f in corpus_files("heldout")]
    files = [(r, ids) for r, ids in files if len(ids) >= skip + prompt_tokens + min_after]
    if not files:
        raise ValueError(f"no held-out file has {skip + prompt_tokens + min_after} tokens")
    last = len(files) - 1
    pick = [round(i * (last / (n - 1))) if n > 1 else 0 for i in range(n)]  # = numpy.linspace(...).round()
    return [(files[i][0], files[i][1][skip : skip + prompt_tokens]) for i in pick]
