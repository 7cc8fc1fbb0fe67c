"""Nemotron-H and Granite-4.0-H (hybrids of Mamba2, attention, MLP and MoE layers) against
transformers' own implementations, on tiny random configs saved with `save_pretrained` and read
by `qmamba.load`: the parallel forward, token-by-token decode and prefill followed by decode, to
1e-5 relative logit error (max |diff| / max |logit|) in float32.

transformers versions: Nemotron-H (`nemotron_h`) exists in transformers 5.x only (4.57 has no
such model). Granite-4.0-H (`granitemoehybrid`) exists in both, but 4.57 normalises the Mamba2
gated RMSNorm over all of d_inner (5.x per group of d_inner / n_groups, as mamba_ssm and qmamba),
so under 4.57 it is compared with n_groups 1 only.
Also: hybrid config errors (one line, QMambaError), sharded safetensors, and the KV cache.
"""

from __future__ import annotations

import json

import pytest
import torch

import qmamba
from qmamba.errors import QMambaError
from qmamba.models.config import from_hf_dict
from qmamba.models.hf_compat import installed_version

transformers = pytest.importorskip("transformers")
V = installed_version() or (0,)
HAS_NEMOTRON = hasattr(transformers, "NemotronHConfig")
needs_nemotron = pytest.mark.skipif(not HAS_NEMOTRON, reason="transformers has no nemotron_h (added in 5.x)")
VOCAB, LENGTH, PREFILL, BOUND = 96, 11, 6, 1e-5


def _randomize(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias", ".D")):
                continue
            if name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def nemotron(tmp_path, **over):
    from transformers import NemotronHConfig, NemotronHForCausalLM
    kw = dict(vocab_size=VOCAB, hidden_size=32,
              layers_block_type=["mamba", "attention", "mlp", "moe", "mamba", "moe"],
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
              ssm_state_size=8, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, chunk_size=4,
              n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
              moe_shared_expert_intermediate_size=24, n_group=2, topk_group=1, routed_scaling_factor=1.5,
              layer_norm_epsilon=1e-5, tie_word_embeddings=False)
    kw.update(over)
    torch.manual_seed(0)
    hf = _randomize(NemotronHForCausalLM(NemotronHConfig(**kw)), 1).eval()
    hf.save_pretrained(tmp_path)
    return hf


def granite(tmp_path, n_groups=2, rope=True, experts=4, **over):
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
              num_attention_heads=4, num_key_value_heads=2, intermediate_size=16, shared_intermediate_size=24,
              num_local_experts=experts, num_experts_per_tok=2, mamba_n_heads=8, mamba_n_groups=n_groups,
              mamba_d_state=8, mamba_d_head=8, mamba_chunk_size=4, embedding_multiplier=2.0,
              residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=3.0, rms_norm_eps=1e-6,
              position_embedding_type="rope" if rope else None, tie_word_embeddings=False)
    kw.update(over)
    torch.manual_seed(0)
    hf = _randomize(GraniteMoeHybridForCausalLM(GraniteMoeHybridConfig(**kw)), 2).eval()
    hf.save_pretrained(tmp_path)
    return hf


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def hf_decode(hf, ids, prefill: int):
    """transformers' own cached decode: the first `prefill` tokens at once, then one at a time."""
    v5 = V >= (5,)
    key = "cache" if v5 else "past_key_values"
    kw = {}
    if not v5:                                   # 4.57's Granite wants its hybrid cache given
        from transformers.models.granitemoehybrid.modeling_granitemoehybrid import HybridMambaAttentionDynamicCache
        kw = {key: HybridMambaAttentionDynamicCache(hf.config, ids.shape[0], dtype=torch.float32),
              "cache_position": torch.arange(prefill)}
    out = hf(input_ids=ids[:, :prefill], use_cache=True, **kw)
    logits = [out.logits]
    for t in range(prefill, ids.shape[1]):
        kw = {key: getattr(out, key)} if v5 else {key: getattr(out, key), "cache_position": torch.tensor([t])}
        out = hf(input_ids=ids[:, t:t + 1], use_cache=True, **kw)
        logits.append(out.logits)
    return torch.cat(logits, dim=1).float()


