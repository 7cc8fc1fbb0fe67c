"""Quantized Mamba2 with n_groups > 1 (W8A8H4): every quantized scan maps heads to B/C groups as
mamba_ssm does, the three ways of running the quantized recurrence agree, and a saved grouped
model reloads bit for bit.

The quantized scans (the C kernel `qscan.kernel_scan`, the fused eager step
`qscan.quantized_scan`, and `scan.selective_scan_ref` with the quantizer as state_fn) all take
B, C per group (b, l, g, n); the oracle's sequential scan (tests/oracle/mamba_ref.py, channel c
reads group c // (d / g) as mamba_ssm's selective_scan_ref) run with the same quantizer after
every update is their reference, on the scan inputs captured from the quantized model itself.
"""

from __future__ import annotations

import json

import pytest
import torch

import qmamba
from oracle.mamba_ref import selective_scan_ref as oracle_scan
from qmamba.models.scan.reference import selective_scan_ref
from qmamba.kernels import cpu_native, forced
from qmamba.quant import qscan
from qmamba.quant.checkpoint import save_quantized
from qmamba.quantize import quantize

LENGTH, PREFILL = 23, 9
# float32 paths with the same 4-bit state rounding: they differ by float rounding only (here: 0 or
# ~1e-7 relative to the largest output), unless a value sits on a rounding boundary and its code
# flips (exp differs in the last bit between vector widths and CPUs): then that channel's later
# outputs move by up to one code step. So: all outputs within REL_TOL, except at most
# FLIP_FRACTION of them, and those within one code step (1/7 of the state's range, < 0.2).
REL_TOL = 1e-5
FLIP_FRACTION = 1e-2


def rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def off_fraction(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Fraction of outputs further than REL_TOL (relative to the largest output) from ref."""
    err = (out.double() - ref.double()).abs()
    return (err > REL_TOL * ref.double().abs().max()).double().mean().item()


@pytest.fixture(scope="module", params=[2, 8], ids=lambda g: f"g{g}")
def grouped(request, hf_factory, tmp_path_factory):
    """(float folder, ids, calibration ids): Mamba2 with 8 heads of 16 and n_groups g."""
    g = request.param
    hf = hf_factory("mamba2", seed=11, hidden_size=64, num_heads=8, head_dim=16, n_groups=g, state_size=16,
                    chunk_size=8)
    folder = tmp_path_factory.mktemp(f"m2-g{g}")
    hf.save_pretrained(folder)
    gen = torch.Generator().manual_seed(12)
    ids = torch.randint(0, hf.config.vocab_size, (2, LENGTH), generator=gen)
    calib = torch.randint(0, hf.config.vocab_size, (4, 16), generator=gen)
    return folder, ids, calib


@pytest.fixture(scope="module", params=["dsq", "rtn"])
def qmodel(request, grouped):
    """A W8A8H4 quantized grouped model (DSQ state: per-channel x per-state scales; RTN: the
    method's default static state quantizer), loaded from the HF folder."""
    folder, ids, calib = grouped
    model = qmamba.load(folder).model
    cfg = model.config
    assert cfg.ngroups > 1 and cfg.norm_group_size == cfg.d_inner // cfg.ngroups
    return quantize(model, "w8a8h4", calib=calib, method=request.param, progress=False), ids


@pytest.fixture
def torch_scan():
    """The kernel registry without its dsq_scan: the model's scans take the compiled / eager step."""
    with forced("torch", ops=("dsq_scan",)):
        yield


@torch.no_grad()
def test_quantized_scans_match_the_grouped_oracle(qmodel, scan_inputs, torch_scan):
    """Per layer, on the model's own scan inputs: the oracle's grouped recurrence with the state
    quantizer after every update, against the C kernel (where built), the fused eager step and
    qmamba's sequential reference."""
    model, ids = qmodel
    for layer in model.backbone.layers:
        mixer = layer.mixer
        q = mixer.state_quant
        assert q is not None and q.mode == "quant"
        (x, dt, B, C), = scan_inputs(mixer, lambda: model(ids))
        assert B.shape[-2] == mixer.ngroups > 1
        xs, dts, A, Bs, Cs, D = mixer.per_channel(x, dt, B, C)
        ref = oracle_scan(xs.float(), dts.float(), A.expand(-1, mixer.d_state), Bs.float(), Cs.float(), D,
                          state_fn=q)
        outs = {"eager fused step": qscan.quantized_scan(xs, dts, A, Bs, Cs, D, q)[0],
                "sequential reference": selective_scan_ref(xs, dts, A, Bs, Cs, D, None, q)[0]}
        if cpu_native.available():
            with forced(cpu_native.isa()):              # (inside torch_scan: the innermost wins)
                y = qscan.kernel_scan(q.allocate(x.shape[0]), xs, dts, A, Bs, Cs)
            outs["C kernel"] = y + D * xs.float()
        for name, out in outs.items():
            print(f"g{mixer.ngroups} {q.kind:<7} {name:<21} rel {rel(ref, out):.3e}, "
                  f"off {off_fraction(ref, out):.1e}")
            assert off_fraction(ref, out) <= FLIP_FRACTION and rel(ref, out) < 0.2, \
                f"{name}: {off_fraction(ref, out):.1e} of the outputs off, max rel {rel(ref, out):.3e}"


@torch.no_grad()
def test_kernel_and_eager_models_agree(qmodel):
    """The whole quantized grouped model, prompt and decode: C kernels against the eager torch
    path (the same integer cache codes after the prompt, logits within float rounding)."""
    if not cpu_native.available():
        pytest.skip(f"no C kernels here: {cpu_native.unavailable_reason()}")
    model, ids = qmodel

    def run():
        cache = model.allocate_cache(ids.shape[0])
        head = model(ids[:, :PREFILL], cache)
        codes = [layer.ssm.codes.clone() for layer in cache]
        steps = [model.step(ids[:, t], cache) for t in range(PREFILL, ids.shape[1])]
        return torch.cat([head, torch.stack(steps, 1)], 1), model(ids), codes

    fast = run()
    with forced("torch"):
        slow = run()
    for a, b in zip(fast[2], slow[2]):
        assert (a != b).float().mean().item() <= FLIP_FRACTION / 10
    for a, b in zip(fast[:2], slow[:2]):
        print(f"kernel vs eager model: rel {rel(b, a):.3e}, codes differing "
              f"{max((u != v).float().mean().item() for u, v in zip(fast[2], slow[2])):.1e}")
        assert rel(b, a) <= 1e-4            # the int8 GEMM kernel rounds its scales in another order


@torch.no_grad()
def test_grouped_quantized_reload_is_bit_exact(qmodel, tmp_path):
    model, ids = qmodel
    out = save_quantized(model, tmp_path / "q")
    raw = json.loads((out / "config.json").read_text())
    assert raw["n_groups"] == model.config.ngroups and "qmamba_norm_group_size" not in raw
    loaded = qmamba.load(out).model
    assert loaded.config.norm_group_size == model.config.norm_group_size

    def run(m):
        cache = m.allocate_cache(ids.shape[0])
        head = m(ids[:, :PREFILL], cache)
        steps = [m.step(ids[:, t], cache) for t in range(PREFILL, ids.shape[1])]
        return m(ids), torch.cat([head, torch.stack(steps, 1)], 1)

    for a, b in zip(run(model), run(loaded)):
        assert torch.equal(a, b)
