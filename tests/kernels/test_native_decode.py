"""The whole-model native decode step (`qmamba.quant.native_decode`: one call of the C kernel
mamba2_model_step per token) against the eager quantized step in integer execution (the loop
over `Block.step`, with the other C kernels on): on tiny random W8A8H4 models (DSQ state, n_groups
1 and 2, static and dynamic activation scales, batch 1 and 3), 24 decode steps after a prompt,
the logits, the SSM state codes and fp16 scales and the int8 conv state are equal bit for bit
after every step. Also: where it applies and where it does not (simulated execution, W4 weights,
forced off), and that changing a weight in place between tokens is seen."""

from __future__ import annotations

import pytest
import torch
from decode_compare import assert_same_decode, snapshot

import qmamba
from qmamba.kernels import cpu_native, forced
from qmamba.quant import native_decode
from qmamba.quant.execution import set_execution
from qmamba.quantize import quantize

STEPS, PROMPT = 24, 7
OFF = ("mamba2_model_step", "mamba2_conv_step", "mamba2_ssm_step")      # the eager step

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="no C kernels here")


def _model(hf_factory, folder, groups: int, config: str = "w8a8h4", method: str = "dsq"):
    hf = hf_factory("mamba2", seed=31 + groups, hidden_size=64, num_heads=8, head_dim=16, n_groups=groups,
                    state_size=16, chunk_size=8, num_hidden_layers=2)
    hf.save_pretrained(folder)
    model = qmamba.load(folder).model
    calib = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(groups))
    return quantize(model, config, calib=calib, method=method, progress=False)


@pytest.fixture(scope="module", params=[1, 2], ids=lambda g: f"g{g}")
def qmodel(request, hf_factory, tmp_path_factory):
    return _model(hf_factory, tmp_path_factory.mktemp(f"native-g{request.param}"), request.param)


@torch.no_grad()
def _decode(model, batch: int, native: bool):
    """Logits and cache tensors after every step of a prompt + STEPS teacher-forced tokens, and
    how many tokens the native step ran."""
    ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT + STEPS),
                        generator=torch.Generator().manual_seed(200 + batch))
    before = native_decode.runs["native"]
    with forced("torch", ops=OFF if not native else ("i8_linear",)):
        cache = model.allocate_cache(batch)
        model(ids[:, :PROMPT], cache)
        logits, states = [], []
        for t in range(PROMPT, PROMPT + STEPS):
            logits.append(model.step(ids[:, t], cache))
            states.append(snapshot(cache))
    return logits, states, native_decode.runs["native"] - before


def _assert_same(got, want):
    assert_same_decode(got[0], got[1], want[0], want[1])


@pytest.mark.parametrize("batch", [1, 3])
def test_native_step_equals_the_eager_step(qmodel, batch):
    set_execution(qmodel, "int")
    try:
        want = _decode(qmodel, batch, native=False)
        got = _decode(qmodel, batch, native=True)
    finally:
        set_execution(qmodel, "sim")
    assert want[2] == 0 and got[2] == STEPS
    _assert_same(got, want)


def test_dynamic_activation_scales(hf_factory, tmp_path):
    """W8A8 with per-token (dynamic) input scales of in_proj and out_proj: still native, same bits."""
    model = _model(hf_factory, tmp_path, 1)
    for lin in (m for name, m in model.named_modules() if name.endswith(("in_proj", "out_proj"))):
        lin.input_quant.dynamic = True
    set_execution(model, "int")
    want, got = _decode(model, 2, native=False), _decode(model, 2, native=True)
    assert got[2] == STEPS
    _assert_same(got, want)


@torch.no_grad()
def test_where_it_does_not_apply(qmodel, hf_factory, tmp_path):
    tok = torch.tensor([3])
    cache = qmodel.allocate_cache(1)
    before = native_decode.runs["native"]
    qmodel.step(tok, cache)                                 # simulated execution: not native
    set_execution(qmodel, "int")
    try:
        with forced("torch"):
            qmodel.step(tok, cache)                         # kernels forced off
        assert native_decode.runs["native"] == before
        qmodel.step(tok, cache)
        assert native_decode.runs["native"] == before + 1
    finally:
        set_execution(qmodel, "sim")
    w4 = _model(hf_factory, tmp_path, 1, config="w4a8h4")  # 4-bit weights: the per-layer step
    set_execution(w4, "int")
    w4.step(tok, w4.allocate_cache(1))
    assert native_decode.runs["native"] == before + 1


@torch.no_grad()
def test_a_weight_changed_in_place_is_seen(qmodel):
    """A norm weight scaled in place between two tokens of one cache: the next native token uses
    the new weight, as the eager step does."""
    norm = qmodel.backbone.layers[0].norm.weight
    saved = norm.detach().clone()

    def last_logits(native: bool, change: bool):
        with forced("torch", ops=("i8_linear",) if native else OFF):
            cache = qmodel.allocate_cache(1)
            qmodel(torch.tensor([[1, 2, 3]]), cache)
            qmodel.step(torch.tensor([4]), cache)
            if change:
                norm.mul_(3.0)
            try:
                return qmodel.step(torch.tensor([5]), cache)
            finally:
                norm.copy_(saved)

    set_execution(qmodel, "int")
    try:
        got, want, unchanged = last_logits(True, True), last_logits(False, True), last_logits(False, False)
    finally:
        set_execution(qmodel, "sim")
    assert torch.equal(got, want) and not torch.equal(want, unchanged)


@torch.no_grad()
def test_a_hybrid_runs_its_per_layer_step():
    """ref-hybrid (Mamba2 + attention + MLP blocks): the native step declines (an attention
    layer's KV cache has no SSM state) and the per-layer step decodes, in integer execution."""
    model = qmamba.load("ref-hybrid").model
    calib = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model = quantize(model, "w8a8h4kv8", calib=calib, method="rtn", progress=False)
    set_execution(model, "int")
    cache = model.allocate_cache(1)
    before = native_decode.runs["native"]
    model(torch.tensor([[1, 2, 3]]), cache)
    logits = model.step(torch.tensor([4]), cache)
    assert native_decode.runs["native"] == before and torch.isfinite(logits).all()
