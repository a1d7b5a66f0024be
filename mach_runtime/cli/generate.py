"""``mach generate``: mlx-lm's ``generate`` command line (flags, defaults, chat template, stdin) on a
``load_moe`` model, plus mach's residency flags.

The flags and defaults are mlx-lm 0.32.2's (``mlx_lm/generate.py``): ``--model``, ``--prompt/-p`` (``-`` reads
stdin, ``\\n`` / ``\\t`` escapes), the chat template on unless ``--ignore-chat-template``, ``--system-prompt``,
``--max-tokens/-m`` (100), ``--temp`` 0, ``--top-p`` 1, ``--top-k`` 0, ``--min-p`` 0, ``--seed``,
``--extra-eos-token``, ``--verbose`` (True: the text between ``==========`` lines and the speeds; False: the
response only), ``--max-kv-size``, ``--kv-bits`` / ``--kv-group-size`` / ``--quantized-kv-start``,
``--prefill-step-size``, ``--draft-model`` / ``--num-draft-tokens``. Decoding is mlx-lm's ``stream_generate``
(its KV-cache flags) with mach's keyed sampler, so ``--seed`` gives what ``Runtime.stream(seed=)`` gives. mach's own: ``--streaming`` /
``--no-streaming``, ``--expert-cache-gb``, ``--eviction-policy``, ``--direct-io``, ``--pin-experts``, ``--revision``; the
checkpoint may also be given positionally (the older form). A ``--draft-model`` that is a DFlash draft decodes
with mach's ``BlockSpecDecEngine`` (block drafting); any other draft is mlx-lm's draft-model speculative decoding.
"""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_PROMPT = "def fibonacci(n):"  # ends on a token boundary the bundled demo model saw in training
DEFAULT_MAX_TOKENS = 100  # mlx-lm's
DEFAULT_QUANTIZED_KV_START = 5000  # mlx-lm's
DEFAULT_PREFILL_STEP_SIZE = 2048  # mlx-lm's


def _str2bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "t", "1", "yes", "y"):
        return True
    if t in ("false", "f", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def build_parser(g: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g.add_argument("checkpoint", nargs="?", help="checkpoint (older positional form of --model)")
    g.add_argument("--model", default=None, help="local checkpoint directory or a repository id in the local Hugging "
                   "Face cache (default: the bundled demo model)")
    g.add_argument("--revision", default=None, help="branch, tag or commit of a repository id (default: main)")
    g.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="message to process ('-' reads from stdin)")
    g.add_argument("--system-prompt", default=None, help="system prompt for the chat template")
    g.add_argument("--ignore-chat-template", action="store_true",
                   help="use the raw prompt without the tokenizer's chat template")
    g.add_argument("--chat", action="store_true", help=argparse.SUPPRESS)  # older flag: the template is on by default
    g.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS, help="maximum tokens to generate")
    g.add_argument("--temp", type=float, default=0.0, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=1.0, help="sampling top-p")
    g.add_argument("--min-p", type=float, default=0.0, help="sampling min-p")
    g.add_argument("--top-k", type=int, default=0, help="sampling top-k")
    g.add_argument("--min-tokens-to-keep", type=int, default=1, help="minimum tokens kept by min-p")
    g.add_argument("--seed", type=int, default=None, help="PRNG seed")
    g.add_argument("--extra-eos-token", nargs="+", default=(), help="more tokens that end generation")
    g.add_argument("--verbose", type=_str2bool, default=True,
                   help="True: text between ========== lines and speeds; False: only the response")
    g.add_argument("--max-kv-size", type=int, default=None, help="maximum KV cache size (a rotating cache)")
    g.add_argument("--kv-bits", type=int, default=None, help="bits of KV cache quantization (default: none)")
    g.add_argument("--kv-group-size", type=int, default=64, help="group size of KV cache quantization")
    g.add_argument("--quantized-kv-start", type=int, default=DEFAULT_QUANTIZED_KV_START,
                   help="with --kv-bits: quantize the KV cache from this step on")
    g.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP_SIZE,
                   help="prompt tokens processed at a time")
    g.add_argument("--draft-model", default=None, help="draft for speculative decoding: a DFlash draft (mach's "
                   "block drafting) or a small model with the same tokenizer (mlx-lm's)")
    g.add_argument("--num-draft-tokens", type=int, default=None,
                   help="tokens drafted per step (mlx-lm's default 3; a DFlash draft: block size - 1, default its own)")
    g.add_argument("--streaming", dest="streaming", action="store_true", default=None,
                   help="streaming residency: experts stay on disk, a bounded bank holds the hot ones")
    g.add_argument("--no-streaming", dest="streaming", action="store_false",
                   help="stacked residency: every expert resident")
    g.add_argument("--expert-cache-gb", type=float, default=None, help="streaming bank budget (GiB, all layers)")
    g.add_argument("--eviction-policy", choices=("lru", "lrfu"), default=None)
    g.add_argument("--direct-io", action="store_true", help="read experts with O_DIRECT (bypass the page cache)")
    g.add_argument("--pin-experts", default=None, metavar="TRACE",
                   help="a `mach trace` file: pin each layer's most routed experts in half the bank (streaming)")
    return g


