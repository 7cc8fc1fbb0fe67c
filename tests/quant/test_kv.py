"""The quantized KV cache of attention layers (`qmamba.quant.kv`, configs with a KV part such as
w8a8h4kv8): keys per channel over groups of G tokens with the group still filling in float,
values per token, against an element-by-element reference; forward, step and prefill + step
agree; every method installs it; quantized folders reload bit for bit; a Mamba-only model
ignores the KV part with one warning."""

from __future__ import annotations

import copy
import functools
import json
import logging

import pytest
import torch
import torch.nn.functional as F

import qmamba
from qmamba.models.cache import KVState
from qmamba.models.config import from_hf_dict
from qmamba.models import MambaLM
from qmamba.quant.kv import KVQuantizer, QuantizedKVState

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, G = 96, 19, 4
CALIB = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def eager_fused_scan(monkeypatch):
    monkeypatch.setenv("QMAMBA_COMPILE", "0")


@functools.lru_cache(maxsize=None)
def _float_hybrid() -> MambaLM:
    """A tiny random Granite-4.0-H (mamba, attention, mamba; each with an MoE block)."""
    from transformers import GraniteMoeHybridConfig
    hf = GraniteMoeHybridConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=16, shared_intermediate_size=24,
        num_local_experts=4, num_experts_per_tok=2, mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=8,
        mamba_d_head=8, mamba_chunk_size=4, embedding_multiplier=2.0, residual_multiplier=0.5,
        attention_multiplier=0.3, logits_scaling=3.0, rms_norm_eps=1e-6, position_embedding_type="rope",
        tie_word_embeddings=False)
    model = MambaLM(from_hf_dict(hf.to_dict()))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias", ".D")):
                continue
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        # keys with an outlier channel, as real keys have (KIVI)
        attn = model.layers[2].mixer
        assert attn.LAYER_TYPE == "attention"
        attn.k_proj.weight[3::8] *= 6
    return model.eval()


def hybrid(spec=None, method="rtn", **options) -> MambaLM:
    model = copy.deepcopy(_float_hybrid())
    if spec is not None:
        qmamba.quantize(model, spec, method=method, calib=CALIB, progress=False,
                        **({"kv_group_size": G} | options))
    return model


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def paths(model, prefill: int = 7):
    with torch.no_grad():
        fwd = model(IDS)
        cache = model.allocate_cache(2)
        step = torch.stack([model.step(IDS[:, t], cache) for t in range(LENGTH)], dim=1)
        cache2 = model.allocate_cache(2)
        pre = model(IDS[:, :prefill], cache2)
        tail = torch.stack([model.step(IDS[:, t], cache2) for t in range(prefill, LENGTH)], dim=1)
    paths.prefill_cache = cache2
    return fwd, step, torch.cat([pre, tail], dim=1), cache


# ---------------------------------------------------------------- element-by-element reference
def fp16(s: float) -> float:
    return float(torch.tensor(min(max(s, 2.0 ** -24), 65504.0)).half())


