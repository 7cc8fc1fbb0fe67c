"""Configurations of real checkpoints, for memory reports and benchmarks with random weights
(the hub is not always reachable; shapes are what those measurements need). Values from the
checkpoints' config.json files (mamba_ssm vocabularies padded as mamba_ssm pads them)."""

from __future__ import annotations

import dataclasses

from .config import ModelConfig, from_hf_dict

_M1 = dict(arch="mamba1", vocab_size=50280, d_state=16, d_conv=4, expand=2)
_M2 = dict(arch="mamba2", vocab_size=50288, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1,
           chunk_size=256)

SHAPES = {
    "mamba-130m": dict(_M1, d_model=768, n_layer=24),
    "mamba-370m": dict(_M1, d_model=1024, n_layer=48),
    "mamba-2.8b": dict(_M1, d_model=2560, n_layer=64),
    "mamba2-130m": dict(_M2, d_model=768, n_layer=24),
    "mamba2-370m": dict(_M2, d_model=1024, n_layer=48),
    "mamba2-1.3b": dict(_M2, d_model=2048, n_layer=48),
    "mamba2-2.7b": dict(_M2, d_model=2560, n_layer=64),
    # nvidia/mamba2-8b-3t-4k (Waleffe et al. 2024, "An Empirical Study of Mamba-based Language
    # Models", Mamba-2 8B): 56 layers, d_model 4096, state 128, head 64, 8 groups, vocabulary
    # 256000 (its 256K SentencePiece tokenizer), untied head (Megatron-LM's default). ~8.2e9
    # parameters, 16.5 GB in bf16
    "mamba2-8b": dict(_M2, vocab_size=256000, d_model=4096, n_layer=56, ngroups=8, tie_embeddings=False),
    # mistralai/Mamba-Codestral-7B-v0.1: 128 heads of 64, 8 groups, vocabulary 32768
    "codestral-mamba-7b": dict(_M2, vocab_size=32768, d_model=4096, n_layer=64, ngroups=8),
}


# ------------------------------------------------------------------------------------ hybrids
# The checkpoints' config.json fields that set a tensor's shape (the hub is not reachable here).
# Sources: the fields as quoted in public code (NVIDIA Megatron-Bridge's model providers, which
# convert these checkpoints; model cards; HF-config fixtures of public memory estimators). Values
# marked "inferred" are not quoted by any source found; none of them changes a byte count except
# where said. Checked against the published sizes in tests/quant/test_memory_hybrid.py.

# nvidia/Nemotron-H-8B-Base-8K: 52 layers, hidden 4096, ffn 21504, 32 query heads, 8 KV groups,
# pattern (24 M, 24 -, 4 *) from Megatron-Bridge's NemotronHModel8BProvider; mamba 128 heads x 64,
# state 128, 8 groups, conv 4, expand 2, attention_head_dim 128 as its config.json is quoted;
# vocabulary 131072 (Nemotron-H's). chunk_size 128 inferred (transformers' default; no bytes).
# 8.10e9 parameters (the model card: 8B).
NEMOTRON_H_8B = dict(
    model_type="nemotron_h", vocab_size=131072, hidden_size=4096, num_hidden_layers=52,
    hybrid_override_pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
    intermediate_size=21504, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    mamba_num_heads=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, expand=2,
    chunk_size=128, tie_word_embeddings=False, use_conv_bias=True, use_bias=False, mlp_bias=False,
    attention_bias=False, layer_norm_epsilon=1e-5)

# nvidia/NVIDIA-Nemotron-Nano-9B-v2: 56 layers, hidden 4480, ffn 15680, 40 query heads, 8 KV heads
# of 128, pattern (27 M, 25 -, 4 *), mamba 128 heads x 80, state 128, 8 groups, conv 4, vocabulary
# 131072, untied: config.json as quoted by public code and Megatron-Bridge's
# NemotronNanoModelProvider9Bv2. chunk_size 128 inferred (no bytes). 8,888,227,328 parameters
# (the checkpoint's count as published: "9B").
NEMOTRON_NANO_9B_V2 = dict(
    NEMOTRON_H_8B, hidden_size=4480, num_hidden_layers=56,
    hybrid_override_pattern="M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-",
    intermediate_size=15680, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
    mamba_num_heads=128, mamba_head_dim=80)

# ibm-granite/granite-4.0-h-tiny: 40 layers (36 mamba, 4 attention at 5, 15, 25, 35), hidden 1536,
# 12 heads, 4 KV heads, 64 experts of 512 (top 6), shared expert 1024, mamba 48 heads x 64, state
# 128, 1 group, conv 4, expand 2, vocabulary 100352, tied: config.json as quoted by public code.
# ~6.9e9 parameters, 1e9 active (the model card: 7B total, 1B active).
_GRANITE_ATTN = (5, 15, 25, 35)
GRANITE_4_H_TINY = dict(
    model_type="granitemoehybrid", vocab_size=100352, hidden_size=1536, num_hidden_layers=40,
    layer_types=["attention" if i in _GRANITE_ATTN else "mamba" for i in range(40)],
    num_attention_heads=12, num_key_value_heads=4, intermediate_size=512, shared_intermediate_size=1024,
    num_local_experts=64, num_experts_per_tok=6, mamba_n_heads=48, mamba_d_head=64, mamba_d_state=128,
    mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256, tie_word_embeddings=True,
    position_embedding_type="nope")

# ibm-granite/granite-4.0-h-small: 40 layers (36 mamba, 4 attention), hidden 4096, 32 heads, 8 KV
# heads, 72 experts of 768 (top 10), shared expert 1536, state 128, conv 4, expand 2, vocabulary
# 100352, tied: config.json as quoted by public code. Inferred: mamba 128 heads x 64 and 1 group
# (Granite-4.0-H's head size and group count; quoted only by a memory estimator's fixture of this
# shape), and the attention layers' positions (Tiny's; positions change no byte). ~32.2e9
# parameters, ~9e9 active (the model card: 32B total, 9B active).
GRANITE_4_H_SMALL = dict(
    GRANITE_4_H_TINY, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
    intermediate_size=768, shared_intermediate_size=1536, num_local_experts=72, num_experts_per_tok=10,
    mamba_n_heads=128, mamba_d_head=64)

HYBRID_SHAPES = {
    "nemotron-h-8b": NEMOTRON_H_8B,
    "nemotron-nano-9b-v2": NEMOTRON_NANO_9B_V2,
    "granite-4.0-h-tiny": GRANITE_4_H_TINY,
    "granite-4.0-h-small": GRANITE_4_H_SMALL,
}
SHAPES.update({name: dataclasses.asdict(from_hf_dict(cfg)) for name, cfg in HYBRID_SHAPES.items()})


def shape_config(name: str) -> ModelConfig:
    return ModelConfig(**SHAPES[name])
