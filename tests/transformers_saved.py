"""Checkpoints saved by the installed transformers exactly as it saves them (``save_pretrained``, no key or
config rewriting), built at test time with torch on the CPU, and transformers' own logits for them.

One builder per family and layout; each returns the transformers model (fp32, eager attention) and writes the
checkpoint plus the shared test tokenizer into a directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOKENIZER_SRC = Path(__file__).parent / "fixtures" / "hf_qwen3_moe"
PROMPT_IDS = [100, 7, 300, 42, 511, 3, 250, 99, 18, 400, 64, 5]
V = 512


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, intermediate_size=96,
                         moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1],
                         norm_topk_prob=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                         tie_word_embeddings=False)
    return Qwen3MoeForCausalLM(cfg)


def _qwen3_5_text_config():
    return dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=2, num_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [1, 1, 0], "mrope_interleaved": True},
                tie_word_embeddings=False)


def _qwen3_5_moe_text():
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    return Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**_qwen3_5_text_config()))


def _qwen3_5_moe():
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, out_hidden_size=64,
                  num_position_embeddings=16)
    cfg = Qwen3_5MoeConfig(text_config=_qwen3_5_text_config(), vision_config=vision, tie_word_embeddings=False,
                           image_token_id=V - 1, video_token_id=V - 2, vision_start_token_id=V - 3,
                           vision_end_token_id=V - 4)
    return Qwen3_5MoeForConditionalGeneration(cfg)


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, intermediate_size=32, head_dim=16,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                       sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                       tie_word_embeddings=False)
    return GptOssForCausalLM(cfg)


def _gemma4_text_config():
    return dict(vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                attention_k_eq_v=True, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                final_logit_softcapping=30.0, hidden_size_per_layer_input=0, vocab_size_per_layer_input=V,
                num_kv_shared_layers=0, enable_moe_block=True, num_experts=8, top_k_experts=2,
                moe_intermediate_size=16, tie_word_embeddings=True)


def _gemma4():
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64)
    cfg = Gemma4Config(text_config=_gemma4_text_config(), vision_config=vision, audio_config=None,
                       boi_token_id=V - 1, eoi_token_id=V - 2, image_token_id=V - 3, video_token_id=V - 4,
                       boa_token_id=V - 5, eoa_token_index=V - 6, audio_token_id=V - 7)
    return Gemma4ForConditionalGeneration(cfg)


def _gemma4_text():
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    return Gemma4ForCausalLM(Gemma4TextConfig(**_gemma4_text_config()))


def _deepseek_v4():
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(
        vocab_size=V, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
        head_dim=16, q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=8, hc_mult=4, sliding_window=4,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"], mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        o_groups=2, o_lora_rank=16, index_n_heads=8, index_head_dim=8, index_topk=3, partial_rotary_factor=0.5,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "beta_fast": 32, "beta_slow": 1},
        swiglu_limit=0.5, num_nextn_predict_layers=1, max_position_embeddings=256, tie_word_embeddings=False)
    return DeepseekV4ForCausalLM(cfg)


BUILDERS = {  # name -> (arch, builder)
    "qwen3_moe": ("qwen3_moe", _qwen3_moe),
    "qwen3_5_moe": ("qwen3_5_moe", _qwen3_5_moe),
    "qwen3_5_moe_text": ("qwen3_5_moe", _qwen3_5_moe_text),
    "gpt_oss": ("gpt_oss", _gpt_oss),
    "gemma4": ("gemma4", _gemma4),
    "gemma4_text": ("gemma4", _gemma4_text),
    "deepseek_v4": ("deepseek_v4", _deepseek_v4),
}


def save_transformers_checkpoint(name: str, out: Path, seed: int = 0):
    """Builds family ``name`` with transformers (fp32, seeded default init), ``save_pretrained``s it to ``out``
    untouched, adds the test tokenizer; returns (arch, transformers logits [T, V] for PROMPT_IDS as numpy)."""
    import torch

    arch, build = BUILDERS[name]
    torch.manual_seed(seed)
    model = build().to(torch.float32).eval()
    model.config._attn_implementation = "eager"
    for sub in ("text_config", "vision_config"):
        if getattr(model.config, sub, None) is not None:
            getattr(model.config, sub)._attn_implementation = "eager"
    with torch.no_grad():
        for n, p in model.named_parameters():  # visible norm weights and routers (defaults are flat)
            if p.dim() == 1 and n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape))
            if n.endswith(("mlp.gate.weight", "router.weight", "router.proj.weight")):
                p.normal_(0.0, 0.5)
        model.save_pretrained(out)
        logits = model(torch.tensor([PROMPT_IDS])).logits[0].float().numpy()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_SRC / f, out / f)
    return arch, logits
