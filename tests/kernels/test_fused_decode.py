"""The fused Mamba2 decode step (`qmamba.quant.fused_decode`: the C kernels mamba2_conv_step and
mamba2_ssm_step) against the eager quantized step (`Mamba2Mixer.step` with the other C kernels on;
in integer execution with the whole-model native step switched off, which
tests/kernels/test_native_decode.py covers):
on tiny random W8A8H4 models (DSQ state, n_groups 1 and 2, batch 1 and 3), 24 decode steps after
a prompt, the SSM state codes and fp16 scales, the int8 conv state and the logits are equal bit for
bit after every step. Also: the fused path is taken where it applies, and not under
`qmamba.kernels.forced("torch")`."""

from __future__ import annotations

import pytest
import torch
from decode_compare import assert_same_decode, snapshot

import qmamba
from qmamba.kernels import cpu_native, forced
from qmamba.quant import fused_decode
from qmamba.quant.execution import set_execution
from qmamba.quantize import quantize

STEPS, PROMPT = 24, 7
FUSED_OPS = ("mamba2_conv_step", "mamba2_ssm_step")
NATIVE = ("mamba2_model_step",)

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="no C kernels here")


@pytest.fixture(scope="module", params=[1, 2], ids=lambda g: f"g{g}")
def qmodel(request, hf_factory, tmp_path_factory):
    g = request.param
    hf = hf_factory("mamba2", seed=21 + g, hidden_size=64, num_heads=8, head_dim=16, n_groups=g, state_size=16,
                    chunk_size=8, num_hidden_layers=2)
    folder = tmp_path_factory.mktemp(f"fused-g{g}")
    hf.save_pretrained(folder)
    model = qmamba.load(folder).model
    calib = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(g))
    return quantize(model, "w8a8h4", calib=calib, method="dsq", progress=False)


@torch.no_grad()
def _decode(model, batch: int, fused: bool):
    """Logits and cache tensors after every step of a prompt + STEPS teacher-forced tokens."""
    gen = torch.Generator().manual_seed(100 + batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT + STEPS), generator=gen)
    before = fused_decode.runs["fused"]
    ctx = forced("torch", ops=FUSED_OPS + NATIVE) if not fused else forced("torch", ops=NATIVE)
    with ctx:
        cache = model.allocate_cache(batch)
        model(ids[:, :PROMPT], cache)
        logits, states = [], []
        for t in range(PROMPT, PROMPT + STEPS):
            logits.append(model.step(ids[:, t], cache))
            states.append(snapshot(cache))
    taken = fused_decode.runs["fused"] - before
    assert taken == (STEPS * model.config.n_layer if fused else 0)
    return logits, states


@pytest.mark.parametrize("execution", ["int", "sim"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_step_equals_the_eager_step(qmodel, batch, execution):
    set_execution(qmodel, execution)
    try:
        want_logits, want_states = _decode(qmodel, batch, fused=False)
        got_logits, got_states = _decode(qmodel, batch, fused=True)
    finally:
        set_execution(qmodel, "sim")
    assert_same_decode(got_logits, got_states, want_logits, want_states)


@torch.no_grad()
def test_forced_torch_runs_the_eager_step(qmodel):
    cache = qmodel.allocate_cache(1)
    before = fused_decode.runs["fused"]
    with forced("torch"):
        qmodel.step(torch.tensor([1]), cache)
    assert fused_decode.runs["fused"] == before
    qmodel.step(torch.tensor([1]), cache)
    assert fused_decode.runs["fused"] == before + qmodel.config.n_layer
