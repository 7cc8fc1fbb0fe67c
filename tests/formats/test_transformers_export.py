"""The real client: transformers (with compressed-tensors) loads what `save_quantized` writes, on
CPU, and computes what qmamba computes with the same quantizers (`transformers_view`: a float
state, no mixer-internal activation quantizers). Perplexities on the shipped test text agree to
within 0.1% for Mamba2 W8A8 (the issue's bar); the other schemes are compared logit by logit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qmamba
from qmamba.eval.perplexity import perplexity, tokenize_text_file
from qmamba.formats.compressed_tensors import transformers_view
from qmamba.quant.checkpoint import save_quantized
from qmamba.quantize import quantize
from qmamba.utils import paths

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (pip install "
                    "'compressed-tensors>=0.15'): transformers cannot load compressed-tensors folders without it")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(f"transformers {transformers.__version__}: the export is verified with transformers 5.x "
                "(4.x's compressed-tensors integration is not)", allow_module_level=True)

TEST_TEXT = paths.TEST_TEXT
REF_MAMBA2 = paths.MODELS_DIR / "ref-mamba2"
SEQLEN, TOKENS = 128, 2048


@pytest.fixture(autouse=True)
def eager_fused_scan(monkeypatch):
    monkeypatch.setenv("QMAMBA_COMPILE", "0")


class Logits(nn.Module):
    """A transformers causal LM as qmamba's evaluation calls a model: ids -> logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits


def export(folder, tmp_path, spec, method="rtn", **options):
    loaded = qmamba.load(folder)
    loaded.model.eval()
    model = quantize(loaded, spec, method=method, nsamples=4, seqlen=64, progress=False, **options)
    out = save_quantized(model, tmp_path / "q", tokenizer_dir=folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return model, hf, loaded.tokenizer


def ppl(model, ids) -> float:
    return perplexity(model, ids, seqlen=SEQLEN, max_tokens=TOKENS, batch_size=8, progress=False)["perplexity"]


def test_transformers_ppl_equals_qmamba_float_state_w8a8(tmp_path, capsys):
    """The shipped ref-mamba2 (trained: a random model's near-uniform perplexity would hide a 1%
    error in the scales), W8A8 with static scales, 2048 tokens of the test text."""
    model, hf, tok = export(REF_MAMBA2, tmp_path, "w8a8")
    lin = hf.backbone.layers[0].mixer.in_proj
    assert lin.quantization_scheme.input_activations.strategy == "tensor"        # quantized, not float
    ids = tokenize_text_file(TEST_TEXT, tok)
    p_hf = ppl(Logits(hf), ids)
    with transformers_view(model):
        p_view = ppl(model, ids)
        with torch.no_grad():
            view = model(ids[:SEQLEN][None])
    with transformers_view(model, ct_clamp=False):
        p_own_clamp = ppl(model, ids)
    p_full = ppl(model, ids)
    with capsys.disabled():
        print(f"\nref-mamba2 W8A8 (rtn, 4 x 64 calibration tokens), test text {TOKENS} tokens: transformers "
              f"{p_hf:.4f}, qmamba with transformers' quantizers {p_view:.4f} ({100 * (p_hf / p_view - 1):+.4f}%), "
              f"the same with qmamba's +-127 clamp {p_own_clamp:.4f} ({100 * (p_own_clamp / p_hf - 1):+.4f}%), "
              f"qmamba with every quantizer {p_full:.4f} ({100 * (p_full / p_hf - 1):+.3f}%)")
    assert abs(p_hf / p_view - 1) < 1e-3
    with torch.no_grad():
        ref = hf(ids[:SEQLEN][None]).logits
    assert (ref - view).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("kind, spec, method, options", [
    ("mamba2", "w4a16", "rtn", {"w_group_size": 16}),          # int4 groups (pack-quantized in_proj)
    ("mamba2", "w8a8h4", "quamba", {}),                          # rotated out_proj stored un-rotated
    ("mamba2", "w4a8h4", "qmamba", {}),
    ("mamba1", "w8a8", "smoothquant", {}),                      # x_proj/dt_proj, smoothing folded
])
def test_transformers_logits_match_the_view(kind, spec, method, options, tiny_mamba1, tiny_mamba2, tmp_path):
    folder = (tiny_mamba1 if kind == "mamba1" else tiny_mamba2)[1]
    model, hf, tok = export(folder, tmp_path, spec, method, **options)
    ids = tokenize_text_file(TEST_TEXT, tok)[: 2 * SEQLEN].reshape(2, SEQLEN)
    with torch.no_grad():
        ref = hf(ids).logits
        with transformers_view(model):
            view = model(ids)
    assert (ref - view).abs().max() <= 1e-4 * ref.abs().max()
