"""A layer type the methods have never heard of (a gated MLP, as in hybrid models) is quantized
from its declarations alone: its linears, the group of two linears that read one input (one
input quantizer, one smoothing scale), its smoothing pair and its (absent) state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qmamba.eval.memory import memory_report
from qmamba.models import MambaLM, ModelConfig
from qmamba.models.layer_spec import LinearGroup, SmoothingPair
from qmamba.models.layer_types import LAYER_TYPES
from qmamba.quant.activation import ActQuantizer
from qmamba.quant.linear import QLinear
from qmamba.quantize import quantize

VOCAB = 300
CALIB = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))


class NoState:
    def tensors(self) -> dict:
        return {}


class GatedMLP(nn.Module):
    LAYER_TYPE = "gated_mlp"
    QUANT_POINTS = ("quant_h",)
    LEARNABLE: dict = {}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
        self.up = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
        self.down = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.quant_h = nn.Identity()
        self.state_quant = None

    def linear_groups(self):
        return LinearGroup(("gate", "up")), LinearGroup(("down",))

    def smoothing_pairs(self):
        return (SmoothingPair("norm.weight", ("mixer.gate", "mixer.up")),)

    def states(self):
        return ()

    def forward(self, x, state=None):
        return self.down(self.quant_h(F.silu(self.gate(x)) * self.up(x)))

    def step(self, x, state):
        return self.forward(x)

    def allocate_state(self, batch, dtype, device):
        return NoState()


@pytest.fixture
def hybrid(monkeypatch):
    monkeypatch.setitem(LAYER_TYPES, GatedMLP.LAYER_TYPE, GatedMLP)

    def make():
        cfg = ModelConfig(arch="mamba2", vocab_size=VOCAB, d_model=32, n_layer=2, headdim=16, d_state=16,
                          layer_types=["mamba2", "gated_mlp"])
        torch.manual_seed(0)
        model = MambaLM(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.1)
            model.layers[1].norm.weight[3] = 20.0            # an outlier channel into the MLP
        return model
    return make


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "quamba", "qmamba"])
def test_an_undeclared_architecture_quantizes_from_its_declarations(hybrid, method):
    model = hybrid()
    ref = model(IDS)
    opts = dict(nsamples=4, seqlen=32, epochs=1) if method == "qmamba" else None
    quantize(model, "w8a8h8", calib=CALIB, method=method, method_options=opts, progress=False)
    mlp = model.layers[1].mixer
    assert all(isinstance(getattr(mlp, n), QLinear) and getattr(mlp, n).w_bits == 8 for n in ("gate", "up", "down"))
    assert isinstance(mlp.gate.input_quant, ActQuantizer) and mlp.up.input_quant is mlp.gate.input_quant
    assert isinstance(mlp.quant_h, ActQuantizer) and mlp.down.input_quant is not mlp.gate.input_quant
    assert model.layers[0].mixer.state_quant is not None
    out = model(IDS)
    assert torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 0.2
    if method == "qmamba":
        assert [r["block"] for r in model.quant_state.records] == [0, 1]
    rep = memory_report(model)
    assert rep["batches"]["1"]["state_fp16"]["ssm"] == 32 * 2 * 16 * 2      # the Mamba2 layer only


def test_smoothing_a_shared_input_is_exact_in_float(hybrid):
    from qmamba.methods.smoothquant import smooth, smoothing_pairs

    model = hybrid()
    ref = model(IDS)
    pairs = smoothing_pairs(model)
    assert [tuple(lins) for lins, _ in pairs][-1] == (model.layers[1].mixer.gate, model.layers[1].mixer.up)
    scales = smooth(model, CALIB)
    assert (scales[-1] != 1).any()
    assert ((model(IDS) - ref).abs().max() / ref.abs().max()) < 1e-5