def check_all_paths(hf, folder):
    """forward, step and prefill + step of qmamba's model against transformers' forward, and
    step / prefill + step against transformers' own cached decode."""
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits.float()
        ref_step, ref_prefill = hf_decode(hf, ids, 1), hf_decode(hf, ids, PREFILL)
        model = qmamba.load(folder).model
        fwd = model(ids)
        cache = model.allocate_cache(2)
        step = torch.stack([model.step(ids[:, t], cache) for t in range(LENGTH)], dim=1)
        cache = model.allocate_cache(2)
        pre = model(ids[:, :PREFILL], cache)
        tail = [model.step(ids[:, t], cache) for t in range(PREFILL, LENGTH)]
        prefill = torch.cat([pre, torch.stack(tail, dim=1)], dim=1)
    errs = {"forward": rel(fwd, ref), "step": rel(step, ref), "prefill+step": rel(prefill, ref),
            "step vs cached": rel(step, ref_step), "prefill+step vs cached": rel(prefill, ref_prefill)}
    print(f"transformers {'.'.join(map(str, V))}: " + ", ".join(f"{k} {v:.2g}" for k, v in errs.items()))
    for path, err in errs.items():
        assert err <= BOUND, f"{path}: relative logit error {err:.3g}"
    return model, cache


@needs_nemotron
def test_nemotron_h_parity(tmp_path):
    """transformers >= 5 (nemotron_h): every layer type, GQA, n_groups 2, a grouped sigmoid router."""
    hf = nemotron(tmp_path)
    model, cache = check_all_paths(hf, tmp_path)
    assert model.config.layer_types == ["mamba2", "attention", "mlp", "moe", "mamba2", "moe"]
    # the cache holds conv + SSM states of the Mamba layers and the KV of the attention layer
    kv = cache[1]
    assert kv.k.shape == (2, 2, LENGTH, 8) and kv.v.shape == kv.k.shape
    assert cache.nbytes()["kv"] == 2 * 2 * 2 * LENGTH * 8 * 4
    assert cache.nbytes()["ssm"] > 0 and cache.nbytes()["conv"] > 0


@needs_nemotron
def test_nemotron_h_legacy_pattern_and_shards(tmp_path):
    """A hub-style config (hybrid_override_pattern, no layers_block_type) and sharded safetensors."""
    hf = nemotron(tmp_path / "m", layers_block_type=["mamba", "attention", "mlp", "moe"])
    hf.save_pretrained(tmp_path / "s", max_shard_size="20KB")
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    cfg.pop("layers_block_type")
    cfg.update(hybrid_override_pattern="M*-E", num_hidden_layers=4)
    (tmp_path / "s" / "config.json").write_text(json.dumps(cfg))
    check_all_paths(hf, tmp_path / "s")


@pytest.mark.skipif(V < (5,), reason="transformers 4.57 normalises the Mamba2 gated norm over all of d_inner")
@pytest.mark.parametrize("rope", [True, False])
def test_granite_h_parity(tmp_path, rope):
    """transformers >= 5 (granitemoehybrid): Mamba2 with n_groups 2, GQA with RoPE or NoPE, MoE
    with a shared expert, the four multipliers."""
    hf = granite(tmp_path, rope=rope)
    model, cache = check_all_paths(hf, tmp_path)
    assert model.config.layer_types == ["mamba2", "moe", "attention", "moe", "mamba2", "moe"]
    assert cache[2].k.shape == (2, 2, LENGTH, 8)


@pytest.mark.parametrize("experts", [4, 0])
def test_granite_h_parity_n_groups_1(tmp_path, experts):
    """Every supported transformers (4.57 and 5.x): n_groups 1; with experts, and without (the
    shared MLP alone: layer type mlp, gated SwiGLU)."""
    hf = granite(tmp_path, n_groups=1, experts=experts)
    model, _ = check_all_paths(hf, tmp_path)
    assert model.config.layer_types[1] == ("moe" if experts else "mlp")


