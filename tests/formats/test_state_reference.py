"""The state reference of docs/checkpoint-format.md (`qmamba.formats.state_extension.state_step`,
quoted verbatim by the doc) computes what qmamba's decode step computes on its integer cache, bit
for bit: for every state quantizer directly, and for a saved folder whose scales are read from
its extension file under the documented names."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qmamba
from qmamba.formats import compressed_tensors as ct
from qmamba.formats.state_extension import state_step
from qmamba.kernels import cpu_native, forced
from qmamba.quant import qscan
from qmamba.quant.checkpoint import save_quantized
from qmamba.quant.primitives import unpack_codes
from qmamba.quant.state import StateQuantizer
from qmamba.quant.state_cache import QuantizedSSMState
from qmamba.quantize import quantize

DOC = Path(__file__).resolve().parents[2] / "docs" / "checkpoint-format.md"


@pytest.fixture(autouse=True)
def eager_fused_scan(monkeypatch, request):
    monkeypatch.setenv("QMAMBA_COMPILE", "0")
    if "kernel" in request.node.name:
        yield
    else:
        with forced("torch", ops=("dsq_scan",)):
            yield


def codes_of(state: QuantizedSSMState) -> torch.Tensor:
    return unpack_codes(state.codes, state.per_byte, state.quantizer.n)


def run_steps(kind, mode, bits, arch, steps=4):
    """(qmamba's outputs, the reference's) for `steps` tokens from random inputs."""
    g = torch.Generator().manual_seed(0)
    b, d, n, groups, headdim = 2, 32, 16, 2, 8
    q = StateQuantizer(kind, bits, d, n, headdim=headdim if arch == "mamba2" else 1, scale_mode=mode)
    with torch.no_grad():
        q.s_n.copy_(0.5 + torch.rand(n, generator=g))
        q.static_scale.copy_(0.05 + 0.1 * torch.rand(q.static_scale.shape, generator=g))
    state = q.allocate(b)
    A = -torch.rand(d, n if arch == "mamba1" else 1, generator=g)
    ours, ref = [], []
    for t in range(steps):
        x, dt = torch.randn(b, d, generator=g), torch.rand(b, d, generator=g)
        B, C = torch.randn(b, groups, n, generator=g), torch.randn(b, groups, n, generator=g)
        before, scales = codes_of(state), (state.scales.clone() if mode == "dynamic" else None)
        y = state.step(x, dt, A, B, C)
        ours.append((codes_of(state), state.scales.clone() if mode == "dynamic" else None, y))
        ref.append(state_step(before, scales, x, dt, A, B, C, kind=kind, bits=bits, s_n=q.s_n.detach(),
                              static_scale=q.static_scale.detach(), heads=d // q.headdim, group=q.group_size))
    return ours, ref


@pytest.mark.parametrize("kind, mode, bits, arch", [
    (k, m, b, a) for k, m, b, a in itertools.product(("tensor", "channel", "state", "head", "group", "dsq"),
                                                     ("static", "dynamic"), (4, 8), ("mamba1", "mamba2"))
    if not (k == "head" and a == "mamba1")])
def test_reference_matches_the_cache_step(kind, mode, bits, arch):
    ours, ref = run_steps(kind, mode, bits, arch)
    for t, ((codes, scales, y), (codes2, scales2, y2)) in enumerate(zip(ours, ref)):
        assert torch.equal(codes2, codes) and torch.equal(y2, y), t
        assert (scales2 is None) == (scales is None) and (scales2 is None or torch.equal(scales2, scales))


@pytest.mark.parametrize("kind", ["dsq", "channel", "tensor"])
def test_reference_and_the_c_kernel(kind):
    if not cpu_native.available():
        pytest.skip("qmamba's C kernels are not available here")
    before = dict(qscan.runs)
    ours, ref = run_steps(kind, "dynamic" if kind != "tensor" else "static", 4, "mamba2", steps=16)
    assert qscan.runs["kernel"] > before.get("kernel", 0)
    codes = torch.stack([o[0] for o in ours]).float()
    codes2 = torch.stack([r[0] for r in ref]).float()
    assert (codes != codes2).float().mean() < 1e-3                    # a code at a rounding boundary
    y, y2 = torch.stack([o[2] for o in ours]), torch.stack([r[2] for r in ref])
    assert (y - y2).abs().max() <= 1e-3 * y2.abs().max()


def test_reference_on_a_saved_folder(tiny_mamba2, tmp_path, monkeypatch):
    """qmamba's method (DSQ state): the extension's tensors under their documented names drive the
    reference through a prefill and three decode steps of the reloaded folder."""
    model = quantize(qmamba.load(tiny_mamba2[1]), "w8a8h4", method="qmamba", nsamples=4, seqlen=64,
                     progress=False)
    out = save_quantized(model, tmp_path / "q")
    ext = load_file(out / ct.EXTENSION_FILE)
    loaded = qmamba.load(out).model
    qc = loaded.quant_config
    records = []
    step = QuantizedSSMState.step

    def recording(self, x, dt, A, B, C):
        before = (codes_of(self), self.scales.clone() if self.scales.numel() else None)
        y = step(self, x, dt, A, B, C)
        records.append((self.quantizer.where, before, (x, dt, A, B, C), (codes_of(self), self.scales.clone(), y)))
        return y

    monkeypatch.setattr(QuantizedSSMState, "step", recording)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = loaded.allocate_cache(2)
        loaded(ids[:, :5], cache)
        for t in range(5, 8):
            loaded.step(ids[:, t], cache)
    assert len(records) == 3 * loaded.config.n_layer
    for where, (codes, scales), (x, dt, A, B, C), (codes_after, scales_after, y) in records:
        i = int(re.search(r"layers\.(\d+)", where).group(1))
        prefix = f"backbone.layers.{i}.mixer.state_quant."
        c2, s2, y2 = state_step(codes, scales, x, dt, A, B, C, kind=qc.state_quant, bits=qc.h_bits,
                                s_n=ext[prefix + "s_n"], static_scale=ext[prefix + "static_scale"],
                                heads=loaded.config.nheads, group=qc.state_group_size)
        assert torch.equal(c2, codes_after) and torch.equal(y2, y)
        assert s2 is None or torch.equal(s2, scales_after)


def test_the_doc_quotes_the_reference():
    """docs/checkpoint-format.md holds state_step as it is in the module (the code an engine copies)."""
    import inspect

    from qmamba.formats import state_extension

    source = inspect.getsource(state_extension.state_step)
    assert source in DOC.read_text(), "docs/checkpoint-format.md does not quote state_step verbatim"
    assert len(source.splitlines()) <= 40
