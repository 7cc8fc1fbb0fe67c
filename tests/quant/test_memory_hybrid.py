"""Memory of the hybrids (qmamba.eval.memory and `qmamba memory --context`): weights by part, the
KV cache of the attention layers measured on the meta device (the cache each layer allocates,
fed meta tokens), conv and SSM state, and the shapes of the real checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from qmamba.cli import main
from qmamba.eval.memory import (cast_float_weights, context_state_bytes, memory_report, weight_bytes,
                                weight_parts)
from qmamba.methods import resolve_config
from qmamba.methods.checkpoint import build_structure
from qmamba.models import MambaLM
from qmamba.models.config import from_hf_dict
from qmamba.models.shapes import HYBRID_SHAPES, shape_config

VOCAB = 64
# a tiny Nemotron-H: two Mamba2 layers, two attention layers (GQA: 4 heads, 2 KV heads of 8), an
# MLP and a MoE layer
NEMO = dict(model_type="nemotron_h", vocab_size=VOCAB, hidden_size=32, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, intermediate_size=48, ssm_state_size=8, mamba_num_heads=8,
            mamba_head_dim=8, n_groups=2, conv_kernel=4, hybrid_override_pattern="M*-M*E",
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=16, tie_word_embeddings=False)
KV_HEADS, HEAD_DIM, ATTN, MAMBA = 2, 8, 2, 2
GROUP = 32                      # QuantConfig.kv_group_size's default: tokens per key scale


def real_model() -> MambaLM:
    torch.manual_seed(0)
    model = MambaLM(from_hf_dict(NEMO))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def meta_model(spec):
    """The tiny hybrid on the meta device, quantized for `spec` (None: float), float weights in
    float16: what `qmamba memory` measures."""
    cfg = from_hf_dict(NEMO)
    model = build_structure(cfg, resolve_config(spec, "qmamba") if spec else None, "qmamba")
    return cast_float_weights(model, torch.float16)


def hand_kv(spec, batch: int, tokens: int) -> int:
    """The KV cache in bytes, by hand: FP16 keys and values; at KV8 / KV4 (qmamba.quant.kv)
    codes (1 byte, or two codes a byte), keys with one fp16 scale per (kv head, channel) per
    complete group of GROUP tokens and the incomplete group in fp16, values with one fp16 scale
    per (token, kv head)."""
    bits = None if spec is None else resolve_config(spec, "qmamba").kv_bits
    per_seq_head = 2 * tokens * HEAD_DIM * 2                           # fp16 k and v
    if bits is not None:
        codes = HEAD_DIM * bits // 8
        full = tokens // GROUP * GROUP
        keys = full * codes + (full // GROUP) * HEAD_DIM * 2 + (tokens - full) * HEAD_DIM * 2
        values = tokens * codes + tokens * 2
        per_seq_head = keys + values
    return ATTN * batch * KV_HEADS * per_seq_head


def hand_states(spec, batch: int) -> dict:
    """Conv and SSM state in bytes, by hand: fp16 (a float model's dtype) or, with H4 DSQ, packed
    4-bit codes plus one fp16 scale per channel row, and the conv state in int8 (static A8)."""
    cfg = from_hf_dict(NEMO)
    d, n = cfg.d_inner, cfg.d_state
    conv = MAMBA * batch * cfg.conv_dim * (cfg.d_conv - 1)
    h4 = spec is not None and "h4" in spec
    ssm = MAMBA * batch * (d * n // 2 + d * 2) if h4 else MAMBA * batch * d * n * 2
    a8 = spec is not None and "a8" in spec
    return {"conv": conv if a8 else 2 * conv, "ssm": ssm}


SPECS = [None, "w8a8", "w8a8h4", "w8a8h4kv8", "w8a8h4kv4"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("tokens", [0, 5, 32, 77])
def test_meta_kv_bytes_match_a_hand_formula(spec, batch, tokens):
    model = meta_model(spec)
    assert next(model.parameters()).device.type == "meta"
    kv = context_state_bytes(model, batch, tokens)
    assert kv["by_kind"].get("kv", 0) == hand_kv(spec, batch, tokens)
    quantizers = [m.kv_quant for m in model.mixers() if getattr(m, "kv_quant", None) is not None]
    assert len(quantizers) == (ATTN if spec and "kv" in spec else 0)
    if quantizers and tokens % GROUP == 0:                  # the quantizer's own per-token count
        assert kv["by_kind"]["kv"] == sum(q.token_bytes(batch) for q in quantizers) * tokens
    r = memory_report(model, (batch,), contexts=(tokens,))["contexts"][str(tokens)][str(batch)]
    assert r["bytes"]["kv"] == hand_kv(spec, batch, tokens)
    assert r["fp16"]["kv"] == hand_kv(None, batch, tokens)
    states = hand_states(spec, batch)
    assert (r["bytes"]["conv"], r["bytes"]["ssm"]) == (states["conv"], states["ssm"])
    assert (r["fp16"]["conv"], r["fp16"]["ssm"]) == (hand_states(None, batch)["conv"], hand_states(None, batch)["ssm"])
    assert r["bytes"]["total"] == r["bytes"]["weights"] + r["bytes"]["kv"] + states["conv"] + states["ssm"]
    assert sum(r["share"].values()) == pytest.approx(1.0)
    assert r["ratio"] == pytest.approx(r["bytes"]["total"] / r["fp16"]["total"])


def test_meta_kv_bytes_are_what_a_real_prefill_holds():
    """The meta count is the bytes of the cache a real model fills by running `tokens` tokens."""
    cfg = from_hf_dict(NEMO)
    model = real_model()
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(0))
    cache = model.allocate_cache(2)
    with torch.no_grad():
        model(ids, cache)
    assert cache.nbytes()["kv"] == context_state_bytes(model, 2, 37)["by_kind"]["kv"] == \
        ATTN * 2 * KV_HEADS * 2 * 37 * HEAD_DIM * 4                     # float32 model
    with torch.device("meta"):
        meta = MambaLM(cfg)
    assert context_state_bytes(meta, 2, 37) == context_state_bytes(model, 2, 37)


def test_quantized_kv_meta_bytes_are_what_a_real_prefill_holds():
    from qmamba.quantize import quantize

    calib = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    model = quantize(real_model(), "w8a8h4kv4", calib=calib, method="rtn", progress=False)
    ids = torch.randint(0, VOCAB, (2, 45), generator=torch.Generator().manual_seed(0))
    cache = model.allocate_cache(2)
    with torch.no_grad():
        model(ids, cache)
    meta = context_state_bytes(model, 2, 45)
    assert cache.nbytes()["kv"] == meta["by_kind"]["kv"]
    dtype_bytes = model.backbone.norm_f.weight.element_size()           # the float window's dtype
    assert meta["by_tensor"]["kv.k_window"] == ATTN * 2 * KV_HEADS * (45 - 32) * HEAD_DIM * dtype_bytes


@pytest.mark.parametrize("spec", [None, "w8a8h4", "w8a8h4kv8", "w8a8h4kv4"])
def test_kv_grows_with_the_context_and_the_ssm_state_does_not(spec):
    model = meta_model(spec)
    r = memory_report(model, (1, 4), contexts=(256, 512, 1024))["contexts"]
    for b in ("1", "4"):
        kv = [r[c][b]["bytes"]["kv"] for c in ("256", "512", "1024")]
        assert kv[1] == 2 * kv[0] and kv[2] == 4 * kv[0] > 0
        for part in ("weights", "ssm", "conv"):
            assert len({r[c][b]["bytes"][part] for c in r}) == 1           # constant in the context
        assert r["1024"][b]["share"]["kv"] > r["256"][b]["share"]["kv"]
    for part in ("kv", "ssm", "conv"):                                    # linear in the batch
        assert r["512"]["4"]["bytes"][part] == 4 * r["512"]["1"]["bytes"][part]
    assert r["512"]["4"]["bytes"]["weights"] == r["512"]["1"]["bytes"]["weights"]


def test_weight_parts():
    cfg = from_hf_dict(NEMO)
    d, V, h = cfg.d_model, cfg.vocab_size, cfg.hybrid
    for spec in (None, "w8a8h4"):
        model = meta_model(spec)
        parts = weight_parts(model)
        assert sum(parts.values()) == weight_bytes(model)["total"]
        assert parts["embedding"] == 2 * V * d * 2                        # untied embedding and head, fp16
        assert parts["router"] > 0 and parts["norms"] > 0
    q = memory_report(meta_model("w8a8h4"))["weights"]
    assert q["parts_fp16"]["embedding"] == q["parts"]["embedding"]       # not quantized without --quantize-head
    # one MoE layer: a sigmoid router of n_experts x d_model and its score-correction bias, kept in float
    router = h["n_experts"] * (d + 1)
    assert q["parts_fp16"]["router"] == router * 2 and q["parts"]["router"] in (router * 2, router * 4)
    assert 0.5 < q["parts"]["linears"] / q["parts_fp16"]["linears"] < 0.6


# ------------------------------------------------------------------------------- real shapes
PUBLISHED = {                     # parameters as published (model cards, checkpoint sizes)
    "nemotron-h-8b": (8.1e9, 0.01),
    "nemotron-nano-9b-v2": (8_888_227_328, 0),
    "granite-4.0-h-tiny": (6.94e9, 0.005),            # 12.93 GiB of bf16 safetensors
    "granite-4.0-h-small": (32.21e9, 0.005),          # 59.99 GiB of bf16 safetensors
}


@pytest.mark.parametrize("name", sorted(HYBRID_SHAPES))
def test_hybrid_shapes_have_the_published_size(name):
    cfg = shape_config(name)
    with torch.device("meta"):
        params = MambaLM(cfg).num_parameters()
    size, tol = PUBLISHED[name]
    assert params == pytest.approx(size, rel=tol) if tol else params == size
    assert cfg.layer_types.count("attention") == 4


def test_cli_memory_context_on_a_hybrid_shape(tmp_path, capsys):
    out = tmp_path / "mem.json"
    assert main(["memory", "nemotron-h-8b", "--quant", "w8a8h4", "--batch", "1,64", "--context", "4k,131072",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    c = r["contexts"]["131072"]["64"]
    # 4 attention layers x 2 (k, v) x 8 KV heads x 128 x 2 bytes = 16 KiB per token
    assert c["bytes"]["kv"] == c["fp16"]["kv"] == 4 * 2 * 8 * 128 * 2 * 131072 * 64
    assert c["fp16"]["ssm"] == 24 * 64 * 8192 * 128 * 2
    assert r["contexts"]["4096"]["1"]["bytes"]["kv"] == 16384 * 4096
    assert "context 131,072 x batch 64" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "-4", "x", "4x", "", ",", "1.5k"])
def test_cli_memory_bad_context(value, capsys):
    assert main(["memory", "mamba2-130m", "--context", value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qmamba memory: error:") and "--context" in err