def _check(a) -> None:
    from ..errors import ConfigError

    if a.checkpoint and a.model and a.checkpoint != a.model:
        raise ConfigError(f"two checkpoints given: positional {a.checkpoint!r} and --model {a.model!r}; give one")
    if a.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1, got {a.max_tokens}")
    if a.kv_bits is not None and a.kv_bits not in (2, 3, 4, 5, 6, 8):
        raise ConfigError(f"--kv-bits must be one of 2, 3, 4, 5, 6, 8, got {a.kv_bits}")
    if a.kv_group_size not in (32, 64, 128):
        raise ConfigError(f"--kv-group-size must be 32, 64 or 128, got {a.kv_group_size}")
    if a.max_kv_size is not None and a.max_kv_size < 1:
        raise ConfigError(f"--max-kv-size must be >= 1, got {a.max_kv_size}")
    if a.min_tokens_to_keep != 1:
        raise ConfigError(f"--min-tokens-to-keep {a.min_tokens_to_keep}: mach's sampler keeps the most likely token "
                          "under min-p (mlx-lm's default of 1); other values are not supported")
    if a.num_draft_tokens is not None and a.num_draft_tokens < 1:
        raise ConfigError(f"--num-draft-tokens must be >= 1, got {a.num_draft_tokens}")
    if not a.temp >= 0 or not 0 < a.top_p <= 1 or a.top_k < 0 or not 0 <= a.min_p <= 1:
        raise ConfigError("sampling: --temp >= 0, 0 < --top-p <= 1, --top-k >= 0 and 0 <= --min-p <= 1")
    if a.draft_model and (a.kv_bits is not None or a.max_kv_size is not None):
        raise ConfigError("--draft-model cannot be combined with --kv-bits or --max-kv-size (speculative decoding "
                          "rolls its caches back, which quantized and rotating caches cannot do)")


def _prompt_tokens(a, tokenizer) -> list[int]:
    prompt = a.prompt.replace("\\n", "\n").replace("\\t", "\t")
    prompt = sys.stdin.read() if prompt == "-" else prompt
    use_template = not a.ignore_chat_template and tokenizer.has_chat_template
    if use_template:
        messages = [{"role": "system", "content": a.system_prompt}] if a.system_prompt is not None else []
        messages.append({"role": "user", "content": prompt})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    elif a.system_prompt is not None:
        from ..errors import ConfigError

        raise ConfigError("--system-prompt needs the chat template (drop --ignore-chat-template; the tokenizer "
                          "must have one)")
    return tokenizer.encode(prompt, add_special_tokens=not use_template)


def _is_dflash_draft(path) -> bool:
    from ..io.arch_registry import read_config
    from ..io.hf_cache import resolve_checkpoint

    config = read_config(resolve_checkpoint(path))
    return "dflash_config" in config