def ref_keys(k: torch.Tensor, bits: int, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes and dequantized keys: one scale per (b, head, group of G tokens, channel)."""
    qmax = 2 ** (bits - 1) - 1
    codes, deq = torch.zeros_like(k, dtype=torch.int8), torch.zeros_like(k, dtype=torch.float32)
    b, K, t, e = k.shape
    for i in range(b):
        for h in range(K):
            for g0 in range(0, t, G):
                for c in range(e):
                    col = [float(k[i, h, j, c]) for j in range(g0, g0 + G)]
                    s = fp16(max(abs(x) for x in col) / qmax)
                    for j, x in zip(range(g0, g0 + G), col):
                        q = max(-qmax, min(qmax, round(x / s)))
                        codes[i, h, j, c], deq[i, h, j, c] = q, q * s
    return codes, deq


def ref_values(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes and dequantized values: one scale per (b, head, token) over head_dim."""
    qmax = 2 ** (bits - 1) - 1
    codes, deq = torch.zeros_like(v, dtype=torch.int8), torch.zeros_like(v, dtype=torch.float32)
    b, K, t, e = v.shape
    for i in range(b):
        for h in range(K):
            for j in range(t):
                row = [float(x) for x in v[i, h, j]]
                s = fp16(max(abs(x) for x in row) / qmax)
                for c, x in enumerate(row):
                    q = max(-qmax, min(qmax, round(x / s)))
                    codes[i, h, j, c], deq[i, h, j, c] = q, q * s
    return codes, deq


def _kv(seed=0, t=12, e=8):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 2, t, e, generator=g)
    k[..., 3] *= 20                                                    # an outlier channel
    v = torch.randn(2, 2, t, e, generator=g)
    v[:, :, 5] = 0                                                     # an all-zero token
    return k, v


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_against_reference(bits):
    k, v = _kv()
    q = KVQuantizer(bits, 2, 8, group_size=G)
    kc, ks = q.quantize_keys(k)
    vc, vs = q.quantize_values(v)
    rkc, rk = ref_keys(k, bits, G)
    rvc, rv = ref_values(v, bits)
    assert torch.equal(kc, rkc) and torch.equal(vc, rvc)
    assert torch.equal(q.dequantize_keys(kc, ks), rk) and torch.equal(q.dequantize_values(vc, vs), rv)
    assert ks.shape == (2, 2, 12 // G, 8) and vs.shape == (2, 2, 12, 1)
    assert kc.abs().max() == 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", [8, 4])
def test_cache_stores_codes_and_window(bits):
    """Prefill 6 tokens then one at a time: the cache holds the complete key groups as codes (two
    per byte at 4 bits), the rest of the keys in float, every value as codes; reading it back
    gives the reference."""
    k, v = _kv(t=11)
    q = KVQuantizer(bits, 2, 8, group_size=G)
    state = q.allocate(2, torch.float32, "cpu")
    assert isinstance(state, QuantizedKVState)
    q.attend(k[:, :, :6], v[:, :, :6], state)
    for t in range(6, 11):
        q.attend(k[:, :, t:t + 1], v[:, :, t:t + 1], state)
    assert state.length == 11
    cols, dtype = (8, torch.int8) if bits == 8 else (4, torch.uint8)
    assert state.k_codes.shape == (2, 2, 8, cols) and state.k_codes.dtype == dtype
    assert state.v_codes.shape == (2, 2, 11, cols) and state.v_codes.dtype == dtype
    assert state.k_scales.dtype == state.v_scales.dtype == torch.float16
    assert torch.equal(state.window, k[:, :, 8:])                      # the group still filling
    assert torch.equal(state.keys(), ref_keys(k[:, :, :8], bits, G)[1])
    assert torch.equal(state.values(), ref_values(v, bits)[1])
    n = state.tensors()
    expected = 2 * 2 * (8 * cols + 11 * cols) + 2 * 2 * (2 * 8 + 11) * 2 + 3 * 2 * 2 * 8 * 4
    assert sum(t.numel() * t.element_size() for t in n.values()) == expected
    assert all(name.startswith("kv.") for name in n)


@pytest.mark.parametrize("bits", [8, 4])
def test_attention_reads_what_decode_meets(bits):
    """A query at position i reads key j quantized once j's group is complete at i, in float
    before, and every value quantized: the forward equals this per-query reference and
    token-by-token decode through the integer cache."""
    torch.manual_seed(0)
    attn = copy.deepcopy(_float_hybrid().layers[2].mixer).double()
    attn.kv_quant = KVQuantizer(bits, 2, 8, group_size=G)
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    with torch.no_grad():
        fwd = attn(x)
        state = attn.allocate_state(2, torch.float64, "cpu")
        step = torch.stack([attn.step(x[:, t], state) for t in range(13)], dim=1)
        state2 = attn.allocate_state(2, torch.float64, "cpu")
        pre = torch.cat([attn(x[:, :5], state2), attn(x[:, 5:6], state2), attn(x[:, 6:], state2)], dim=1)
        # the reference: float keys and values of the whole sequence, quantized by the reference
        k = attn._rope(attn.k_proj(x).view(2, 13, 2, 8).transpose(1, 2), 0)
        v = attn.v_proj(x).view(2, 13, 2, 8).transpose(1, 2)
        q = attn._rope(attn.q_proj(x).view(2, 13, 4, 8).transpose(1, 2), 0)
        kq = k.clone()
        kq[:, :, :12] = ref_keys(k[:, :, :12], bits, G)[1].double()
        vq = ref_values(v, bits)[1].double()
        out = torch.zeros(2, 13, 4, 8, dtype=torch.float64)
        for i in range(13):
            keys = torch.stack([kq[:, :, j] if (j // G + 1) * G <= i + 1 else k[:, :, j] for j in range(i + 1)], 2)
            keys, vals = keys.repeat_interleave(2, dim=1), vq[:, :, :i + 1].repeat_interleave(2, dim=1)
            p = torch.softmax((q[:, :, i:i + 1] @ keys.transpose(2, 3)) * attn.scale, dim=-1)
            out[:, i] = (p @ vals)[:, :, 0]
        ref = attn.o_proj(out.reshape(2, 13, 32))
    assert rel(fwd, ref) < 1e-6                                         # attention's softmax runs in float32
    assert rel(step, fwd) < 1e-12 and rel(pre, fwd) < 1e-12
    float_out = copy.deepcopy(attn)
    float_out.kv_quant = None
    assert rel(fwd, float_out(x).detach()) > (1e-4 if bits == 8 else 1e-3)   # it does quantize


@pytest.mark.parametrize("spec", ["w8a8h4kv8", "w8a8h4kv4", "kv4"])
def test_model_forward_step_prefill_agree(spec):
    model = hybrid(spec)
    fwd, step, prefill, cache = paths(model)
    assert rel(step, fwd) <= 1e-5 and rel(prefill, fwd) <= 1e-5
    kv = cache[2]
    assert isinstance(kv, QuantizedKVState) and kv.length == LENGTH
    stored, other = kv.tensors(), paths.prefill_cache[2].tensors()       # decode and prefill + decode
    assert all(torch.equal(stored[name], other[name]) for name in stored)   # store the same codes
    bits = int(spec.split("kv")[1])
    cols = 8 if bits == 8 else 4
    full = LENGTH // G * G
    assert cache.nbytes()["kv"] == (2 * 2 * (full + LENGTH) * cols + 2 * 2 * (full // G * 8 + LENGTH) * 2
                                    + 2 * 2 * (LENGTH - full) * 8 * 4)
    assert model.layers[2].mixer.kv_quant.token_bytes(2) * full == (        # per token once complete
        2 * 2 * 2 * full * cols + 2 * 2 * full * 2 + 2 * 2 * full // G * 8 * 2)


def kld(model, ref_logits) -> float:
    with torch.no_grad():
        out = model(IDS)
    return float(F.kl_div(out.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True,
                          reduction="batchmean"))


def test_kld_kv8_below_kv4():
    with torch.no_grad():
        ref = hybrid()(IDS)
    k8, k4 = kld(hybrid("kv8"), ref), kld(hybrid("kv4"), ref)
    assert 0 < k8 < k4


@pytest.mark.parametrize("method, spec", [("rtn", "w8a8h8kv4"), ("smoothquant", "w8a8kv4"),
                                          ("quamba", "w8a8h8kv4"), ("dsq", "w8a8h8kv4"),
                                          ("qmamba", "w8a8h8kv4")])
def test_every_method_installs_it(method, spec):
    model = hybrid(spec, method=method)
    kvq = [b.mixer.kv_quant for b in model.layers if b.layer_type == "attention"]
    assert kvq and all(isinstance(q, KVQuantizer) and q.bits == 4 and q.group_size == G for q in kvq)
    assert model.quant_config.kv_bits == 4
    fwd, step, prefill, _ = paths(model)
    assert rel(step, fwd) <= 1e-4 and rel(prefill, fwd) <= 1e-4


@pytest.mark.parametrize("spec", ["w8a8h4kv8", "w4a8kv4"])
def test_save_reload_bit_exact(spec, tmp_path):
    from qmamba.quant.checkpoint import save_quantized
    model = hybrid(spec)
    with torch.no_grad():
        out = model(IDS)
    save_quantized(model, tmp_path / "q")
    again = qmamba.load(tmp_path / "q").model
    assert again.quant_config == model.quant_config
    q = again.layers[2].mixer.kv_quant
    assert isinstance(q, KVQuantizer) and q.group_size == G
    fwd, step, _, cache = paths(again)
    assert torch.equal(fwd, out)
    assert isinstance(cache[2], QuantizedKVState)
    meta = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    meta = meta.get("qmamba", meta)
    assert meta["kv_bits"] == model.quant_config.kv_bits and meta["kv_group_size"] == G
    assert any(f"KV{meta['kv_bits']} cache" in line for line in meta.get("not_in_compressed_tensors", [""]))


def test_mamba_only_model_ignores_kv_part_with_a_warning(caplog):
    from qmamba.models.config import ModelConfig
    from qmamba.models import init_weights
    cfg = ModelConfig(arch="mamba2", vocab_size=VOCAB, d_model=32, n_layer=1, d_state=16, headdim=16,
                      chunk_size=8)
    base = init_weights(MambaLM(cfg), 0).eval()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    qmamba.quantize(a, "w8a8h4", method="rtn", calib=CALIB, progress=False)
    with caplog.at_level(logging.WARNING, logger="qmamba.quant.apply"):
        qmamba.quantize(b, "w8a8h4kv8", method="rtn", calib=CALIB, progress=False)
    msgs = [r.getMessage() for r in caplog.records if r.name == "qmamba.quant.apply"]
    assert len(msgs) == 1 and "no attention layers" in msgs[0] and "KV8" in msgs[0]
    assert not any(isinstance(m, KVQuantizer) for m in b.modules())
    with torch.no_grad():
        assert torch.equal(a(IDS), b(IDS))


def test_off_mode_is_float():
    from qmamba.quant.apply import set_quant_mode
    model, ref = hybrid("kv4"), hybrid()
    set_quant_mode(model, "off")
    with torch.no_grad():
        assert torch.equal(model(IDS), ref(IDS))
        assert isinstance(model.allocate_cache(2)[2], KVState)
