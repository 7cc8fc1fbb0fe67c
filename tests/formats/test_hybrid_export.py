"""Hybrids (Nemotron-H, Granite-4.0-H) saved by qmamba, float (`save_model`) and quantized
(`save_quantized`): the tensors carry transformers' checkpoint names and layouts (those of
transformers' own `save_pretrained` for the same config), transformers loads the folder with no
missing or unexpected key and computes what qmamba computes (float: the same model to 1e-5 of
the largest logit, as tests/models/test_hybrid_parity.py; quantized: qmamba's
`transformers_view`, to 1e-4 as tests/formats/test_transformers_export.py), and qmamba reloads
the folder bit for bit (state dicts and logits `torch.equal`).

transformers 4.57 has no nemotron_h and normalises Granite's gated norm over all of d_inner, so
there only Granite with n_groups 1 is checked, in float (its compressed-tensors integration is
not verified, as for Mamba2 in test_transformers_export.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import qmamba
from qmamba.errors import QMambaError
from qmamba.formats.compressed_tensors import transformers_view
from qmamba.models.save import save_model
from qmamba.quant.checkpoint import save_quantized

transformers = pytest.importorskip("transformers")

from tests.models.test_hybrid_parity import HAS_NEMOTRON, V, VOCAB, granite, nemotron, rel  # noqa: E402

IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
CALIB = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
# compressed-tensors' companions of a linear's weight, and the name that stands for the weight
CT_EXTRA = (".weight_scale", ".weight_shape", ".input_scale")


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    monkeypatch.setenv("QMAMBA_COMPILE", "0")


def source(family: str, folder, **over):
    """A tiny random hybrid saved by transformers' `save_pretrained` (its checkpoint names)."""
    if family == "nemotron_h":
        if not HAS_NEMOTRON:
            pytest.skip("transformers has no nemotron_h (added in 5.x)")
        return nemotron(folder, **over)
    if V < (5,):
        over.setdefault("n_groups", 1)               # 4.57: whole-width gated norm
    return granite(folder, **over)


