"""What ``Runtime.open`` builds beside the model (on the MLX thread where it touches MLX): the speculative engines
sharing the runtime's model, the prefix cache with its identity salt, the request vocabulary bound."""

from __future__ import annotations

import os

from mach_runtime.errors import ConfigError


def vocab_size(tokenizer, text_config: dict) -> int | None:
    sizes = [n for n in (text_config.get("vocab_size"),) if isinstance(n, int) and not isinstance(n, bool) and n > 0]
    try:
        sizes.append(len(tokenizer))
    except TypeError:
        pass
    return min(sizes) if sizes else None


def prefix_cache(conf, checkpoint, draft, layout: dict):
    """The PrefixCache for ``conf``; its identity salt names the model, the cache layout and the draft."""
    from mach_runtime.engine.disk_kv_cache import DiskKVCache
    from mach_runtime.engine.prefix_cache import PrefixCache
    from mach_runtime.engine.prefix_keys import model_fingerprint, prefix_salt

    draft = _local_draft(draft)
    draft_fp = model_fingerprint(draft) if draft is not None else None
    salt = prefix_salt(model_fingerprint(checkpoint), {"format": 1, **layout}, draft_fp)
    disk = None
    if conf.directory is not None:
        try:
            disk = DiskKVCache(conf.directory, salt, conf.block_size, conf.disk_budget_bytes)
        except OSError as e:
            raise ConfigError(f"prefix_cache_dir {conf.directory!r}: cannot use it ({e}); give a writable "
                              "directory") from None
    return PrefixCache(salt, conf.block_size, conf.l1_bytes, conf.max_entries, disk, shared=conf.enabled)


def on_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.gpu


def _local_draft(draft):
    """A draft checkpoint directory (a repository id: its local Hugging Face cache snapshot)."""
    if draft is not None and not os.path.isdir(os.fspath(draft)):
        from mach_runtime.io.hf_cache import resolve_checkpoint

        return resolve_checkpoint(draft)
    return draft


def hook_plan(draft, config):
    """The hooks ``load_moe`` installs for the speculative engines of ``draft`` / ``config`` (engine/hooks.py)."""
    from mach_runtime.engine.hooks import HookPlan

    return HookPlan.for_engine(config, _local_draft(draft))


def spec_engine(model, tokenizer, store, draft, config):
    """The BlockSpecDecEngine sharing the runtime's model (built on the MLX thread)."""
    from mach_runtime.engine.specdec import BlockSpecDecEngine, BlockSpecDecEngineConfig, BlockSpecDecEngineMode
    from mach_runtime.engine.specdec.draft import load_dflash_draft

    if config is None:
        config = BlockSpecDecEngineConfig(mode=BlockSpecDecEngineMode.NATIVE_V7)
    draft_model = load_dflash_draft(draft) if draft is not None else None
    return BlockSpecDecEngine(model, tokenizer, draft_model, config=config, store=store)


def spec_batch(model, tokenizer, store, spec, n: int):
    """The BatchedSpecDecoder sharing the runtime's model, draft and speculative config (only where the family's
    capabilities allow ``spec_batch``)."""
    from mach_runtime.engine.specdec.batched import BatchedSpecDecoder

    return BatchedSpecDecoder(model, tokenizer, spec.draft, config=spec.config, store=store, max_batch=n,
                              target=spec.target)


def no_prefix(conf):
    """A distributed runtime's prefix-cache settings: off (KV only rank 0 held would put the ranks out of step)."""
    import dataclasses

    return dataclasses.replace(conf, enabled=False, directory=None)


def follow(dist, model, tokenizer, caps, max_batch, spec, spec_batch, prefill_chunk) -> None:
    """A rank > 0 of a distributed runtime: takes rank 0's steps until it shuts down (MLX thread)."""
    from .distributed import run_follower

    run_follower(model, tokenizer, caps=caps, max_batch=max_batch, spec=spec, spec_batch=spec_batch,
                 prefill_chunk=prefill_chunk, sync=dist.sync)