# ------------------------------------------------------------------------------------ config errors
NEMO = dict(model_type="nemotron_h", vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, intermediate_size=48, ssm_state_size=8, mamba_num_heads=8, mamba_head_dim=8, n_groups=2)
GRAN = dict(model_type="granitemoehybrid", vocab_size=64, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, mamba_n_heads=8, mamba_d_state=8)


@pytest.mark.parametrize("cfg, message", [
    ({**NEMO, "hybrid_override_pattern": "M*-X"}, "unknown layer character"),
    ({**NEMO, "hybrid_override_pattern": "M*-E", "num_hidden_layers": 5}, "has 4 layers but num_hidden_layers is 5"),
    ({**NEMO, "layers_block_type": ["mamba", "conv"]}, "unknown layer type 'conv'"),
    ({**NEMO}, "neither layers_block_type nor hybrid_override_pattern"),
    ({**GRAN, "layer_types": ["mamba"]}, "1 layer types but num_hidden_layers is 2"),
    ({**GRAN, "layer_types": ["mamba", "rnn"]}, "unknown layer type 'rnn'"),
])
def test_bad_hybrid_configs(cfg, message):
    with pytest.raises(QMambaError, match=message) as e:
        from_hf_dict(cfg)
    assert "\n" not in str(e.value)


def test_hybrid_config_reads_patterns():
    cfg = from_hf_dict({**NEMO, "hybrid_override_pattern": "M-*E"})
    assert cfg.layer_types == ["mamba2", "mlp", "attention", "moe"] and cfg.ngroups == 2
    assert cfg.to_hf()["hybrid_override_pattern"] == "M-*E"            # the source config, written back
    cfg = from_hf_dict({**GRAN, "layer_types": ["attention", "mamba"], "num_local_experts": 0})
    assert cfg.layer_types == ["attention", "mlp", "mamba2", "mlp"] and cfg.n_layer == 4


