"""Per-layer types: configs carry one layer type per block (derived from `arch` for every config
qmamba reads), blocks build the mixer of their type, and each mixer declares its linears,
smoothing pairs, states and learnable extras (qmamba.models.layer_spec)."""

from __future__ import annotations

import pytest
import torch

from qmamba.errors import QMambaError
from qmamba.models import MambaLM, ModelConfig
from qmamba.models.config import from_hf_dict
from qmamba.models.layer_spec import quantizable_linears, state_spec
from qmamba.models.layer_types import LAYER_TYPES


def cfg(arch: str, **kw) -> ModelConfig:
    extra = dict(headdim=16, d_state=32) if arch == "mamba2" else dict(d_state=16)
    return ModelConfig(arch=arch, vocab_size=64, d_model=32, n_layer=3, **{**extra, **kw})


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_layer_types_derive_from_arch_and_build_the_blocks(arch):
    c = cfg(arch)
    assert c.layer_types == [arch] * 3
    model = MambaLM(c)
    assert [b.layer_type for b in model.layers] == c.layer_types
    assert all(type(b.mixer) is LAYER_TYPES[arch] for b in model.layers)
    # the transformers config written back does not change
    assert "layer_types" not in c.to_hf()
    assert from_hf_dict(c.to_hf()).layer_types == c.layer_types


def test_bad_layer_types():
    with pytest.raises(QMambaError, match="2 layer types for 3 layers"):
        cfg("mamba2", layer_types=["mamba2", "mamba2"])
    with pytest.raises(QMambaError, match="unknown layer type 'conv'"):
        MambaLM(cfg("mamba2", layer_types=["mamba2", "conv", "mamba2"]))
    with pytest.raises(QMambaError, match="not a multiple of"):     # attention without its sizes
        MambaLM(cfg("mamba2", layer_types=["mamba2", "attention", "mamba2"]))


def test_mixed_mamba_layers_build():
    model = MambaLM(cfg("mamba2", layer_types=["mamba2", "mamba1", "mamba2"], dt_rank=2))
    assert [type(m).__name__ for m in model.mixers()] == ["Mamba2Mixer", "Mamba1Mixer", "Mamba2Mixer"]
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 64)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_declarations(arch):
    m = MambaLM(cfg(arch)).layers[0].mixer
    if arch == "mamba1":
        assert quantizable_linears(m) == ("in_proj", "x_proj", "dt_proj", "out_proj")
        assert [g.input_quantized for g in m.linear_groups()] == [False, True, False, False]
        assert [p.linears for p in m.smoothing_pairs()] == [("mixer.in_proj",), ("mixer.dt_proj",)]
        assert m.LEARNABLE == {"dt_bias": "dt_proj.bias"}
    else:
        assert quantizable_linears(m) == ("in_proj", "out_proj")
        assert [p.producer for p in m.smoothing_pairs()] == ["norm.weight", "mixer.norm.weight"]
        assert m.LEARNABLE == {"dt_bias": "dt_bias"}
    ssm, conv = state_spec(m, "ssm"), state_spec(m, "conv")
    assert ssm.shape == m.ssm_state_shape() and ssm.headdim == getattr(m, "headdim", 1)
    state = m.allocate_state(2, torch.float32, "cpu")
    assert tuple(state.conv.shape) == (2, *conv.shape) and tuple(state.ssm.h.shape) == (2, *ssm.shape)