def _responses(a, model, tokenizer, ids):
    """(text, n_tokens, finish_reason, prompt_tps, generation_tps) per chunk, from mlx-lm's stream_generate or,
    for a DFlash draft, mach's block speculative decoding engine."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate

    from ..engine.sampling import KeyedSampler, SamplingParams

    if a.draft_model and _is_dflash_draft(a.draft_model):
        yield from _dflash(a, model, tokenizer, ids)
        return
    draft = None
    if a.draft_model:
        from ..errors import ConfigError
        from ..io.load import load

        draft, draft_tok = load(a.draft_model)
        if draft_tok.vocab_size != tokenizer.vocab_size:
            raise ConfigError(f"--draft-model {a.draft_model}: its tokenizer does not match the model's")
    # THE sampler keyed by (seed, position), so `mach generate --seed` writes what Runtime.stream(seed=) writes
    sampler = KeyedSampler(SamplingParams(max_tokens=a.max_tokens, temperature=a.temp, top_p=a.top_p, top_k=a.top_k,
                                          min_p=a.min_p, seed=a.seed))
    kw = dict(sampler=sampler, prefill_step_size=a.prefill_step_size, kv_bits=a.kv_bits,
              kv_group_size=a.kv_group_size, quantized_kv_start=a.quantized_kv_start)
    if draft is None:
        kw["max_kv_size"] = a.max_kv_size
        if a.kv_bits is not None and a.max_kv_size is None:
            # mlx-lm's KV quantization (same conversion step) by mach's caches, which attend over dequantized K/V
            # where the backend lacks the quantized kernel (MLX 0.32.4 CUDA: io/backend_faults.py)
            from mlx_lm.models.cache import make_prompt_cache

            from ..engine.quantized_kv import quantizing_cache

            kw.update(kv_bits=None, prompt_cache=quantizing_cache(make_prompt_cache(model), a.kv_bits,
                                                                  a.kv_group_size, a.quantized_kv_start))
    else:
        kw.update(draft_model=draft, num_draft_tokens=a.num_draft_tokens or 3)
    try:
        for r in stream_generate(model, tokenizer, mx.array(ids), max_tokens=a.max_tokens, **kw):
            yield r.text, r.generation_tokens, r.finish_reason, r.prompt_tps, r.generation_tps
    except ValueError as e:  # mlx-lm: e.g. speculative decoding needs a trimmable cache
        from ..errors import ConfigError

        raise ConfigError(f"mlx-lm generation refused these settings: {e}") from None


def _dflash_config(a):
    from ..engine.specdec import BlockSpecDecEngineConfig, BlockSpecDecEngineMode

    block = {} if a.num_draft_tokens is None else {"block_size": a.num_draft_tokens + 1}
    return BlockSpecDecEngineConfig(mode=BlockSpecDecEngineMode.NATIVE_V7, **block)


def _dflash(a, model, tokenizer, ids):
    from ..engine.specdec import BlockSpecDecEngine
    from ..engine.specdec.draft import load_dflash_draft

    draft = load_dflash_draft(a.draft_model)
    eng = BlockSpecDecEngine(model, tokenizer, draft, config=_dflash_config(a))  # its hooks went on at load
    t0, n = time.perf_counter(), 0
    for chunk in eng.generate(ids, max_tokens=a.max_tokens, temperature=a.temp, top_p=a.top_p, top_k=a.top_k,
                              seed=a.seed):
        n += len(chunk.token_ids)
        tps = n / max(time.perf_counter() - t0, 1e-9)
        yield chunk.text, n, chunk.finish_reason, 0.0, tps


def run(a) -> int:
    from ..assets import default_checkpoint
    from ..io.load import load_moe

    _check(a)
    import mlx.core as mx

    ckpt = a.model or a.checkpoint or default_checkpoint()
    residency = None if a.streaming is None else ("streaming" if a.streaming else "stacked")
    speculative = None
    if a.draft_model and _is_dflash_draft(a.draft_model):  # the engine's hooks go on at load (engine/hooks.py)
        from ..engine.hooks import HookPlan
        from ..io.hf_cache import resolve_checkpoint

        speculative = HookPlan.for_engine(_dflash_config(a), resolve_checkpoint(a.draft_model))
    t0 = time.perf_counter()
    model, tokenizer, store, _ = load_moe(
        ckpt, expert_residency=residency, expert_cache_gb=a.expert_cache_gb, eviction_policy=a.eviction_policy,
        direct_io=a.direct_io or None, progress=a.verbose, revision=a.revision, speculative=speculative,
        pin_experts=a.pin_experts,
    )
    load_s = time.perf_counter() - t0
    try:
        for token in a.extra_eos_token:
            tokenizer.add_eos_token(token)
        ids = _prompt_tokens(a, tokenizer)
        if a.verbose:
            print("=" * 10)
        parts, n, finish, ptps, gtps = [], 0, None, 0.0, 0.0
        for text, n, finish, ptps, gtps in _responses(a, model, tokenizer, ids):
            parts.append(text)
            if a.verbose:
                sys.stdout.write(text)
                sys.stdout.flush()
        if not a.verbose:
            print("".join(parts))
            return 0
        print()
        print("=" * 10)
        if n == 0:
            print("No text generated for this prompt")
            return 0
        print(f"Prompt: {len(ids)} tokens, {ptps:.3f} tokens-per-sec")
        print(f"Generation: {n} tokens, {gtps:.3f} tokens-per-sec")
        print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB")
        print(f"[mach] load {load_s:.2f}s | prompt {len(ids)} tok, {ptps:.1f} tok/s | generated {n} tok, "
              f"{gtps:.1f} tok/s | finish: {finish}", file=sys.stderr)
        s = store.stats()
        if s.residency == "streaming":
            print(f"[mach] expert bank ({s.eviction_policy}): hit rate {s.hit_rate:.1%}, {s.hits} hits, {s.misses} "
                  f"misses, {s.evictions} evictions, {s.bytes_read / 2**20:.1f} MiB read, "
                  f"{s.resident_experts}/{s.capacity_experts} slots used, {s.pinned_experts} pinned", file=sys.stderr)
    finally:
        store.close()
    return 0