# ------------------------------------------------------------------------------------ end to end
def test_hybrid_hub_id_from_cache(tmp_path, monkeypatch):
    """A hub id whose (sharded) snapshot is in the local cache loads like a folder."""
    import shutil

    from huggingface_hub import constants
    folder = tmp_path / "src"
    granite(folder, n_groups=1).save_pretrained(folder, max_shard_size="20KB")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--owner--tiny-granite"
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    loaded = qmamba.load("owner/tiny-granite")
    assert loaded.model.config.model_type == "granitemoehybrid"
    assert (repo / "snapshots" / sha / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("family", ["nemotron_h", "granitemoehybrid"])
def test_hybrid_cli_generate_and_eval(family, tmp_path, tokenizer_dir, tokenizer_vocab, capsys):
    """`qmamba generate` and `qmamba eval` on a tiny hybrid with the project tokenizer; a bad
    hybrid config is exit status 2 with one line."""
    import shutil

    from qmamba.cli import main
    from qmamba.utils import paths
    if family == "nemotron_h" and not HAS_NEMOTRON:
        pytest.skip("transformers has no nemotron_h")
    make = nemotron if family == "nemotron_h" else granite
    make(tmp_path, vocab_size=tokenizer_vocab)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, tmp_path / name)
    assert main(["generate", str(tmp_path), "--prompt", "Sir Walter Elliot", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("Sir Walter Elliot")
    text = tmp_path / "sample.txt"
    text.write_text(paths.TEST_TEXT.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path), "--ppl", str(text), "--seqlen", "32", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["perplexity"] > 1
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["layer_types" if family == "granitemoehybrid" else "layers_block_type"] = ["mamba", "transformer"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["generate", str(tmp_path), "--prompt", "Sir", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown layer type 'transformer'" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("family", ["nemotron_h", "granitemoehybrid"])
def test_hybrid_rtn_w8a8_from_declarations(family, tmp_path):
    """RTN W8A8 quantizes every declared linear of every layer type (attention, MLP, experts);
    the router stays float, decoding still equals the parallel forward, and the saved qmamba
    checkpoint reloads bit for bit."""
    from qmamba.models.layer_spec import get_path, quantizable_linears
    from qmamba.quant.linear import QLinear
    if family == "nemotron_h" and not HAS_NEMOTRON:
        pytest.skip("transformers has no nemotron_h")
    (nemotron if family == "nemotron_h" else granite)(tmp_path)
    model = qmamba.load(tmp_path).model
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids)
    calib = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    qmamba.quantize(model, "w8a8", method="rtn", calib=calib, progress=False)
    for block in model.layers:
        for name in quantizable_linears(block.mixer):
            assert isinstance(get_path(block.mixer, name), QLinear), (block.layer_type, name)
        if block.layer_type == "moe":
            assert isinstance(block.mixer.gate.weight, torch.nn.Parameter)
    with torch.no_grad():
        out = model(ids)
        cache = model.allocate_cache(2)
        step = torch.stack([model.step(ids[:, t], cache) for t in range(LENGTH)], dim=1)
    assert 0 < rel(out, ref) < 0.5
    assert rel(step, out) <= BOUND
    # a qmamba checkpoint of it reloads to the same numbers
    from qmamba.quant.checkpoint import save_quantized
    save_quantized(model, tmp_path / "q")
    with torch.no_grad():
        again = qmamba.load(tmp_path / "q").model(ids)
    assert torch.equal(again, out)


@pytest.mark.parametrize("method", ["smoothquant", "quamba", "qmamba"])
def test_granite_h_other_methods_run(method, tmp_path):
    """SmoothQuant (the MoE smoothing pair scales the float router too), Quamba and Q-Mamba's
    ESR (whose block inputs include Granite's embedding multiplier) run on a hybrid; decode
    equals the forward."""
    granite(tmp_path)
    model = qmamba.load(tmp_path).model
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(3))
    calib = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
    qmamba.quantize(model, "w8a8" if method == "smoothquant" else "w8a8h8", method=method, calib=calib,
                    progress=False)
    with torch.no_grad():
        out = model(ids)
        cache = model.allocate_cache(2)
        step = torch.stack([model.step(ids[:, t], cache) for t in range(LENGTH)], dim=1)
    assert 0 < rel(out, ref) < 0.5
    assert rel(step, out) <= 1e-4


def test_inspect_reads_the_mamba_layers_of_a_hybrid(tmp_path):
    """`inspect` analyses the SSM states of a hybrid's Mamba layers (by default all of them, also
    when the first layer is attention) and refuses a layer without one in one line."""
    from qmamba.eval.inspect.probe import collect
    granite(tmp_path, layer_types=["attention", "mamba", "mamba"])
    model = qmamba.load(tmp_path).model
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    assert [r.index for r in collect(model, ids)] == [2, 4]
    with pytest.raises(QMambaError, match="layer\\(s\\) 1 have no SSM state to inspect"):
        collect(model, ids, [1, 2])


@needs_nemotron
def test_init_weights_on_a_hybrid(tmp_path):
    """init_weights gives a hybrid mamba_ssm's initialisation on its Mamba layers (D = 1, out_proj
    rescaled) and normal(0.02) linears elsewhere, and the model runs."""
    from qmamba.models.lm import init_weights
    nemotron(tmp_path)
    model = init_weights(qmamba.load(tmp_path).model, seed=3)
    mamba, attention = model.layers[0].mixer, model.layers[1].mixer
    assert torch.equal(mamba.D, torch.ones_like(mamba.D))
    linears = [p for n, p in attention.named_parameters() if p.dim() == 2]
    assert linears and all(0.01 < p.std().item() < 0.03 for p in linears)
    assert mamba.out_proj.weight.std().item() < 0.02 / 2          # 0.02 / sqrt(6 layers)
    assert torch.isfinite(model(torch.arange(12)[None] % VOCAB)).all()
