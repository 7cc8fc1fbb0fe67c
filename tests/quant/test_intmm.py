"""Integer execution (int8 x int8 -> int32, scales after) against the simulated path of QLinear,
layer by layer (float rounding only) and through whole quantized models, on both backends (each
build of the C kernels this CPU runs, torch._int_mm always)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qmamba.kernels import cpu_features, cpu_native, forced, registry
from qmamba.quant import intmm
from qmamba.quant.activation import ActQuantizer
from qmamba.quant.execution import set_execution
from qmamba.quant.intmm import linear_int, supports_int
from qmamba.quant.linear import QLinear
from qmamba.quantize import quantize

from .test_checkpoint import CALIB, IDS, float_model


def calibrated_linear(bits: int, group: int, dynamic: bool, seed: int = 0) -> tuple[QLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(64, 24, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 64, generator=g))
        lin.bias.copy_(torch.randn(24, generator=g))
    x = torch.randn(3, 5, 64, generator=g) * 2
    aq = ActQuantizer(8, dynamic=dynamic)
    aq.mode = "observe"
    aq(x)
    aq.finish_calibration()
    return QLinear.from_linear(lin, bits, group, input_quant=aq), x


@pytest.fixture(params=["torch", *cpu_features.ISAS])
def backend(request):
    """The registry forced onto PyTorch's path or onto one C build (skips a build this CPU lacks)."""
    if request.param != "torch" and cpu_native.native(request.param) is None:
        pytest.skip(f"no {request.param} C kernel here: {cpu_native.error(request.param)}")
    with forced(request.param):
        want = None if request.param == "torch" else request.param
        assert getattr(registry.lookup("i8_linear_quantizing", "cpu"), "impl", None) == want
        yield request.param


@pytest.mark.parametrize("bits, group, dynamic", [(8, 0, False), (8, 0, True), (4, 0, False), (4, 16, False),
                                                  (8, 32, True)])
def test_integer_linear_equals_simulated(bits, group, dynamic, backend):
    q, x = calibrated_linear(bits, group, dynamic)
    assert supports_int(q)
    with torch.no_grad():
        sim = q(x)
        ints = linear_int(q, x)
    assert ints.shape == sim.shape == (3, 5, 24)
    assert ((ints - sim).abs().max() / sim.abs().max()).item() < 1e-5


@pytest.mark.parametrize("backend", ["torch"], indirect=True)
def test_integer_product_is_really_integer(backend, monkeypatch):
    """Without the C kernel, the product goes through torch._int_mm with int8 operands."""
    seen = []
    real = torch._int_mm

    def spy(a, b):
        seen.append((a.dtype, b.dtype))
        out = real(a, b)
        assert out.dtype == torch.int32
        return out

    monkeypatch.setattr(torch, "_int_mm", spy)
    q, x = calibrated_linear(8, 0, False)
    with torch.no_grad():
        linear_int(q, x)
    assert seen == [(torch.int8, torch.int8)]


@pytest.mark.parametrize("dynamic", [False, True])
def test_kernel_quantizes_activations_as_torch_does(dynamic, backend, monkeypatch):
    """With the C kernel, the int8 codes of the weights reach it and its own activation rounding
    gives exactly the integer product of the activations quantized by PyTorch."""
    if backend == "torch":
        pytest.skip("a C kernel's test")
    seen = []
    kernel = registry.lookup("i8_linear_quantizing", "cpu")

    def spy(x, static, codes, *rest):
        seen.append(codes.dtype)
        return kernel.fn(x, static, codes, *rest)

    monkeypatch.setattr(intmm, "kernel_lookup", lambda op, device: registry.Kernel(
        op, device, kernel.impl, spy, kernel.reference) if op == "i8_linear_quantizing" else None)
    monkeypatch.setattr(torch, "_int_mm", None)
    q, x = calibrated_linear(8, 0, dynamic)
    with torch.no_grad():
        out = linear_int(q, x)
        x2 = x.reshape(-1, 64)
        s_x = q.input_quant.current_scale(x2).float()
        q_x = torch.round(x2 / s_x).clamp(-127, 127).to(torch.int8)
        ref = registry.lookup("i8_linear", "cpu")(q_x, s_x.reshape(-1), q.codes(), q.w_scale, 0, q.bias)
    assert seen == [torch.int8]
    assert torch.equal(out.reshape(-1, 24), ref)


def test_weight_only_layers_run_on_integer_weights(backend):
    """W8A16 (no input quantizer): float activations x int8 weights, same result as simulated."""
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(40, 12, bias=True)
    q = QLinear.from_linear(lin, 8)
    assert supports_int(q)
    x = torch.randn(2, 3, 40, generator=g)
    with torch.no_grad():
        sim = q(x)
        ints = linear_int(q, x)
    assert ((ints - sim).abs().max() / sim.abs().max()).item() < 1e-5


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("config, method", [("w8a8h4", "rtn"), ("w4a8h4", "dsq"), ("w8a8", "quamba")])
def test_integer_model_matches_simulated_model(arch, config, method, backend):
    model = quantize(float_model(arch), config, calib=CALIB, method=method, progress=False)
    with torch.no_grad():
        sim = model(IDS)
        n = set_execution(model, "int")
        ints = model(IDS)
        set_execution(model, "sim")
        back = model(IDS)
    # Mamba1: in_proj, dt_proj, out_proj, and x_proj weight-only (it reads the already quantized x)
    assert n == {"mamba1": 4, "mamba2": 2}[arch] * model.config.n_layer
    assert torch.equal(back, sim)
    # code flips at rounding boundaries downstream make whole-model agreement looser than per layer
    assert ((ints - sim).abs().max() / sim.abs().max()).item() < 1e-2


def test_activation_only_layers_stay_simulated():
    q = QLinear.from_linear(nn.Linear(8, 4), None, input_quant=ActQuantizer(8))
    assert not supports_int(q)


def test_tied_head_switches_and_agrees(backend):
    model = quantize(float_model("mamba2"), "w8a8h4", calib=CALIB, method="rtn", progress=False,
                     quantize_head=True)
    with torch.no_grad():
        sim = model(IDS)
        n = set_execution(model, "int")
        head = model.lm_head(torch.randn(3, model.config.d_model))
        ints = model(IDS)
        set_execution(model, "sim")
    assert n == 2 * model.config.n_layer + 1             # + the tied 8-bit lm_head
    assert head.shape == (3, model.config.vocab_size)
    assert ((ints - sim).abs().max() / sim.abs().max()).item() < 1e-2
