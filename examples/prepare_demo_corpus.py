#!/usr/bin/env python3
"""Step 1 of the demo model's recipe: tokenizer + packed token arrays, built from this Python's stdlib.

    python examples/prepare_demo_corpus.py [--out .train] [--tokenizer-dir mach_runtime/assets/demo-qwen3-moe]

* lists the stdlib's ``.py`` files deterministically and splits them by file (``mach_runtime.demo_corpus``);
* trains a byte-level BPE tokenizer (the ``tokenizers`` library, vocab 8192) on the TRAIN files only and saves
  ``tokenizer.json`` + ``tokenizer_config.json`` (ChatML chat template) loadable by transformers;
* encodes every file, joins the files of each split with ``<|endoftext|>`` and writes ``train.npy`` /
  ``heldout.npy`` (uint16) plus ``manifest.json`` (file lists, token counts, Python version) to ``--out``.

Step 2 (``examples/train_demo_model.py``) trains on the arrays, on a GPU. The tokenizer is trained here, where
the stdlib is the one the split was defined on (the GPU machine runs another Python version).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mach_runtime.demo_corpus import DOC_SEPARATOR, HELDOUT_BYTE, corpus_files  # noqa: E402

VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(files, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())  # byte-level: no unknown token needed
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f.path) for f in files], trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": 1024,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    return tok


def encode_split(tok, files) -> np.ndarray:
    sep = tok.token_to_id(DOC_SEPARATOR)
    encs = tok.encode_batch([f.read() for f in files])
    ids = []
    for e in encs:
        ids.extend(e.ids)
        ids.append(sep)
    return np.asarray(ids, dtype=np.uint16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / ".train"))
    ap.add_argument("--tokenizer-dir", default=str(ROOT / "mach_runtime" / "assets" / "demo-qwen3-moe"))
    ap.add_argument("--reuse-tokenizer", action="store_true", help="encode with the existing tokenizer.json")
    a = ap.parse_args()
    out, tdir = Path(a.out), Path(a.tokenizer_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, held = corpus_files("train"), corpus_files("heldout")
    if a.reuse_tokenizer:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tdir / "tokenizer.json"))
    else:
        tok = build_tokenizer(train, tdir)
    assert tok.get_vocab_size() <= VOCAB_SIZE and tok.token_to_id(DOC_SEPARATOR) == 0
    arrays = {"train": encode_split(tok, train), "heldout": encode_split(tok, held)}
    for name, arr in arrays.items():
        np.save(out / f"{name}.npy", arr)
    nbytes = {k: sum(f.path.stat().st_size for f in fs) for k, fs in (("train", train), ("heldout", held))}
    manifest = {
        "python": platform.python_version(),
        "vocab_size": tok.get_vocab_size(),
        "heldout_rule": f"sha1(relpath)[0] < {HELDOUT_BYTE}",
        "files": {"train": len(train), "heldout": len(held)},
        "bytes": nbytes,
        "tokens": {k: int(v.size) for k, v in arrays.items()},
        "bytes_per_token": {k: nbytes[k] / arrays[k].size for k in arrays},
        "tokenizer_sha1": hashlib.sha1((tdir / "tokenizer.json").read_bytes()).hexdigest(),
        "heldout_files": [f.relpath for f in held],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps({k: v for k, v in manifest.items() if k != "heldout_files"}, indent=1))


if __name__ == "__main__":
    main()