def names(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def checkpoint_names(folder) -> set[str]:
    """A compressed-tensors folder's tensor names as a float checkpoint names them."""
    out = set()
    for k in names(folder):
        if k.endswith(CT_EXTRA):
            continue
        out.add(k[: -len("_packed")] if k.endswith(".weight_packed") else k)
    return out


def same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def hf_load(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("family", ["nemotron_h", "granitemoehybrid"])
def test_float_save_has_transformers_names(family, tmp_path):
    source(family, tmp_path / "src")
    model = qmamba.load(tmp_path / "src").model
    out = save_model(model, tmp_path / "out")
    assert names(out) == names(tmp_path / "src")                 # save_pretrained's names and layout
    again = qmamba.load(out).model
    with torch.no_grad():
        ours = model(IDS)
        assert torch.equal(again(IDS), ours) and same_state(again, model)
        theirs = hf_load(out)(IDS).logits
    assert rel(ours, theirs) <= 1e-5


def test_tied_nemotron_h_is_saved_with_its_head(tmp_path):
    """transformers never ties Nemotron-H's head (`_tied_weights_keys = {}`): a tied model is
    saved with lm_head.weight, or transformers would load a random head."""
    from safetensors.torch import load_file, save_file

    source("nemotron_h", tmp_path / "src", tie_word_embeddings=True)
    sd = load_file(tmp_path / "src" / "model.safetensors")
    del sd["lm_head.weight"]                          # a tied checkpoint without a separate head
    save_file(sd, tmp_path / "src" / "model.safetensors")
    model = qmamba.load(tmp_path / "src").model
    assert model.config.tie_embeddings
    out = save_model(model, tmp_path / "out")
    assert "lm_head.weight" in names(out)
    with torch.no_grad():
        assert rel(model(IDS), hf_load(out)(IDS).logits) <= 1e-5
        assert torch.equal(qmamba.load(out).model(IDS), model(IDS))


CASES = [("nemotron_h", "w8a8", {}), ("nemotron_h", "w8a8h4kv8", {}), ("nemotron_h", "w4a16", {"w_group_size": 8}),
         ("granitemoehybrid", "w8a8", {}), ("granitemoehybrid", "w8a8h4kv4", {}), ("granitemoehybrid", "w4a16", {})]


@pytest.mark.parametrize("family, spec, options", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_quantized_hybrid_round_trip(family, spec, options, tmp_path):
    """Experts (MoE), attention and KV8/KV4 configs: qmamba reloads the folder bit for bit, its
    names are transformers', the KV part stays in qmamba's extension (kv_cache_scheme null)."""
    source(family, tmp_path / "src")
    model = qmamba.load(tmp_path / "src").model
    qmamba.quantize(model, spec, method="rtn", calib=CALIB, progress=False, **options)
    out = save_quantized(model, tmp_path / "q")
    again = qmamba.load(out).model
    assert same_state(again, model)
    with torch.no_grad():
        assert torch.equal(again(IDS), model(IDS))
        cache = again.allocate_cache(2)
        step = torch.stack([again.step(IDS[:, t], cache) for t in range(IDS.shape[1])], dim=1)
        assert rel(step, model(IDS)) <= 1e-4                     # decode reads the restored KV quantizer
    assert checkpoint_names(out) == names(tmp_path / "src")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"] is None
    kv = [s for s in qc["qmamba"]["not_in_compressed_tensors"] if s.startswith("the KV")]
    assert bool(kv) == ("kv" in spec)
    experts = [s for s in qc["qmamba"]["not_in_compressed_tensors"] if "routed experts" in s]
    assert bool(experts) == (model.quant_config.a_bits is not None and bool(model.config.hybrid.get("n_experts")))


@pytest.mark.parametrize("family, spec, options", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_transformers_loads_quantized_hybrid(family, spec, options, tmp_path):
    """transformers (with compressed-tensors) computes qmamba's transformers view of the folder;
    every quantized linear is in exactly one config group (compressed-tensors' own matcher)."""
    if V < (5,):
        pytest.skip(f"transformers {transformers.__version__}: compressed-tensors export verified with 5.x")
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_name

    source(family, tmp_path / "src")
    model = qmamba.load(tmp_path / "src").model
    qmamba.quantize(model, spec, method="rtn", calib=CALIB, progress=False, **options)
    out = save_quantized(model, tmp_path / "q")
    parsed = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    quantized = {k.rsplit(".", 1)[0] for k in names(out) if k.endswith(".weight_scale")}
    assert quantized
    for name in quantized:
        hits = [g for g, s in parsed.config_groups.items() if any(match_name(name, t) for t in s.targets)]
        assert len(hits) == 1, name
        assert not any(match_name(name, t) for t in parsed.ignore), name
    hf = hf_load(out)
    with torch.no_grad():
        theirs = hf(IDS).logits
        with transformers_view(model):
            view = model(IDS)
    assert (theirs - view).abs().max() <= 1e-4 * theirs.abs().max()
    if family == "granitemoehybrid":                # float experts: qmamba's dequantized weights
        experts = model.backbone.layers[1].mixer.experts
        w = torch.stack([e.up_proj.dequantized_weight(torch.float32) for e in experts])
        assert torch.equal(hf.model.layers[0].block_sparse_moe.experts.gate_up_proj.data, w)


def test_granite_quantized_expert_has_no_transformers_name():
    """Granite's checkpoints hold experts fused in float; a quantized expert tensor handed to
    the name mapping is refused in one line (the export writes them dequantized instead)."""
    from qmamba.models.config import from_hf_dict
    from qmamba.models.load import transformers_names

    cfg = from_hf_dict(dict(model_type="granitemoehybrid", vocab_size=64, hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=4, mamba_n_heads=8, mamba_d_state=8, num_local_experts=2,
                            num_experts_per_tok=1, intermediate_size=16))
    sd = {"backbone.layers.1.mixer.experts.0.up_proj.weight_scale": torch.ones(32, 1)}
    with pytest.raises(QMambaError, match="no transformers name for backbone.layers.1.mixer.experts.0") as e:
        transformers_names(cfg, sd)
    assert "\n" not in str(e.value)
